"""`retain-asd table3`: the paper's Table 3 on the evaluation corpus's Mismatch set at 0 dB, per machine, no
domain normalisation: each encoder on the wave mixture against the embedding-mixture oracle
lam * E(clean) + (1 - lam) * E(noise) of the first encoder (same clips), plus any students given.

    retain-asd table3 --preset demo data.work_dir=runs/demo/data --checkpoint frozen \
        --checkpoint runs/demo/rows/tagging_mixture/seed0/pretrain/student_beats.pt --out runs/demo/table3

(after `retain-asd demo`: its evaluation world, its initial encoder as 'frozen', its tagging_mixture student)

Writes <out>/table3.md, <out>/table3.png and an MLflow run `table3` (metrics table3/<method>/<machine>_raw).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import add_config_args, run_analysis


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd table3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="smoke")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="encoder .pt or 'frozen' (model.checkpoint); the first also gives the oracle; repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", type=int, help="encoder layer (default: eval.ssl_layer for 'frozen', else eval.layer)")
    return p


def build(cfg, checkpoints, args):
    from retain_asd.eval.builder import table3_from_config

    result, paths = table3_from_config(cfg, checkpoints, args.out, layer=args.layer)
    return result.markdown(), paths


def main(argv: list[str] | None = None) -> int:
    return run_analysis("retain-asd table3", build_parser(), argv, build)


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd table3"))
