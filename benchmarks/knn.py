"""Benchmark: exact torch kNN (retain_asd.eval.knn) vs sklearn NearestNeighbors(brute), same run.

    python benchmarks/knn.py [--out benchmarks/results/knn.json] [--device cpu|cuda]

GenRep-sized problem by default: 1,000 references x 6,144 dims (8 x 768 pooled layer), 200 queries,
float64 data. Each repeat times sklearn (fit + kneighbors) and the torch kNN on the same data (the
default float32 candidate search with its error bound and float64 re-measure, and a float64 search),
interleaved so machine load hits all alike; results must agree (ids equal, distances to 1e-6 relative)
or the benchmark fails. `ratio` = sklearn's median time / the default kNN's median time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.neighbors import NearestNeighbors

from retain_asd.eval.knn import knn_distance


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-refs", type=int, default=1000)
    parser.add_argument("--n-queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=6144)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "knn.json"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    bank = rng.normal(size=(args.n_refs, args.dim))  # (M, D) float64
    queries = rng.normal(size=(args.n_queries, args.dim))  # (Q, D)
    bank_t = torch.as_tensor(bank, device=args.device)
    queries_t = torch.as_tensor(queries, device=args.device)

    def run_sklearn():
        nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric=args.metric).fit(bank)
        return nn.kneighbors(queries)

    variants = {
        "sklearn_brute_float64": run_sklearn,
        "torch_float32_search": lambda: knn_distance(queries_t, bank_t, args.k, args.metric),  # the default
        "torch_float64_search": lambda: knn_distance(queries_t, bank_t, args.k, args.metric,
                                                     dtype=torch.float64),
    }
    for _ in range(2):  # warm-up (BLAS threads, allocator, CUDA context)
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        want_d, want_i = None, None
        for name, fn in variants.items():  # interleaved: every repeat sees the same machine load
            seconds, (dist, idx) = _timed(fn, args.device)
            times[name].append(seconds)
            dist, idx = np.asarray(torch.as_tensor(dist).cpu()), np.asarray(torch.as_tensor(idx).cpu())
            if want_d is None:
                want_d, want_i = dist, idx
            else:
                assert np.array_equal(idx, want_i), f"{name}: neighbour ids differ from sklearn"
                assert np.allclose(dist, want_d, rtol=1e-6, atol=0), f"{name}: distances differ from sklearn"

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["sklearn_brute_float64"]
    result = {
        "benchmark": "knn",
        "ratio": base / medians["torch_float32_search"],  # ours over sklearn, same run; higher is better
        "config": {k: getattr(args, k) for k in ("n_refs", "n_queries", "dim", "k", "metric", "repeats",
                                                 "device", "seed")},
        "environment": {"torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "load_average_1min": os.getloadavg()[0],  # other processes skew CPU timings
                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "agree": True,  # asserted above for every repeat
        "seconds": times,
        "median_seconds": medians,
        "speedup_vs_sklearn": {name: base / m for name, m in medians.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {"ratio": result["ratio"], "median_seconds": medians, "speedup_vs_sklearn": result["speedup_vs_sklearn"]}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
