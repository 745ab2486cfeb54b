"""`retain-asd evaluate`: score checkpoints (or the frozen BEATs) on the eval sets, log to MLflow.

Each --checkpoint (a BEATs .pt, or `frozen` = model.checkpoint of the config, evaluated at layer 12) gets
one MLflow run with every figure (per condition x SNR, raw and with domain normalisation, Table-2
hmeans), and `--out DIR/<name>/` gets Table 2 (markdown, CSV), plots and evaluator-format score files.
With --dcase-root the checkpoints are scored GenRep-style on a DCASE 2020-2026 folder instead (docs/dcase.md),
on the channel data.channel of stereo files (DCASE 2026: 0 near mic, 1 far mic), or on several with --channels.

A registered student is a --checkpoint too: models:/NAME/VERSION or models:/NAME@ALIAS (a sweep registers its
best trial's as models:/retain-asd-<tracking.experiment>/<N>, alias @best), read from the registry of
tracking.tracking_uri (default: <data.work_dir>/mlflow.db); its row is NAME-v<N> and its run's `checkpoint` tag
the version's URI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.common import add_config_args, fail, protocol_guard, quiet_run, report_user_error


def parse_layers(text: str) -> list[int]:
    """'1-12' -> [1..12]; '2,4,6' -> [2, 4, 6] (1-based)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="encoder checkpoint .pt (BEATs, or EAT / SSLAM in the fairseq layout; or a folder with one), "
                        "a URI of either in data.storage (s3://...), a registered student (models:/NAME/VERSION, "
                        "models:/NAME@ALIAS), or 'frozen' (model.checkpoint); NAME=... names the row; repeatable")
    p.add_argument("--out", required=True, help="output folder for tables, plots and score files")
    p.add_argument("--layers", type=parse_layers, help="also evaluate these layers, e.g. 1-12 (Fig. 2)")
    p.add_argument("--dcase-root", help="evaluate on a DCASE 2020-2026 folder instead of the eval sets")
    p.add_argument("--channels", type=lambda t: t.split(","),
                   help="with --dcase-root: score these channels of the same clips, e.g. 0,1 (DCASE 2026 near and "
                        "far mic) and print them side by side per machine (default: data.channel)")
    p.add_argument("--ground-truth", help="evaluator ground-truth folder for DCASE eval data (with --dcase-root)")
    p.add_argument("--ray", action="store_true", help="embed with a Ray Data actor pool (GPU when present)")
    p.add_argument("--address", help="Ray cluster address (with --ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs and warnings on the console "
                   "(default: in <out>/evaluate.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from retain_asd.config import ConfigError, load_config
    from retain_asd.corpus.ingest import check_evaluation_corpus
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.eval.evalsets import scored_on_line
    from retain_asd.experiments import resolve_checkpoints

    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        if not args.dcase_root:  # before any work: scores on the synthetic world only on purpose
            check_evaluation_corpus(cfg)
    except ConfigError as err:
        return fail("retain-asd evaluate", err)
    if args.ray and not args.dcase_root and not protocol_guard(cfg, "retain-asd evaluate"):  # before Ray starts
        return 2
    if args.channels and not args.dcase_root:
        print("retain-asd evaluate: --channels needs --dcase-root (the eval sets are mono)", file=sys.stderr)
        return 2
    if bad := [c for c in args.channels or () if c != "mean" and not c.isdigit()]:
        print(f"retain-asd evaluate: --channels {','.join(args.channels)}: {bad[0]!r} is not a channel index or "
              "'mean'", file=sys.stderr)
        return 2
    try:  # a bad checkpoint, path or corpus is a user error: one line (--debug for the traceback)
        with quiet_run(Path(args.out) / "evaluate.log", args.verbose, address=args.address, start_ray=args.ray):
            checkpoints = resolve_checkpoints(cfg, args.checkpoint, args.out)  # "frozen": the initial encoder
            results = evaluate_from_config(cfg, checkpoints, args.out, layers=args.layers, use_ray=args.ray,
                                           dcase_root=args.dcase_root, ground_truth_dir=args.ground_truth,
                                           channels=args.channels)
    except Exception as err:
        return report_user_error("retain-asd evaluate", err)
    for r in results:
        m = r.metrics()
        p = cfg.eval.primary
        figures = {k: m[k] for k in (f"hmean_low_primary_{p}", f"hmean_all_primary_{p}", "hmean_low", "hmean_all",
                                     "hmean_low_dn", "hmean_all_dn") if k in m}
        figures = figures or {k: v for k, v in m.items() if k.startswith("dcase/official")}
        note = ""
        if args.dcase_root:
            from retain_asd.eval.dcase_mode import source_only, where

            note = f"  [{where(r)}]" + ("  (source domain only: AUC + pAUC, no target AUC)" if source_only(r) else "")
        print(f"{r.name}: " + "  ".join(f"{k}={100 * v:.2f}" for k, v in figures.items()) + note
              + (f"  [{scored_on_line(r.scored_on)}]" if r.scored_on and not args.dcase_root else ""))
    if args.dcase_root and args.channels and len(args.channels) > 1:
        from retain_asd.eval.dcase_mode import channels_side_by_side

        n = len(args.channels)
        for start in range(0, len(results), n):
            print("\n" + channels_side_by_side(results[start:start + n], cfg.eval.primary == "dn"))
    print(f"tables, plots and score files under {args.out}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd evaluate"))
