"""Throughput of the BEATs and EAT base encoders on 10 s clips (BEATs: SDPA vs explicit softmax(QK^T + bias)V).

CPU fp32 always; CUDA bf16 autocast as well when a GPU is present. Both attention paths run in the same
process on the same random weights and inputs, interleaved per iteration so drift hits both alike;
the figure is the median batch time. Forward = waveform -> fbank -> all 12 blocks, eval, no grad.
EAT (EAT-base / SSLAM sizes, 1024 fbank frames = 512 patches + CLS) runs beside it on the same clips.

    python benchmarks/encoder.py                      # writes benchmarks/results/encoder.json
    python benchmarks/encoder.py --batch 4 --iters 5 --out /tmp/encoder.json
    python benchmarks/encoder.py --encoders eat       # EAT only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from retain_asd.models.beats import BEATs, beats_base
from retain_asd.models.eat import EAT, eat_base

CLIP_S = 10.0
SAMPLE_RATE_HZ = 16000
IMPLS = ("sdpa", "explicit")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(model: BEATs, waveforms: torch.Tensor, dtype: torch.dtype, warmup: int,
                  iters: int) -> dict[str, list[float]]:
    """Seconds per batch for each attention implementation, interleaved (sdpa, explicit, sdpa, ...)."""
    device = waveforms.device
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    with torch.inference_mode(), autocast:
        for step in range(warmup + iters):
            for impl in IMPLS:
                model.attn_impl = impl
                _sync(device)
                start = time.perf_counter()
                model(waveforms)
                _sync(device)
                if step >= warmup:
                    seconds[impl].append(time.perf_counter() - start)
    return seconds


def run(device: torch.device, dtype: torch.dtype, batch: int, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = BEATs(beats_base()).eval().to(device)
    waveforms = (0.1 * torch.randn(batch, int(CLIP_S * SAMPLE_RATE_HZ))).to(device)  # (B, S)
    seconds = time_variants(model, waveforms, dtype, warmup, iters)
    variants = {
        impl: {"median_s_per_batch": statistics.median(s), "clips_per_s": batch / statistics.median(s),
               "s_per_batch": s}
        for impl, s in seconds.items()
    }
    return {
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "variants": variants,
        "ratio_sdpa_over_explicit": variants["sdpa"]["clips_per_s"] / variants["explicit"]["clips_per_s"],
    }


def run_eat(device: torch.device, dtype: torch.dtype, batch: int, warmup: int, iters: int) -> dict:
    """EAT base forward (fbank + 12 blocks), median seconds per batch."""
    torch.manual_seed(0)
    model = EAT(eat_base()).eval().to(device)
    waveforms = (0.1 * torch.randn(batch, int(CLIP_S * SAMPLE_RATE_HZ))).to(device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    seconds = []
    with torch.inference_mode(), autocast:
        for step in range(warmup + iters):
            _sync(device)
            start = time.perf_counter()
            model(waveforms)
            _sync(device)
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "encoder": "eat_base", "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."), "batch": batch, "tokens": model.grid(waveforms.shape[1]),
        "median_s_per_batch": median, "clips_per_s": batch / median, "s_per_batch": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="10 s clips per forward")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder.json")
    parser.add_argument("--encoders", default="beats,eat", help="comma-separated: beats, eat")
    args = parser.parse_args()
    encoders = set(args.encoders.split(","))

    results = {
        "benchmark": "BEATs / EAT base forward, 10 s clips at 16 kHz (fbank + 12 blocks), eval, no grad",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "runs": [], "eat_runs": [],
    }
    if "beats" in encoders:
        results["runs"].append(run(torch.device("cpu"), torch.float32, args.batch, args.warmup, args.iters))
        if torch.cuda.is_available():
            results["runs"].append(run(torch.device("cuda"), torch.bfloat16, args.gpu_batch, 3, args.gpu_iters))
    if "eat" in encoders:
        results["eat_runs"].append(run_eat(torch.device("cpu"), torch.float32, args.batch, args.warmup, args.iters))
        if torch.cuda.is_available():
            results["eat_runs"].append(run_eat(torch.device("cuda"), torch.bfloat16, args.gpu_batch, 3,
                                               args.gpu_iters))
    for r in results["eat_runs"]:
        print(f"EAT {r['device']} {r['dtype']} batch {r['batch']}: {r['clips_per_s']:.2f} clips/s")
    for r in results["runs"]:
        line = ", ".join(f"{impl} {v['clips_per_s']:.2f} clips/s" for impl, v in r["variants"].items())
        print(f"{r['device']} {r['dtype']} batch {r['batch']}: {line}; "
              f"sdpa/explicit = {r['ratio_sdpa_over_explicit']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
