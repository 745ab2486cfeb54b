"""`retain-asd compare`: the paper's Table 2 across the runs of an MLflow experiment.

    retain-asd compare --experiment demo --tracking-uri runs/demo/data/mlflow.db   (after `retain-asd demo`)
    retain-asd compare --experiment retain-asd
    retain-asd compare --experiment retain-asd-sweep --metric hmean_low_dn
    retain-asd compare --experiment retain-asd --runs "tags.preset LIKE 'tagging%'"

Rows are the evaluation runs grouped by preset (or sweep trial), mean ± 95% interval over seeds; columns
condition x SNR, hmean{-10,-5,0} and All, for raw kNN scores and DN (the one --metric names is primary).
Prints the markdown, writes comparison.md / comparison.csv / one SNR-curve PNG per condition under --out,
and logs them as a `compare` run in the same experiment. The store: --tracking-uri, else the config's
tracking.tracking_uri, else the SQLite store under data.work_dir (what pretrain / evaluate used); a path to a
.db file is that SQLite store. A store that does not exist is an error: compare never creates one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. retain-asd, retain-asd-sweep)")
    p.add_argument("--runs", default="", metavar="FILTER",
                   help="MLflow search filter, e.g. \"tags.preset LIKE 'tagging%%'\" or \"params.train.seed = '0'\"")
    p.add_argument("--metric", default="hmean_low",
                   choices=("hmean_low", "hmean_all", "hmean_low_dn", "hmean_all_dn"),
                   help="ranking figure; a _dn metric makes the DN table primary (default: %(default)s)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                   help="MLflow store: PATH/mlflow.db, sqlite:///PATH or http://HOST:PORT (default: "
                        "$MLFLOW_TRACKING_URI or the config's store)")
    p.add_argument("--out", help="output folder (default: <data.work_dir>/compare/<experiment>)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison as an MLflow run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd compare")
    if cfg is None:
        return 2
    from retain_asd.eval.compare import compare_experiment
    from retain_asd.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri or cfg.tracking.tracking_uri, cfg.data.work_dir, create=False)
    out = Path(args.out) if args.out else Path(cfg.data.work_dir) / "compare" / args.experiment
    result = compare_experiment(args.experiment, tracking_uri=uri, out_dir=out, runs=args.runs,
                                metric=args.metric, log_run=not args.no_log)
    print(result.markdown)
    print(f"written under {out}: " + ", ".join(p.name for p in result.paths))
    if result.run_id:
        print(f"MLflow comparison run: {result.run_id}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd compare"))
