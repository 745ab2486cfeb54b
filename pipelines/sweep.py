"""`retain-asd sweep`: Ray Tune over SNR ranges and alpha/beta (config section `tune`), each trial a full
pretrain + evaluate; every trial is an MLflow run in `<experiment>-sweep`, best by `tune.metric`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args, protocol_guard, quiet_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd sweep", description=__doc__)
    add_config_args(p, default_preset="tagging_mixture_pm5")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's, Tune's and MLflow's own logs on the console "
                   "(default: in <out>/sweep.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd sweep")
    if cfg is None:
        return 2
    from tune.space import check_trials
    from tune.sweep import run_sweep, summarize_sweep

    check_trials(cfg)  # a bad sweep value fails here, before Ray starts
    if not protocol_guard(cfg, "retain-asd sweep"):  # so does an overlap of the two corpora
        return 2
    with quiet_run(Path(args.out) / "sweep.log", args.verbose, address=args.address) as console:
        console.say(f"sweep {cfg.name}: {cfg.tune.num_samples} trials, each a pretrain + evaluate")
        text, code = summarize_sweep(run_sweep(cfg, args.out), cfg.tune.metric)
    console.say(text)
    return code


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd sweep"))
