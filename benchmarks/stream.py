"""Throughput of the training stream: mixed 10 s clips/s through Ray Data against a torch DataLoader.

    python benchmarks/stream.py [--epochs 24] [--batch-size 64] [--repeats 3] [--out benchmarks/results/stream.json]
                                [--cpus-per-node 1] [--skip-two-nodes] [--skip-variants]

Both sides read the same int16 shards of a synthetic corpus (written once under --work, shuffled across
machine types as `ingest` writes them) and mix at random SNRs: the stream consumed as the training loop
consumes it (`loop.BATCH_COLUMNS` through `iter_train_batches`: torch tensors of clean, noise and mixture,
formed on the consumer from the compact rows, after a warm-up), the baseline as a user would write it without
Ray: a `torch.utils.data.DataLoader` with 2 worker processes over the same shards (`ShardClips`: pyarrow read,
a noise segment and an SNR per clip, float32 Eq. 3 per shard, batches of the same size). Each repeat measures
both, in alternating order, so a ratio is always taken within one repeat on the same (shared) machine;
`ratio` is the median over repeats. The load average at the start and end is in the JSON.

Also measured (each against the DataLoader of its own repeat): the scaling with 1 and 2 concurrent
read/mix tasks; float32 shards; one shard per work unit on path-ordered shards (the stream before
well-mixed batches); the smaller blocks of 32 rows; `preserve_order` (the deterministic split `build_trainer`
uses). A per-stage profile (parquet decode, the gains' powers, forming the audio on the consumer into fresh or
reused buffers) says where the time goes.

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
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from retain_asd import mixing, stream
from retain_asd.corpus import shards
from retain_asd.runtime import init_ray, set_data_progress, usable_cpus

SNR = {"kind": "uniform", "low_db": -5.0, "high_db": 5.0}


def make_corpus(work: Path, per_attr: int, audio_dtype: str = "int16", shuffle_seed: int | None = 0):
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings
    from retain_asd.corpus.synth import write_synthetic_corpus

    synth = write_synthetic_corpus(work / "synth", seed=0, machines=("fan", "pump"),
                                   train_source_per_attr=per_attr, train_target_per_attr=2, test_per_domain=1,
                                   noise_clips_per_category=3, noise_clip_s=30.0)
    order = "path" if shuffle_seed is None else f"shuffled{shuffle_seed}"
    return ingest(synth.machine_root, synth.noise_root, work / f"corpus_{audio_dtype}_{order}", rows_per_shard=32,
                  settings=DecodeSettings(audio_dtype=audio_dtype), shuffle_seed=shuffle_seed)


def bench_stream(corpus, epochs: int, batch_size: int, warmup_batches: int, *, preserve_order: bool = False,
                 **stream_kw) -> dict:
    """Clips/s of the stream consumed as `train.loop.micro_batches` consumes it (after `warmup_batches`)."""
    from ray.data import DataContext

    from retain_asd.train.loop import BATCH_COLUMNS

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = preserve_order
    try:
        plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                         snr_sampler=SNR, seed=0, num_epochs=epochs, **stream_kw)
        clips, t0, distinct = 0, None, []
        batches = stream.iter_train_batches(plan.dataset.iterator(), batch_size, seed=0, noise_bank=plan.state_ref,
                                            columns=(*BATCH_COLUMNS, "machine_idx"), device="cpu")
        for i, batch in enumerate(batches):
            if i == warmup_batches:
                t0, clips = time.perf_counter(), 0
            batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
            clips += int(batch["mixture"].shape[0])
            distinct.append(len(set(batch["machine_idx"].tolist())))
        seconds = time.perf_counter() - t0
    finally:
        ctx.execution_options.preserve_order = before
    return {"clips": clips, "seconds": seconds, "clips_per_s": clips / seconds, "rows_planned": plan.num_rows,
            "warmup_batches": warmup_batches, "mean_distinct_machine_classes": float(np.mean(distinct)),
            "settings": {"preserve_order": preserve_order, **stream_kw}}


class ShardClips(torch.utils.data.IterableDataset):
    """The DataLoader baseline's dataset, what a user would write without Ray: each worker process reads its
    share of the shards with pyarrow (the same train rows the stream plans), draws a noise segment and an SNR
    per clip, and mixes the shard's clips with float32 Eq. 3 (`mixing.mix_batch_at_snr`); the DataLoader
    collates the clips into batches. Yields the columns the training loop takes."""

    def __init__(self, state, epochs: int, seed: int = 0):
        self.clean, self.bank, self.num_classes = state.clean, state.bank, state.num_classes
        self.epochs, self.seed = epochs, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, worker])
        clean, bank = self.clean, self.bank
        for _ in range(self.epochs):
            for f in range(worker, len(clean.files), workers):
                index = np.flatnonzero(clean.file_idx == f)
                x1 = shards.audio_matrix(pq.read_table(clean.files[f], columns=["audio"]))[clean.row_in_file[index]]
                j = rng.integers(len(bank), size=len(index))
                offsets = stream.noise_offsets(bank.lengths[j], x1.shape[1], rng)
                x2 = np.stack([mixing.noise_segment(bank.recording(k), o, x1.shape[1]) for k, o in zip(j, offsets)])
                snr_db = rng.uniform(-5, 5, len(index))
                mixture, clean_part, noise_part = mixing.mix_batch_at_snr(x1, x2, snr_db)
                for r, i in enumerate(index):
                    label = np.zeros(self.num_classes, np.float32)
                    label[[clean.machine_idx[i], bank.noise_idx[j[r]]]] = 1.0
                    yield {"mixture": mixture[r], "clean": clean_part[r], "noise": noise_part[r], "label": label,
                           "snr_db": np.float32(snr_db[r]), "clip_idx": np.int64(i)}


def bench_dataloader(corpus, epochs: int, batch_size: int, warmup_batches: int, num_workers: int = 2) -> dict:
    """Clips/s of `torch.utils.data.DataLoader` over `ShardClips` (after `warmup_batches`, which include the
    workers' start)."""
    state = stream.build_stream_state(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                      snr_sampler=SNR, seed=0, class_weighted=False)
    loader = torch.utils.data.DataLoader(ShardClips(state, epochs), batch_size=batch_size, num_workers=num_workers,
                                         drop_last=True, multiprocessing_context="spawn", prefetch_factor=2)
    clips, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == warmup_batches:
            t0, clips = time.perf_counter(), 0
        clips += int(batch["mixture"].shape[0])
    if t0 is None:
        raise ValueError(f"--epochs {epochs}: too few clips for {warmup_batches} warm-up batches of {batch_size}")
    seconds = time.perf_counter() - t0
    return {"clips": clips, "seconds": seconds, "clips_per_s": clips / seconds, "warmup_batches": warmup_batches,
            "settings": {"num_workers": num_workers, "batch_size": batch_size, "multiprocessing_context": "spawn",
                         "prefetch_factor": 2, "mixing": "float32 Eq. 3 per shard (mixing.mix_batch_at_snr)",
                         "collate": "default_collate of per-clip dicts"}}


def profile_stages(corpus, repeats: int = 3) -> dict:
    """Milliseconds per 10 s clip of each stage, single process: the tasks' (parquet decode, powers) and the
    consumer's (forming clean, noise and mixture into fresh or reused buffers), and a float64 per-clip mix."""
    files = sorted((corpus.root / "machine").glob("*.parquet"))
    t = time.perf_counter()
    rows = 0
    for _ in range(repeats):
        for f in files:
            rows += len(shards.audio_matrix(pq.read_table(f, columns=["audio"]), dtype=None))
    decode = (time.perf_counter() - t) / rows
    raw = shards.audio_matrix(pq.read_table(files[0], columns=["audio"]), dtype=None)[:32].copy()  # (32, S) int16
    x = raw.astype(np.float32) / np.float32(32768)
    rng = np.random.default_rng(0)
    bank = stream.NoiseBank(audio=rng.standard_normal(4 * raw.size).astype(np.float32), starts=np.zeros(1, np.int64),
                            lengths=np.asarray([4 * raw.size]), noise_ids=np.asarray(["n"]),
                            noise_idx=np.zeros(1, np.int64))
    noise = rng.standard_normal(x.shape).astype(np.float32)
    snr = rng.uniform(-5, 5, len(x))
    compact = {"clean_stored": raw, "clean_gain": rng.uniform(1e-4, 1e-3, len(raw)).astype(np.float32),
               "noise_gain": np.ones(len(raw), np.float32), "noise_rec": np.zeros(len(raw), np.int64),
               "noise_offset": rng.integers(0, 3 * raw.size, len(raw))}
    reused = tuple(np.empty(raw.shape, np.float32) for _ in range(3))

    def per_clip(fn, n=5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / (n * len(x))

    return {
        "parquet_read_ms": 1e3 * decode,
        "row_powers_int16_ms": 1e3 * per_clip(lambda: mixing.row_powers(raw)),
        "form_audio_fresh_buffers_ms": 1e3 * per_clip(lambda: stream.form_audio(compact, bank)),
        "form_audio_reused_buffers_ms": 1e3 * per_clip(lambda: stream.form_audio(compact, bank, reused)),
        "numpy_loop_mix_at_snr_float64_ms": 1e3 * per_clip(lambda: [mixing.mix_at_snr(a, b, s) for a, b, s in
                                                                     zip(x, noise, snr, strict=True)]),
    }


def _vs_dataloader(corpus, epochs: int, batch_size: int, warmup: int, repeat: int, **kw) -> dict:
    """One repeat: the stream and the DataLoader baseline back to back (order alternates), and their ratio."""
    if repeat % 2 == 0:
        ray_side = bench_stream(corpus, epochs, batch_size, warmup, **kw)
        baseline = bench_dataloader(corpus, epochs, batch_size, warmup)
    else:
        baseline = bench_dataloader(corpus, epochs, batch_size, warmup)
        ray_side = bench_stream(corpus, epochs, batch_size, warmup, **kw)
    return {"ray_stream": ray_side, "dataloader": baseline,
            "ratio": ray_side["clips_per_s"] / baseline["clips_per_s"]}


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
    parser.add_argument("--epochs", type=int, default=24, help="epochs of 104 clips (>= 2,000 after warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="stream vs DataLoader pairs; ratio = their median")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.json"))
    parser.add_argument("--cpus-per-node", type=int, default=max(1, usable_cpus() // 2),
                        help="CPUs of each simulated node in the 1- vs 2-node comparison")
    parser.add_argument("--skip-two-nodes", action="store_true", help="leave out the simulated 2-node run")
    parser.add_argument("--skip-variants", action="store_true",
                        help="leave out the variants (float32 shards, path order, blocks, preserve_order)")
    args = parser.parse_args(argv)

    init_ray(num_cpus=usable_cpus(), quiet=True)
    set_data_progress(False)
    work = Path(args.work)
    corpus = make_corpus(work, args.per_attr)
    run = (corpus, args.epochs, args.batch_size, args.warmup_batches)
    result = {"machine": {"cpus": usable_cpus(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg()},
              "profile_ms_per_clip": profile_stages(corpus)}
    # Warm-up, not timed, one full pass: Ray's worker processes start and import retain_asd (1-2 s each on 2
    # cores), the shards enter the page cache, and the object store's shared memory is written for the first
    # time (first-touch page faults: with a 2-epoch warm-up the first repeat ran at 0.63-0.78 of the loop, the
    # later ones at 0.97-1.28; a long run pays this once, in its first GB of blocks).
    bench_stream(corpus, args.epochs, args.batch_size, 0)
    bench_dataloader(corpus, 4, args.batch_size, 0)  # each worker batches its own half: 2 batches each
    repeats = [_vs_dataloader(*run, repeat=r) for r in range(args.repeats)]
    result["repeats"] = repeats
    result["ratio"] = statistics.median(r["ratio"] for r in repeats)
    result["baseline"] = ("torch.utils.data.DataLoader, 2 worker processes, float32 Eq. 3 per shard, batches of "
                          f"{args.batch_size} (ShardClips)")
    result["ray_stream"], result["dataloader"] = repeats[0]["ray_stream"], repeats[0]["dataloader"]
    result["clips_per_epoch"] = result["ray_stream"]["rows_planned"] // args.epochs
    result["scaling"] = {f"tasks_{k}": _vs_dataloader(*run, repeat=k, max_tasks=k) for k in (1, 2)}
    result["scaling"]["ratio_2_over_1_tasks"] = (result["scaling"]["tasks_2"]["ray_stream"]["clips_per_s"]
                                                 / result["scaling"]["tasks_1"]["ray_stream"]["clips_per_s"])
    if not args.skip_variants:
        path_order = make_corpus(work, args.per_attr, shuffle_seed=None)
        result["variants"] = {
            "float32_shards": _vs_dataloader(make_corpus(work, args.per_attr, "float32"), *run[1:], repeat=0),
            "path_order_one_file_per_unit": _vs_dataloader(path_order, *run[1:], repeat=1, files_per_unit=1),
            "rows_per_block_32": _vs_dataloader(*run, repeat=0, rows_per_block=32),
            "preserve_order": _vs_dataloader(*run, repeat=1, preserve_order=True),
        }
    result["ratio_stream_over_dataloader"] = result["ratio"]
    result["machine"]["load_avg_at_end"] = os.getloadavg()
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
