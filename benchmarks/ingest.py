"""Ingestion throughput: clips/s of the Ray Data ingest (parallel decode + write_parquet) against a plain
serial loop (soundfile decode + one pyarrow write) over the same files, in the same process.

    python benchmarks/ingest.py [--clips-per-machine N] [--out benchmarks/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retain_asd.audio import load_clip
from retain_asd.corpus import layouts, shards
from retain_asd.corpus.synth import write_synthetic_corpus
from retain_asd.runtime import init_ray, set_data_progress


def serial_baseline(records, out: Path) -> float:
    start = time.perf_counter()
    clips = [load_clip(r.path).samples for r in records]
    audio = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(clips)), len(clips[0]))
    table = pa.table({"path": [r.path for r in records], "audio": audio})
    pq.write_table(table, out / "serial.parquet")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ingest.json")
    args = p.parse_args()
    init_ray(quiet=True)
    set_data_progress(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_synthetic_corpus(tmp / "synth", seed=args.seed)
        records = layouts.scan_dcase(corpus.machine_root).records
        ray_s, serial_s = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            shards.write_shards(records, tmp / f"ray{i}", force=True)
            ray_s.append(time.perf_counter() - start)
            (tmp / f"serial{i}").mkdir()
            serial_s.append(serial_baseline(records, tmp / f"serial{i}"))
    n = len(records)
    result = {
        "benchmark": "ingest", "clips": n, "clip_s": 10.0, "machine": platform.machine(),
        "ray_data_clips_per_s": n / min(ray_s), "serial_clips_per_s": n / min(serial_s),
        "ratio_ray_over_serial": min(serial_s) / min(ray_s), "ray_s": ray_s, "serial_s": serial_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
