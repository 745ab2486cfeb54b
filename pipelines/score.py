"""`retain-asd score`: a deployable detector from a checkpoint and a folder of normal clips.

  retain-asd score bank  --checkpoint X.pt --normal DIR --out bank.pt   embeddings + threshold
  retain-asd score clips --bank bank.pt --clips DIR [--out scores.csv]  score and decision per file

--checkpoint also takes a registered student, models:/NAME/VERSION or models:/NAME@ALIAS (a sweep registers its
best as models:/retain-asd-<tracking.experiment>@best), read from the registry of tracking.tracking_uri (default:
<data.work_dir>/mlflow.db) and cached under <data.work_dir>/checkpoints/models/.

A bank holds normal clips only: given a DCASE machine folder it reads `train/` (never `test/`), and it skips
files named anomaly_* (2021+: *_anomaly_*). The threshold is the 90th percentile (--percentile) of a gamma fit
to the references' leave-one-out kNN scores. Clips are read as the bank's were (16 kHz mono, cropped or padded
to data.clip_s); what that changed is a column per file. A silent file is scored and flagged; an unreadable one
is skipped and counted. Both take the config (--preset, --config, KEY=VALUE, e.g. data.min_clip_s=0.5).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args, report_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("bank", help="embed a folder of normal clips and save the reference bank")
    b.add_argument("--checkpoint", required=True, help="encoder checkpoint .pt (BEATs, or EAT / SSLAM), or a "
                                                       "registered student: models:/NAME/VERSION, models:/NAME@ALIAS")
    b.add_argument("--normal", required=True, action="append",
                   help="normal clips of one machine: a folder (a DCASE machine folder: its train/), or a file; "
                        "repeatable")
    b.add_argument("--out", required=True, help="bank file to write (.pt)")
    b.add_argument("--layer", type=int, help="1-based encoder layer (default: eval.layer, or the checkpoint's last "
                                             "layer when it has fewer)")
    b.add_argument("--pooling", choices=("genrep", "mean", "spectral"), help="default: eval.pooling")
    b.add_argument("--k", type=int, help="nearest neighbours (default: eval.k)")
    b.add_argument("--metric", choices=("euclidean", "cosine"), help="default: eval.metric")
    b.add_argument("--clip-s", type=float, help="clip length in seconds: longer files are cropped, shorter padded "
                                                "(default: data.clip_s)")
    b.add_argument("--percentile", type=float, default=90.0,
                   help="threshold: this percentile (0-100) of the gamma fit (default: %(default)s)")
    add_config_args(b)
    c = sub.add_parser("clips", help="score a folder of clips against a saved bank")
    c.add_argument("--bank", required=True, help="bank file from `retain-asd score bank`")
    c.add_argument("--clips", required=True, help="folder of clips to score (subfolders too), or one file")
    c.add_argument("--checkpoint", help="checkpoint, or models:/NAME/VERSION (default: the one stored in the bank)")
    c.add_argument("--out", help="CSV to write (file, score, decision, status, source_rate_hz, source_s, repairs); "
                                 "printed in any case")
    add_config_args(c)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd score")
    if cfg is None:
        return 2
    try:
        return bank(args, cfg) if args.action == "bank" else clips(args, cfg)
    except (OSError, ValueError) as err:
        return report_user_error("retain-asd score", err)


def bank(args, cfg) -> int:
    from retain_asd.config import check_layer
    from retain_asd.eval.detector import ReadPolicy, build_reference_bank, normal_clips
    from retain_asd.eval.embed import Embedder
    from retain_asd.experiments.checkpoints import checkpoint_file

    e, d = cfg.eval, cfg.data
    selection = normal_clips(args.normal)  # a wrong folder or an anomaly_* file: said before the model loads
    pooling = args.pooling or e.pooling
    checkpoint, model_uri = checkpoint_file(args.checkpoint, cfg)  # models:/...: the registered student's copy
    embedder = Embedder(checkpoint, pooling=pooling, batch_size=e.batch_size)
    depth = embedder.model.num_layers
    layer = args.layer
    if layer is None:
        layer = e.layer
        if layer > depth:
            print(f"eval.layer {layer} is beyond the {depth} layers of {args.checkpoint}: using layer {depth} "
                  "(choose one with --layer)")
            layer = depth
    check_layer(layer, depth, "--layer", args.checkpoint)
    policy = ReadPolicy(d.sample_rate_hz, args.clip_s or d.clip_s, d.min_clip_s, d.pad_mode, d.channel)
    bank, selection, bad = build_reference_bank(checkpoint, selection, layer=layer, pooling=pooling,
                                                k=args.k or e.k, metric=args.metric or e.metric, policy=policy,
                                                percentile=args.percentile, embedder=embedder, model_uri=model_uri)
    for line in selection.describe():
        print(line)
    for r in bad:
        print(f"skipped {r.error}", file=sys.stderr)
    if args.percentile <= 1:
        print(f"warning: --percentile {args.percentile:g} is the {args.percentile:g}th percentile: almost every clip "
              "will be flagged (for the 90th pass 90)", file=sys.stderr)
    bank.save(args.out)
    meta = bank.meta
    print(f"{args.out}: {len(meta['files'])} references" + (f" embedded by {model_uri}" if model_uri else "")
          + f", layer {layer}, threshold {meta['threshold']:.6g} "
          f"({args.percentile:g}th percentile of a gamma fit to their leave-one-out scores)"
          + (f"; {len(bad)} file(s) skipped" if bad else ""))
    return 0


def clips(args, cfg) -> int:
    from retain_asd import fsio
    from retain_asd.eval.detector import CSV_COLUMNS, csv_row, score_with_bank, skip_counts, summary
    from retain_asd.eval.knn import MemoryBank
    from retain_asd.experiments.checkpoints import checkpoint_file

    bank = MemoryBank.load(args.bank)
    meta = bank.meta
    checkpoint = args.checkpoint
    if checkpoint is None and meta.get("model_uri") and not Path(meta["checkpoint"]).is_file():
        checkpoint = meta["model_uri"]  # the registered student's cached copy is gone: fetched again
    checkpoint = checkpoint and checkpoint_file(checkpoint, cfg)[0]
    scored, bad = score_with_bank(bank, args.clips, checkpoint, batch_size=cfg.eval.batch_size,
                                  min_clip_s=cfg.data.min_clip_s)
    for r in bad:
        print(f"skipped {r.error}", file=sys.stderr)
    if not scored:
        reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(skip_counts(bad).items()))
        print(f"retain-asd score: 0 clips scored in {args.clips}: "
              + (f"{len(bad)} file(s) skipped ({reasons})" if bad else "no .wav / .flac files there"), file=sys.stderr)
        return 2
    print(f"bank {args.bank}: {len(meta['files'])} references, layer {meta['layer']}, "
          f"threshold {meta['threshold']:.6g}")
    rows = [csv_row(c) for c in scored]
    print(",".join(CSV_COLUMNS))
    for row in rows:
        print(",".join(str(x) for x in row))
    if args.out:
        with fsio.atomic_write(args.out, newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([CSV_COLUMNS, *rows])
    print(summary(scored, bad, meta["threshold"]) + (f"; written to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd score"))
