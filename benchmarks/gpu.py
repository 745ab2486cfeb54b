"""GPU benchmark, one CUDA device, within ~5 minutes: what a GPU run of retain-asd is bound by.

    train_step   samples/s of a full base-BEATs pre-training step in bf16 autocast: SpecAugment, student
                 forward, frozen teacher on clean and noise, tagging + mixture losses, backward, AdamW
                 (`student.compute_losses`, the training loop's own code; fused AdamW on CUDA as the loop uses);
                 where the time goes (`phases_ms`: the same step cut into fbank, SpecAugment, student forward,
                 teacher, losses, backward, optimiser, a device sync after each), model FLOPs per sample
                 (torch.utils.flop_counter over one step) and the achieved fraction of the device's peak
                 (dense bf16, looked up from the device name in PEAK_TFLOPS; unknown for a CPU)
    stream       mixed clips/s the Ray Data stream delivers as tensors on the GPU (`iter_train_batches` on the
                 compact rows, audio formed on the consumer), and supply / demand = stream clips/s over the
                 train_step samples/s reached (>= 1: the GPU never waits)
    embed        clips/s of evaluation embeddings (`eval.embed.embed`: fp32 as evaluation runs it, and bf16)
    knn          benchmarks/knn.py on the GPU (the CUDA path of `eval.knn`) against sklearn on the CPU

    python benchmarks/gpu.py                          # CUDA; writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --tiny      # dry run of the same code path on the CPU (tiny sizes)
    python benchmarks/gpu.py --compile                # the step with train.compile (torch.compile) as well

Without a CUDA device (and no --device cpu) it prints why and exits 0 without writing anything. The
stream part needs Ray and soundfile; where they are not installed it is skipped with the reason in the JSON.
Each part warms up first and reports the median of its timed iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retain_asd.config import MixingConfig, ModelConfig, ObjectiveConfig, TrainConfig
from retain_asd.eval.embed import embed
from retain_asd.models.beats import BEATs, beats_base, beats_tiny
from retain_asd.train import objectives as obj
from retain_asd.train.loop_config import LoopConfig
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import Student, compile_models, compute_losses

SAMPLE_RATE_HZ = 16000
NUM_MACHINE, NUM_NOISE = 231, 4  # the paper's 235 classes
SNR = {"kind": "uniform", "low_db": -5.0, "high_db": 5.0}
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets; matched in this order
# against the device name. A device not listed (and every CPU) gets no peak and no fraction.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10G", 70.0))
# Sizes per mode: (model, clip_s, step batch, embed batch, iters, knn refs/queries/dim, stream clips).
SIZES = {
    "full": {"model": "base", "clip_s": 10.0, "step_batch": 32, "embed_batch": 64, "iters": 10,
             "knn": (1000, 200, 6144), "stream_clips": 2048},
    "tiny": {"model": "tiny", "clip_s": 2.0, "step_batch": 2, "embed_batch": 2, "iters": 2,
             "knn": (200, 20, 256), "stream_clips": 64},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _cfg(size: str):
    return beats_base() if size == "base" else beats_tiny()


def peak_tflops(device_name: str) -> dict:
    """The device's dense bf16 peak from PEAK_TFLOPS (first name contained in `device_name`), or why there is none."""
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return {"tflops": tflops, "matched": name, "dtype": "bf16 dense (data sheet)"}
    return {"tflops": None, "matched": None, "note": f"peak unknown for {device_name!r} (no fraction reported)"}


