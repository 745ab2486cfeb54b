"""Ingestion throughput: clips/s of the Ray Data ingest (parallel decode + hash + one Parquet shard per task)
against a plain serial loop (soundfile decode + one pyarrow write) over the same files, in the same process.

Two sizes, so both the fixed cost (Ray Data start-up, small corpus) and the scaling (2,000 clips) show:
the synthetic corpus (162 clips) and a 2,000-clip corpus made of hard links to its files under new
section numbers (same bytes, distinct paths; generating 2,000 synthetic clips would take minutes).
Warm-up first, then the two paths interleaved per repeat; the figure is the best repeat of each.
`ratio` = serial seconds / Ray Data seconds at the largest size.

    python benchmarks/ingest.py [--sizes 162 2000] [--repeats 3] [--out benchmarks/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import os
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


def replicate(machine_root: Path, out: Path, clips: int) -> list:
    """At least `clips` records: hard links to the corpus's files, one copy per section number."""
    machine_root = Path(machine_root)
    records = layouts.scan_dcase(machine_root).records
    copies = -(-clips // len(records))
    for section in range(copies):
        for path in machine_root.rglob("*.wav"):
            dest = out / path.relative_to(machine_root).parent / path.name.replace(
                "section_00_", f"section_{section:02d}_")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dest)
    return layouts.scan_dcase(out).records[:clips]


def measure(records, tmp: Path, repeats: int) -> dict:
    ray_s, serial_s = [], []
    for i in range(repeats):  # interleaved: both paths see the same machine load
        start = time.perf_counter()
        shards.write_shards(records, tmp / f"ray{i}", force=True)
        ray_s.append(time.perf_counter() - start)
        (tmp / f"serial{i}").mkdir()
        serial_s.append(serial_baseline(records, tmp / f"serial{i}"))
    n = len(records)
    return {"clips": n, "ray_data_clips_per_s": n / min(ray_s), "serial_clips_per_s": n / min(serial_s),
            "ratio": min(serial_s) / min(ray_s), "ray_s": ray_s, "serial_s": serial_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", default=[162, 2000], help="clips per measured corpus")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/ingest.json")
    args = p.parse_args()
    init_ray(quiet=True)
    set_data_progress(False)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_synthetic_corpus(tmp / "synth", seed=args.seed)
        small = layouts.scan_dcase(corpus.machine_root).records
        shards.write_shards(small[:16], tmp / "warmup", force=True)  # Ray Data start-up, worker imports
        for n in sorted(args.sizes):
            records = small[:n] if n <= len(small) else replicate(corpus.machine_root, tmp / f"raw{n}", n)
            sizes[str(len(records))] = measure(records, tmp / f"size{n}", args.repeats)
            print(f"{len(records)} clips: Ray Data {sizes[str(len(records))]['ray_data_clips_per_s']:.1f} clips/s, "
                  f"serial {sizes[str(len(records))]['serial_clips_per_s']:.1f}, "
                  f"ratio {sizes[str(len(records))]['ratio']:.2f}")
    largest = sizes[max(sizes, key=int)]
    result = {
        "benchmark": "ingest", "ratio": largest["ratio"], "clips": largest["clips"], "clip_s": 10.0,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other processes skew CPU timings
        "sizes": sizes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=1))


if __name__ == "__main__":
    main()
