"""`retain-asd table3`: the testbed check (the paper's Table 3) of an encoder on the evaluation sets.

At every condition (Factory A, Factory B, Mismatch) and SNR (`--snrs`, default -5 0 5 dB), without domain
normalisation: the first encoder on the wave mixture against its embedding-mixture oracle
lam * E(clean) + (1 - lam) * E(noise) (same clips, same scaled noise), the official score over machines, with
a 95% paired-bootstrap interval over the test clips and references; any further encoders on the wave mixture.
The method rests on the oracle beating the wave mixture (paper, BEATs, Mismatch 0 dB: 73.6 against 60.4).

    retain-asd table3 --preset synthetic_table2 --checkpoint frozen --out t3
    retain-asd table3 --preset demo data.work_dir=runs/demo/data --checkpoint frozen \
        --checkpoint runs/demo/rows/tagging_mixture/seed0/pretrain/student_beats.pt --out runs/demo/table3

Writes <out>/table3.md, <out>/table3.json (the same figures), <out>/table3.png and an MLflow run `table3`
(metrics table3/<condition>_<snr>db/<wave|oracle|diff>_raw).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import add_config_args, run_analysis


def _draws(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 0")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd table3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="smoke")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="encoder .pt or 'frozen' (model.checkpoint); the first also gives the oracle; repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", type=int, help="encoder layer (default: eval.layer)")
    p.add_argument("--snrs", type=float, nargs="+", default=None, metavar="DB",
                   help="SNRs of the cells (default: -5 0 5; each must be in eval.snrs_db)")
    p.add_argument("--resamples", type=_draws, default=200, help="bootstrap draws of the intervals (default 200)")
    return p


def build(cfg, checkpoints, args):
    from retain_asd.eval.builder import table3_from_config

    result, paths = table3_from_config(cfg, checkpoints, args.out, layer=args.layer, snrs_db=args.snrs,
                                       resamples=args.resamples)
    return result.markdown() + "\n" + result.testbed_line(), paths


def main(argv: list[str] | None = None) -> int:
    return run_analysis("retain-asd table3", build_parser(), argv, build)


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd table3"))
