"""`retain-asd demo`: the embedded default end to end on one machine.

synthetic pre-training + evaluation worlds (disjoint, paper Sec. 4.1) -> Parquet shards (Ray Data) ->
retain-not-denoise pre-training on the pre-training world (Ray Train, 2 DDP workers, tiny encoder) ->
Factory A / B / Mismatch eval sets of the evaluation world -> frozen vs. student scores (Table-2 layout) -> MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args
from retain_asd.runtime import init_ray
from retain_asd.tracking import resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    add_config_args(p, default_preset="smoke")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    cfg = config_from_args(args, "retain-asd demo", first=[f"data.work_dir={out / 'data'}"])
    if cfg is None:
        return 2
    from retain_asd.corpus.ingest import check_protocol, corpora_from_config
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.train.launch import pretrain

    check_protocol(cfg)  # the leakage guard, before Ray starts
    init_ray()
    print("== 1/3 corpora: the synthetic pre-training and evaluation worlds -> Parquet shards", flush=True)
    corpus, eval_corpus, report = corpora_from_config(cfg)
    print(corpus.summary(), flush=True)
    print(eval_corpus.summary(), flush=True)
    print(f"protocol: {report.describe()}", flush=True)
    print(f"== 2/3 pre-training '{cfg.name}' ({cfg.objective.name}, {cfg.train.total_steps} steps, "
          f"{cfg.train.num_workers} workers)", flush=True)
    result = pretrain(cfg, out / "pretrain", corpus=corpus, protocol=report)
    print(f"student: {result.student_path}", flush=True)
    print("== 3/3 evaluation: frozen encoder vs. student on Factory A / B / Mismatch", flush=True)
    evaluate_from_config(cfg, ["frozen", str(result.student_path)], out / "evaluate")
    table = out / "evaluate" / "table2.md"
    if table.is_file():
        print(table.read_text())
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    print(f"MLflow runs: {uri}  (mlflow ui --backend-store-uri {uri})")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd demo"))
