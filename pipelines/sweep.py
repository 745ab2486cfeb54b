"""`retain-asd sweep`: Ray Tune over SNR ranges and alpha/beta (config section `tune`), each trial a full
pretrain + evaluate; every trial is an MLflow run in `<experiment>-sweep`, best by `tune.metric`.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import add_config_args, config_from_args
from retain_asd.runtime import init_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd sweep", description=__doc__)
    add_config_args(p, default_preset="tagging_mixture_pm5")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd sweep")
    if cfg is None:
        return 2
    from tune.sweep import run_sweep

    init_ray(args.address)
    grid = run_sweep(cfg, args.out)
    frame = grid.get_dataframe()
    shown = [c for c in frame.columns if c.startswith(("config/", "hmean"))]
    print(frame[shown].sort_values(cfg.tune.metric, ascending=False).to_string(index=False))
    best = grid.get_best_result()
    print(f"best {cfg.tune.metric} = {best.metrics[cfg.tune.metric]:.4f} with {best.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
