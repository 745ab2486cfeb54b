"""`retain-asd dcase-score`: score a folder of evaluator-format files against DCASE ground truth.

    retain-asd dcase-score --scores DIR --ground-truth DIR [--json] [--out DIR]
    python -m pipelines.dcase_score --scores DIR --ground-truth DIR [--json]

Per section AUC_source, AUC_target, pAUC (metrics.py) and the official score: one harmonic mean
over all of them, as nttcslab/dcase2023_task2_evaluator computes it.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.common import report_user_error
from retain_asd.eval.dcase_files import score_submission
from retain_asd.eval.metrics import official_score, official_score_interval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retain-asd dcase-score",
        description="Score anomaly_score_<machine>_section_<NN>_test.csv files against an evaluator "
                    "ground-truth folder and print AUC_source, AUC_target, pAUC and the official score.",
    )
    parser.add_argument("--scores", required=True, metavar="DIR",
                        help="folder of anomaly_score_<machine>_section_<NN>_test.csv files (wav_name,score; "
                             "anonymised or full names, any row order; 2021 per-domain pairs accepted)")
    parser.add_argument("--ground-truth", required=True, metavar="DIR",
                        help="evaluator folder with ground_truth_data/, ground_truth_domain/ (2022+) and "
                             "optionally ground_truth_attributes/ (maps full names to anonymised ones)")
    parser.add_argument("--out", metavar="DIR",
                        help="also write DIR/result.csv in the official evaluator's result layout (precision, recall "
                             "and F1 from decision_result_*.csv files beside the scores, when present)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"official_score": ..., "sections": [...]} '
                             "instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = score_submission(args.scores, args.ground_truth)
    except (OSError, ValueError) as err:
        return report_user_error("retain-asd dcase-score", err)
    official = official_score([r.score for r in results])
    if args.out:
        from pathlib import Path

        from retain_asd.eval.dcase_files import write_result_csv

        path = write_result_csv(results, Path(args.out) / "result.csv")
        print(f"evaluator result layout: {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        sections = [{"machine": r.machine, "section": r.section, "auc_source": r.score.auc_source,
                     "auc_target": r.score.auc_target, "pauc": r.score.pauc} for r in results]
        print(json.dumps({"official_score": official, "sections": sections}))
        return 0
    print(f"{'machine':<12} {'section':>7} {'AUC_s':>7} {'AUC_t':>7} {'pAUC':>7} {'hmean':>7}")
    for r in results:
        s = r.score
        print(f"{r.machine:<12} {r.section:>7} {s.auc_source:7.4f} {s.auc_target:7.4f} "
              f"{s.pauc:7.4f} {s.hmean:7.4f}")
    line = f"official score (hmean over {3 * len(results)} values): {official:.4f}"
    if len(results) >= 2:
        ci = official_score_interval([r.score for r in results])
        line += f"  95% CI (leave-one-section-out jackknife) [{ci.low:.4f}, {ci.high:.4f}]"
    print(line)
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd dcase-score"))
