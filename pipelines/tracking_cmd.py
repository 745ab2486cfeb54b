"""`retain-asd tracking backfill --out RUN_DIR`: finish a pre-training run's MLflow record after the server was down.

Pre-training logs its metrics to MLflow from a background buffer that retries while the server is away, and at
the end of the run back-fills from <out>/metrics.jsonl whatever did not arrive. When the server is still down
at the end, the run finishes anyway (exit code 0) and says so; this command, once the server is back, logs the
metric values the run lacks, the artifacts (config.yaml, summary.json, student_beats.pt) and tags, and marks
the run FINISHED. Running it again logs nothing new; the next `pretrain` of the same folder does the same.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd tracking", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("backfill", help="log what a pre-training run could not log while MLflow was down")
    b.add_argument("--out", required=True, help="the output folder of the `retain-asd pretrain` run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from retain_asd.train.launch import backfill_run

    done = backfill_run(args.out)
    print(f"{args.out}: {done['backfilled']} metric values back-filled from metrics.jsonl to MLflow run "
          f"{done['run_id']} at {done['tracking_uri']}; artifacts and status logged")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd tracking"))
