"""`retain-asd score`: a deployable detector from a checkpoint and a folder of normal clips.

  retain-asd score bank  --checkpoint X.pt --normal DIR --out bank.pt   embeddings + threshold
  retain-asd score clips --bank bank.pt --clips DIR [--out scores.csv]  score and decision per file

The threshold is the 90th percentile of a gamma fit to the references' leave-one-out kNN scores.
Unreadable audio files are listed per file; they never stop the run.
"""

from __future__ import annotations

import argparse
import csv
import sys

from retain_asd import fsio
from retain_asd.config import EvalConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("bank", help="embed a folder of normal clips and save the reference bank")
    b.add_argument("--checkpoint", required=True, help="encoder checkpoint .pt (BEATs, or EAT / SSLAM)")
    b.add_argument("--normal", required=True, help="folder of normal clips of one machine")
    b.add_argument("--out", required=True, help="bank file to write (.pt)")
    b.add_argument("--layer", type=int, default=EvalConfig.layer,
                   help=f"1-based encoder layer (default: eval.layer, {EvalConfig.layer})")
    b.add_argument("--pooling", default="genrep", choices=("genrep", "mean", "spectral"))
    b.add_argument("--k", type=int, default=1, help="nearest neighbours (default 1)")
    b.add_argument("--metric", default="euclidean", choices=("euclidean", "cosine"))
    b.add_argument("--clip-s", type=float, default=10.0, help="clip length: longer files are cropped")
    b.add_argument("--percentile", type=float, default=0.9, help="gamma-fit quantile of the threshold")
    c = sub.add_parser("clips", help="score a folder of clips against a saved bank")
    c.add_argument("--bank", required=True, help="bank file from `retain-asd score bank`")
    c.add_argument("--clips", required=True, help="folder of clips to score")
    c.add_argument("--checkpoint", help="checkpoint (default: the path stored in the bank)")
    c.add_argument("--out", help="CSV to write (file,score,decision); printed in any case")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from retain_asd.eval.detector import build_reference_bank, score_with_bank
    from retain_asd.eval.knn import MemoryBank

    try:
        if args.action == "bank":
            bank, bad = build_reference_bank(args.checkpoint, args.normal, layer=args.layer, pooling=args.pooling,
                                             k=args.k, metric=args.metric, clip_s=args.clip_s,
                                             percentile=args.percentile)
            bank.save(args.out)
            print(f"{args.out}: {len(bank.meta['files'])} references, layer {args.layer}, "
                  f"threshold {bank.meta['threshold']:.6g}")
        else:
            rows, bad = score_with_bank(MemoryBank.load(args.bank), args.clips, args.checkpoint)
            for name, score, decision in rows:
                print(f"{name},{score:.6g},{decision}")
            if args.out:
                with fsio.atomic_write(args.out, newline="") as f:
                    csv.writer(f, lineterminator="\n").writerows([("file", "score", "decision"), *rows])
    except (FileNotFoundError, ValueError) as err:
        print(f"retain-asd score: {err}", file=sys.stderr)
        return 2
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd score"))
