"""Benchmark: exact kNN (retain_asd.eval.knn) vs sklearn NearestNeighbors(brute), same run.

    python benchmarks/knn.py [--out benchmarks/results/knn.json] [--device cpu|cuda]

GenRep-sized problem by default: 1,000 references x 6,144 dims (8 x 768 pooled layer), 200 queries.
Headline: float32 embeddings fed to both sides, as the system feeds them (retain_asd.eval.embed returns
float32). A float64-input row is kept for transparency. Each repeat times sklearn (fit + kneighbors) and
our kNN on the same data (the default float32 candidate search with its error bound and float64
re-measure, and a float64 search), interleaved so machine load hits all alike; results must agree with
sklearn's on the same input (ids equal, distances to 1e-6 relative) or the benchmark fails.
`ratio` = sklearn's median time / our default kNN's median time, on float32 input.
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
from threadpoolctl import threadpool_info

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
    data = {"float64": (rng.normal(size=(args.n_queries, args.dim)), rng.normal(size=(args.n_refs, args.dim)))}
    data["float32"] = tuple(x.astype(np.float32) for x in data["float64"])  # (Q, D), (M, D)
    on_device = {name: tuple(torch.as_tensor(x, device=args.device) for x in pair) for name, pair in data.items()}

    def run_sklearn(kind):
        queries, bank = data[kind]
        return NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric=args.metric).fit(bank).kneighbors(queries)

    def run_ours(kind, dtype=torch.float32):
        queries, bank = on_device[kind]
        return knn_distance(queries, bank, args.k, args.metric, dtype=dtype)

    # name -> (input dtype, function); the first of each input dtype is sklearn, the reference.
    variants = {
        "sklearn_brute_float32_input": ("float32", lambda: run_sklearn("float32")),
        "ours_float32_input": ("float32", lambda: run_ours("float32")),  # the headline
        "sklearn_brute_float64_input": ("float64", lambda: run_sklearn("float64")),
        "ours_float64_input": ("float64", lambda: run_ours("float64")),
        "ours_float64_input_float64_search": ("float64", lambda: run_ours("float64", torch.float64)),
    }
    load_before = os.getloadavg()
    for _ in range(2):  # warm-up (BLAS threads, allocator, CUDA context)
        for _, fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        want: dict[str, tuple] = {}
        for name, (kind, fn) in variants.items():  # interleaved: every repeat sees the same machine load
            seconds, (dist, idx) = _timed(fn, args.device)
            times[name].append(seconds)
            dist, idx = np.asarray(torch.as_tensor(dist).cpu()), np.asarray(torch.as_tensor(idx).cpu())
            if kind not in want:
                want[kind] = dist, idx
            else:
                assert np.array_equal(idx, want[kind][1]), f"{name}: neighbour ids differ from sklearn"
                assert np.allclose(dist, want[kind][0], rtol=1e-6, atol=0), f"{name}: distances differ from sklearn"
    load_after = os.getloadavg()

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = {kind: medians[f"sklearn_brute_{kind}_input"] for kind in data}
    result = {
        "benchmark": "knn",
        # ours over sklearn, same run, float32 embeddings on both sides (what the system feeds); higher is better
        "ratio": base["float32"] / medians["ours_float32_input"],
        "ratio_float64_input": base["float64"] / medians["ours_float64_input"],
        "input_dtype": "float32 (retain_asd.eval.embed returns float32 embeddings); float64 rows for transparency",
        "config": {k: getattr(args, k) for k in ("n_refs", "n_queries", "dim", "k", "metric", "repeats",
                                                 "device", "seed")},
        "environment": {"torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "blas": [{k: lib.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                                 for lib in threadpool_info() if lib.get("user_api") == "blas"],
                        # other processes skew CPU timings: (1, 5, 15 min) load averages before and after
                        "load_average_before": load_before, "load_average_after": load_after,
                        "load_average_1min": load_after[0],
                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "agree": True,  # asserted above for every repeat
        "seconds": times,
        "median_seconds": medians,
        "speedup_vs_sklearn_same_input": {name: base[kind] / medians[name] for name, (kind, _) in variants.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("ratio", "ratio_float64_input", "median_seconds",
                                      "speedup_vs_sklearn_same_input")}
    summary["load_average_after"] = load_after
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
