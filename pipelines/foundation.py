"""`retain-asd foundation`: train (once) the stand-in foundation encoder and print where it is cached.

The encoder is a small BEATs pre-trained on clean generic synthetic sounds (never mixtures, never the
evaluation machines), in the official checkpoint layout; it stands where BEATs iter3 stands in the paper.
Its settings are the config's `foundation` section; a second call with the same settings reuses the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.common import add_config_args, config_from_args
from retain_asd.train.foundation import foundation_encoder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd foundation", description=__doc__)
    p.add_argument("--out", default=None, help="cache folder (default: <data.work_dir>/foundation)")
    add_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, "retain-asd foundation")
    if cfg is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else Path(cfg.data.work_dir) / "foundation"
    path = foundation_encoder(cfg.foundation, out, progress=True)
    print(f"use it with: model.checkpoint={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