def _step_setup(size: str, device: torch.device, batch: int, clip_s: float, iters: int) -> tuple:
    torch.manual_seed(0)
    cfg = _cfg(size)
    student = Student(BEATs(cfg), NUM_MACHINE + NUM_NOISE, cfg.encoder_layers).to(device).train()
    teacher = BEATs(cfg).to(device)
    teacher.load_state_dict(student.encoder.state_dict())
    teacher.freeze()
    specaug = SpecAugment(freq_mask_bins=24, time_mask_frames=80, num_masks=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-3, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    clean, noise = (0.1 * torch.randn(batch, int(clip_s * SAMPLE_RATE_HZ), generator=g) for _ in range(2))
    label = torch.zeros(batch, NUM_MACHINE + NUM_NOISE)
    label[torch.arange(batch), torch.arange(batch) % NUM_MACHINE] = 1.0
    label[torch.arange(batch), NUM_MACHINE + torch.arange(batch) % NUM_NOISE] = 1.0
    data = {k: v.to(device) for k, v in {"mixture": clean + noise, "clean": clean, "noise": noise,
                                         "label": label, "snr_db": torch.zeros(batch)}.items()}
    config = LoopConfig(  # the paper's defaults for the parts a step reads; the rest as in a preset
        model=ModelConfig(), objective=ObjectiveConfig(freq_mask_bins=24, time_mask_frames=80, num_masks=2),
        mixing=MixingConfig(), train=TrainConfig(warmup_steps=0, total_steps=iters + 2, grad_accum=1),
        init_checkpoint="", num_classes=NUM_MACHINE + NUM_NOISE, num_machine_classes=NUM_MACHINE,
        align_layer=cfg.encoder_layers, batch_size_per_worker=batch)
    return student, teacher, specaug, optimizer, data, config


def phases(student, teacher, specaug, optimizer, data: dict, config: LoopConfig, device: torch.device,
           iters: int) -> dict[str, float]:
    """Median milliseconds of each phase of the step `compute_losses` + backward + AdamW runs, timed one by one
    with a device sync after each (so they add up to a little more than the step, which overlaps nothing)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    spec_gen, layer = torch.Generator().manual_seed(1), config.align_layer
    times: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args)
        _sync(device)
        times.setdefault(name, []).append(1e3 * (time.perf_counter() - start))
        return out

    def student_forward(fbank):
        with autocast:
            return student(fbank)

    def teacher_forward(fbank):
        with torch.inference_mode(), autocast:
            return teacher.extract_layers_from_fbank(fbank, layers=layer)[0][layer - 1].clone()

    def losses(hidden, logits, target):
        t_clean, t_noise = target.chunk(2)
        return (obj.tagging_loss(logits.float(), data["label"])
                + obj.mixture_loss(hidden[layer - 1], t_clean, t_noise, 0.5))

    def optimise():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    waveforms = torch.cat([data["mixture"], data["clean"], data["noise"]])  # (3B, S): every fbank of a step
    for i in range(iters + 1):  # the first round warms up
        fbank = timed("fbank", student.encoder.preprocess, waveforms)
        mixture_fbank, teacher_fbank = fbank.split([len(data["mixture"]), 2 * len(data["mixture"])])
        masked = timed("specaugment", specaug, mixture_fbank, spec_gen)
        hidden, logits = timed("student_forward", student_forward, masked)
        target = timed("teacher", teacher_forward, teacher_fbank)
        total = timed("losses", losses, hidden, logits, target)
        timed("backward", total.backward)
        timed("optimiser", optimise)
        if i == 0:
            times.clear()
    return {name: statistics.median(ms) for name, ms in times.items()}


def step_flops(student, teacher, specaug, data: dict, config: LoopConfig) -> int:
    """Model FLOPs of one step (student forward + backward, teacher forward), counted by torch.utils.flop_counter
    (matrix products, convolutions, and attention where the counter knows the kernel: CUDA's, not the CPU's)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        losses = compute_losses(student, teacher, specaug, data, config, torch.Generator().manual_seed(1),
                                np.random.default_rng(2))
        losses.total.backward()
    student.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def train_step(size: str, device: torch.device, batch: int, clip_s: float, iters: int, compile: bool = False) -> dict:
    """Samples/s of one full pre-training step (Eq. 7: tagging + mixture), bf16 autocast on CUDA; where its time
    goes (`phases_ms`), its model FLOPs and the fraction of the device's peak."""
    student, teacher, specaug, optimizer, data, config = _step_setup(size, device, batch, clip_s, iters)
    phase_ms = phases(student, teacher, specaug, optimizer, data, config, device, iters)
    flops = step_flops(student, teacher, specaug, data, config)
    if compile:
        student, teacher = compile_models(student, teacher)
    spec_gen, np_rng = torch.Generator().manual_seed(1), np.random.default_rng(2)

    def step():
        losses = compute_losses(student, teacher, specaug, data, config, spec_gen, np_rng)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, device, warmup=3 if compile else 2, iters=iters)
    cpu = f"CPU {platform.processor() or platform.machine()}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    peak = peak_tflops(name)
    achieved = flops / statistics.median(seconds) / 1e12
    out = {"model": size, "batch": batch, "clip_s": clip_s, "s_per_step": seconds, "compile": compile,
           "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
           "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW (foreach)",
           "samples_per_s": batch / statistics.median(seconds),
           "phases_ms": phase_ms, "phases_sum_ms": sum(phase_ms.values()),
           "step_ms": 1e3 * statistics.median(seconds),
           "model_flops_per_step": flops, "model_flops_per_sample": flops / batch,
           "achieved_tflops": achieved, "peak": peak,
           "fraction_of_peak": achieved / peak["tflops"] if peak["tflops"] else None}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def embed_throughput(size: str, device: torch.device, batch: int, clip_s: float, iters: int) -> dict:
    """Clips/s of `eval.embed.embed` (all layers, GenRep pooling): fp32 as evaluation runs it, and bf16."""
    torch.manual_seed(0)
    model = BEATs(_cfg(size)).eval().to(device)
    layers = list(range(1, model.num_layers + 1))
    x = (0.1 * torch.randn(batch, int(clip_s * SAMPLE_RATE_HZ))).to(device)  # (B, S)
    out = {"model": size, "batch": batch, "clip_s": clip_s}
    for name, dtype in (("float32", None), ("bfloat16_autocast", torch.bfloat16)):
        def run(dtype=dtype):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                embed(model, x, layers)
        out[f"{name}_clips_per_s"] = batch / statistics.median(_timed(run, device, warmup=2, iters=iters))
    return out


