"""`retain-asd ingest`: raw corpus folders -> Parquet shards + manifest + rejects + labels.json.

With no --machine-root/--noise-root the synthetic corpus (the embedded default) is written and ingested.
Re-running on unchanged input is a no-op; a changed file rebuilds the shards.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from pipelines.common import add_config_args, config_from_args
from retain_asd.runtime import init_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine-root", help="DCASE 2020-2025 / MIMII DG / ToyADMOS2 folder (default: synthetic)")
    p.add_argument("--noise-root", help="noise folder <root>/<category>/*.wav + categories.yaml")
    p.add_argument("--out", help="work folder (default: data.work_dir of the config)")
    add_config_args(p)
    p.add_argument("--rows-per-shard", type=int, help="Parquet rows per shard file")
    p.add_argument("--force", action="store_true", help="rebuild even when the input is unchanged")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from retain_asd.corpus.ingest import corpus_from_config
    from retain_asd.corpus.names import LayoutError

    cfg = config_from_args(args, "retain-asd ingest")
    if cfg is None:
        return 2
    data = replace(cfg.data, machine_root=args.machine_root or cfg.data.machine_root,
                   noise_root=args.noise_root or cfg.data.noise_root, work_dir=args.out or cfg.data.work_dir,
                   rows_per_shard=args.rows_per_shard or cfg.data.rows_per_shard)
    init_ray(args.address)
    try:
        corpus = corpus_from_config(data, force=args.force)
    except (LayoutError, FileExistsError) as err:
        print(f"retain-asd ingest: {err}", file=sys.stderr)
        return 2
    print(corpus.summary())
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd ingest"))
