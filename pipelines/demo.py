"""`retain-asd demo` (`make demo`): the study's short form on one machine.

The stand-in foundation encoder (trained once on clean generic synthetic sounds, then cached) -> its
`frozen` row, `denoise` and the paper's `tagging_mixture` (Ray Train) on the pre-training world -> scored on
the evaluation world (other machines, other noises) at 7 SNRs x 3 conditions -> the Table-2 table, one
MLflow experiment (`demo`). One seed (preset `demo`); `retain-asd study` runs every row over 3 seeds.
A second run reuses the encoder, the corpora and the finished rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs on the console")
    add_config_args(p, default_preset="demo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    cfg = config_from_args(args, "retain-asd demo", first=[f"data.work_dir={out / 'data'}"])
    if cfg is None:
        return 2
    from pipelines.study import run_and_print
    from retain_asd.experiments.study import check_study

    check_study(cfg)
    rows = ", ".join(r.split(":")[0] for r in cfg.study.rows)
    header = (f"retain-asd demo: rows {rows}; {len(cfg.study.seeds)} seed(s); {cfg.train.total_steps} steps each; "
              f"output {out}")
    return run_and_print(cfg, out, address=None, verbose=args.verbose, log_name="demo.log", header=header)


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd demo"))