def knn_gpu_vs_sklearn(device: torch.device, refs: int, queries: int, dim: int, out_dir: Path) -> dict:
    """benchmarks/knn.py with the torch side on `device` (ids and distances checked there)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import knn as knn_bench

    result = knn_bench.main(["--device", device.type, "--n-refs", str(refs), "--n-queries", str(queries),
                             "--dim", str(dim), "--repeats", "5", "--out", str(out_dir / "knn_gpu.json")])
    return {"device": device.type, "refs": refs, "queries": queries, "dim": dim,
            "median_seconds": result["median_seconds"], "ratio_over_sklearn_cpu": result["ratio"]}


def stream_supply(device: torch.device, clip_s: float, clips: int, batch: int, work: Path,
                  corpus_dir: Path | None = None) -> dict:
    """Mixed clips/s from the Ray Data stream, as tensors on `device`, after one warm-up batch.

    Streams the ingested corpus in `corpus_dir`, or writes and ingests a small synthetic one under `work`.
    """
    try:
        from retain_asd import stream
        from retain_asd.corpus.ingest import ingest, load_corpus
        from retain_asd.corpus.synth import write_synthetic_corpus
        from retain_asd.runtime import init_ray, set_data_progress, usable_cpus
    except ImportError as err:  # the GPU machines have torch but not Ray or soundfile
        return {"skipped": f"needs Ray and soundfile ({err})"}
    init_ray(quiet=True)
    set_data_progress(False)
    if corpus_dir is not None:
        corpus = load_corpus(corpus_dir)
    else:
        synth = write_synthetic_corpus(work / "synth", seed=0, machines=("fan", "pump"), train_source_per_attr=4,
                                       train_target_per_attr=2, test_per_domain=1, clip_s=clip_s,
                                       noise_clips_per_category=2, noise_clip_s=3 * clip_s)
        corpus = ingest(synth.machine_root, synth.noise_root, work / "corpus", rows_per_shard=32)
    rows = corpus.machine.num_rows
    plan = stream.build_train_stream(corpus.root / "machine", corpus.root / "noise", corpus.labels_path,
                                     snr_sampler=SNR, seed=0, num_epochs=max(2, -(-(clips + batch) // rows)),
                                     class_weighted=False)
    batches = stream.iter_train_batches(plan.dataset.iterator(), batch, seed=0, noise_bank=plan.state_ref,
                                      device=device)
    delivered, start = 0, None
    for i, b in enumerate(batches):
        if i == 1:  # after the first batch: Ray Data start-up is not throughput
            _sync(device)
            delivered, start = 0, time.perf_counter()
        delivered += int(b["mixture"].shape[0])
        if start is not None and delivered >= clips:
            break
    _sync(device)
    seconds = time.perf_counter() - start
    return {"clips": delivered, "batch": batch, "clip_s": clip_s, "seconds": seconds,
            "clips_per_s": delivered / seconds, "cpus": usable_cpus()}


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a dry run of the code path")
    parser.add_argument("--no-stream", action="store_true", help="skip the Ray Data stream part")
    parser.add_argument("--compile", action="store_true", help="the step with torch.compile (train.compile)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here, GPU benchmark skipped (nothing written). Run it on a "
              "CUDA machine, or `python benchmarks/gpu.py --device cpu --tiny` for a dry run of the code path.")
        return None
    device = torch.device(args.device)
    size = SIZES["tiny" if args.tiny else "full"]
    started = time.perf_counter()
    result = {"benchmark": "gpu", "mode": "tiny" if args.tiny else "full", "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "python": platform.python_version()}
    result["train_step"] = train_step(size["model"], device, size["step_batch"], size["clip_s"], size["iters"],
                                      compile=args.compile)
    step = result["train_step"]
    print(f"train step: {step['samples_per_s']:.2f} samples/s; " + ", ".join(
        f"{k} {v:.1f}" for k, v in step["phases_ms"].items()) + " ms; " + (
        f"{100 * step['fraction_of_peak']:.1f}% of peak" if step["fraction_of_peak"] else "peak unknown"), flush=True)
    result["embed"] = embed_throughput(size["model"], device, size["embed_batch"], size["clip_s"], size["iters"])
    print(f"embed: {result['embed']['float32_clips_per_s']:.2f} clips/s fp32, "
          f"{result['embed']['bfloat16_autocast_clips_per_s']:.2f} bf16", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["knn"] = knn_gpu_vs_sklearn(device, *size["knn"], Path(tmp))
        if args.no_stream:
            result["stream"] = {"skipped": "--no-stream"}
        else:
            result["stream"] = stream_supply(device, size["clip_s"], size["stream_clips"], size["step_batch"],
                                             Path(tmp))
    supply = result["stream"].get("clips_per_s")
    result["supply_over_demand"] = supply / result["train_step"]["samples_per_s"] if supply else None
    if supply:
        result["stream"]["rows"] = "compact (clip as stored + Eq. 3 gains, audio formed on the consumer)"
    result["seconds_total"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("supply_over_demand", "seconds_total")}), f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
