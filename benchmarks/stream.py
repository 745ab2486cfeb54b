"""Throughput of the training stream: mixed 10 s clips/s through Ray Data against a plain numpy loop.

    python benchmarks/stream.py [--epochs 8] [--batch-size 64] [--out benchmarks/results/stream.json]
                                [--cpus-per-node 1] [--skip-two-nodes]

Both sides read the same shards of a synthetic corpus (written once under --work) and mix at random
SNRs: the stream through `iter_train_batches` (torch tensors, after a warm-up), the baseline as one
process reading each shard with pyarrow and calling `mixing.mix_at_snr` per clip. A per-stage profile
(parquet decode, noise segments, Eq. 3 in float64 vs float32, Arrow->torch) says where the time goes.

Scale-out (`bench_stream_scale_out`): the same stream on a simulated cluster (`ray.cluster_utils.Cluster`,
separate raylets and object stores on this machine) with one node, then two nodes of the same size; the
driver consumes on the head node, so the second node's blocks cross object stores. Reported as
clips/s of each and `ratio_two_nodes_over_one`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from retain_asd import mixing, stream
from retain_asd.corpus import shards
from retain_asd.runtime import init_ray, set_data_progress

SNR = {"kind": "uniform", "low_db": -5.0, "high_db": 5.0}


def make_corpus(work: Path, per_attr: int):
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.synth import write_synthetic_corpus

    synth = write_synthetic_corpus(work / "synth", seed=0, machines=("fan", "pump"),
                                   train_source_per_attr=per_attr, train_target_per_attr=2, test_per_domain=1,
                                   noise_clips_per_category=3, noise_clip_s=30.0)
    return ingest(synth.machine_root, synth.noise_root, work / "corpus", rows_per_shard=32)


def bench_stream(corpus, epochs: int, batch_size: int, warmup_batches: int) -> dict:
    plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler=SNR, seed=0, num_epochs=epochs)
    clips, t0 = 0, None
    for i, batch in enumerate(stream.iter_train_batches(plan.dataset.iterator(), batch_size, seed=0)):
        if i == warmup_batches:
            t0, clips = time.perf_counter(), 0
        clips += int(batch["mixture"].shape[0])
    seconds = time.perf_counter() - t0
    return {"clips": clips, "seconds": seconds, "clips_per_s": clips / seconds,
            "rows_planned": plan.num_rows, "warmup_batches": warmup_batches}


def bench_numpy(corpus, epochs: int) -> dict:
    """One process: pyarrow read per shard, a random noise segment and mix_at_snr per clip."""
    state = stream.build_stream_state(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                      snr_sampler=SNR, seed=0, class_weighted=False)
    bank, rng = state.bank, np.random.default_rng(0)
    clips, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for path in state.clean.files:
            matrix = shards.audio_matrix(pq.read_table(path, columns=["audio"]))
            for x1 in matrix:
                j = int(rng.integers(len(bank)))
                offset = int(stream.noise_offsets(bank.lengths[j : j + 1], len(x1), rng)[0])
                x2 = mixing.noise_segment(bank.recording(j), offset, len(x1))
                mixing.mix_at_snr(x1, x2, float(rng.uniform(-5, 5)))
                clips += 1
    seconds = time.perf_counter() - t0
    return {"clips": clips, "seconds": seconds, "clips_per_s": clips / seconds}


def profile_stages(corpus, repeats: int = 3) -> dict:
    """Milliseconds per 10 s clip of each stage, single process."""
    import torch

    files = sorted((corpus.root / "machine").glob("*.parquet"))
    t = time.perf_counter()
    rows = 0
    for _ in range(repeats):
        for f in files:
            rows += len(shards.audio_matrix(pq.read_table(f, columns=["audio"])))
    decode = (time.perf_counter() - t) / rows
    x = shards.audio_matrix(pq.read_table(files[0], columns=["audio"]))[:32].copy()  # (32, S)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    snr = rng.uniform(-5, 5, len(x))

    def per_clip(fn, n=5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / (n * len(x))

    out = {
        "parquet_decode_ms": 1e3 * decode,
        "mix_at_snr_float64_ms": 1e3 * per_clip(lambda: [mixing.mix_at_snr(a, b, s) for a, b, s in
                                                          zip(x, noise, snr, strict=True)]),
        "mix_batch_float32_ms": 1e3 * per_clip(lambda: mixing.mix_batch_at_snr(x, noise, snr)),
        # a row carries 3 clip-length arrays (mixture, clean, noise): one copy of each into a batch
        "batch_copy_3_arrays_ms": 1e3 * per_clip(lambda: torch.tensor(np.concatenate([x, x, x]))),
    }
    return out


def _simulated_cluster(num_nodes: int, cpus_per_node: int):
    """`num_nodes` raylets on this machine (own ports, 256 MiB object store each), the driver on the head."""
    import socket

    import ray
    from ray.cluster_utils import Cluster

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def node(**more) -> dict:
        return {"num_cpus": cpus_per_node, "object_store_memory": 256 * 1024**2, "node_ip_address": "127.0.0.1",
                "metrics_export_port": port(), "runtime_env_agent_port": port(), **more}

    cluster = Cluster(initialize_head=True, head_node_args=node(include_dashboard=False, gcs_server_port=port(),
                                                                dashboard_agent_listen_port=port()))
    for _ in range(num_nodes - 1):
        cluster.add_node(**node())
    cluster.wait_for_nodes()
    cluster.connect()
    set_data_progress(False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == num_nodes
    return cluster


def bench_stream_scale_out(corpus, epochs: int, batch_size: int, warmup_batches: int,
                           cpus_per_node: int = 1) -> dict:
    """Stream clips/s on a simulated 1-node cluster, then on 2 nodes of the same size: the scaling ratio.

    Call with no Ray running in this process (each side starts and stops its own cluster).
    """
    import ray

    out = {"cpus_per_node": cpus_per_node}
    for num_nodes in (1, 2):
        cluster = _simulated_cluster(num_nodes, cpus_per_node)
        try:
            out[f"nodes_{num_nodes}"] = bench_stream(corpus, epochs, batch_size, warmup_batches)
        finally:
            ray.shutdown()
            cluster.shutdown()
    out["ratio_two_nodes_over_one"] = out["nodes_2"]["clips_per_s"] / out["nodes_1"]["clips_per_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/retain_asd_bench_stream", help="corpus cache folder")
    parser.add_argument("--per-attr", type=int, default=8, help="synthetic source clips per attribute")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.json"))
    parser.add_argument("--cpus-per-node", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="CPUs of each simulated node in the 1- vs 2-node comparison")
    parser.add_argument("--skip-two-nodes", action="store_true", help="leave out the simulated 2-node run")
    args = parser.parse_args(argv)

    init_ray(num_cpus=os.cpu_count(), quiet=True)
    set_data_progress(False)
    corpus = make_corpus(Path(args.work), args.per_attr)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "profile_ms_per_clip": profile_stages(corpus),
        "numpy_loop": bench_numpy(corpus, args.epochs),
        "ray_stream": bench_stream(corpus, args.epochs, args.batch_size, args.warmup_batches),
    }
    result["clips_per_epoch"] = result["ray_stream"]["rows_planned"] // args.epochs
    ray_s, numpy_s = result["ray_stream"]["clips_per_s"], result["numpy_loop"]["clips_per_s"]
    result["ratio_stream_over_numpy"] = ray_s / numpy_s
    if not args.skip_two_nodes:
        import ray

        ray.shutdown()  # the scale-out figure runs on its own simulated clusters
        result["scale_out"] = bench_stream_scale_out(corpus, args.epochs, args.batch_size, args.warmup_batches,
                                                     args.cpus_per_node)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
