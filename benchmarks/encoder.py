"""Throughput of the BEATs base encoder on 10 s clips: ours (SDPA; explicit softmax(QK^T + bias)V) vs the
official microsoft/unilm BEATs code on the same weights; and the EAT base encoder (EAT / SSLAM sizes, 1024 fbank
frames = 512 patches + CLS) beside it on the same clips (`eat_runs`).

CPU fp32 always; CUDA bf16 autocast as well when a GPU is present. All variants run in the same process
on the same random weights and inputs, interleaved per iteration so drift hits all alike; the figure is
the median batch time after warm-up. Forward = waveform -> fbank -> all 12 blocks, eval, no grad.

The official column needs the official code (not vendored): a folder holding unilm's `beats/BEATs.py`,
`backbone.py` and `modules.py`, given by --official-dir or $BEATS_OFFICIAL_DIR; without it the column is
skipped and `ratio` is null. Its outputs must equal ours to 1e-4 or the benchmark fails.
`ratio` = our clips/s over the official code's, CPU fp32.

    python benchmarks/encoder.py                      # writes benchmarks/results/encoder.json
    python benchmarks/encoder.py --batch 4 --iters 5 --official-dir /tmp/beats_official
    python benchmarks/encoder.py --encoders eat       # EAT only
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from retain_asd.models.beats import BEATs, beats_base
from retain_asd.models.eat import EAT, eat_base

CLIP_S = 10.0
SAMPLE_RATE_HZ = 16000
IMPLS = ("sdpa", "explicit")


def official_model(ours: BEATs, official_dir: str | None) -> torch.nn.Module | None:
    """The official BEATs class built from `official_dir`, loaded strictly with our weights; None if absent."""
    if not official_dir or not (Path(official_dir) / "BEATs.py").is_file():
        return None
    sys.path.insert(0, str(official_dir))  # the official files import each other as top-level modules
    official = importlib.import_module("BEATs")
    model = official.BEATs(official.BEATsConfig(ours.cfg.to_dict()))
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.eval().to(ours.patch_embedding.weight.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(model: BEATs, impl: str, waveforms: torch.Tensor) -> torch.Tensor:
    model.attn_impl = impl
    return model(waveforms)


def time_variants(model: BEATs, official, waveforms: torch.Tensor, dtype: torch.dtype, warmup: int,
                  iters: int) -> dict[str, list[float]]:
    """Seconds per batch for each variant, interleaved (sdpa, explicit, official, sdpa, ...)."""
    device = waveforms.device
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    variants = {impl: functools.partial(_ours, model, impl, waveforms) for impl in IMPLS}
    if official is not None:
        variants["official"] = lambda: official.extract_features(waveforms)[0]
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode(), autocast:
        for step in range(warmup + iters):
            for name, fn in variants.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                if step >= warmup:
                    seconds[name].append(time.perf_counter() - start)
        if official is not None:  # same weights, same input: same features (fp32 to 1e-4)
            model.attn_impl = "sdpa"
            ours, theirs = model(waveforms).float(), official.extract_features(waveforms)[0].float()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    return seconds


def run(device: torch.device, dtype: torch.dtype, batch: int, warmup: int, iters: int,
        official_dir: str | None) -> dict:
    torch.manual_seed(0)
    model = BEATs(beats_base()).eval().to(device)
    official = official_model(model, official_dir)
    waveforms = (0.1 * torch.randn(batch, int(CLIP_S * SAMPLE_RATE_HZ))).to(device)  # (B, S)
    seconds = time_variants(model, official, waveforms, dtype, warmup, iters)
    variants = {
        name: {"median_s_per_batch": statistics.median(s), "clips_per_s": batch / statistics.median(s),
               "s_per_batch": s}
        for name, s in seconds.items()
    }
    return {
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "variants": variants,
        "ratio_sdpa_over_explicit": variants["sdpa"]["clips_per_s"] / variants["explicit"]["clips_per_s"],
        "ratio_over_official": (variants["sdpa"]["clips_per_s"] / variants["official"]["clips_per_s"]
                                if "official" in variants else None),
        "equal_to_official_1e-4": "official" in variants if dtype == torch.float32 else None,
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
    parser.add_argument("--batch", type=int, default=4, help="10 s clips per forward")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-iters", type=int, default=20)
    parser.add_argument("--official-dir", default=os.environ.get("BEATS_OFFICIAL_DIR"),
                        help="folder with the official BEATs.py, backbone.py, modules.py (unilm/beats)")
    parser.add_argument("--encoders", default="beats,eat", help="comma-separated: beats, eat")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder.json")
    args = parser.parse_args()
    encoders = set(args.encoders.split(","))

    results = {
        "benchmark": "BEATs / EAT base forward, 10 s clips at 16 kHz (fbank + 12 blocks), eval, no grad",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "runs": [], "eat_runs": [], "ratio": None,
    }
    if "beats" in encoders:
        results["runs"].append(run(torch.device("cpu"), torch.float32, args.batch, args.warmup, args.iters,
                                   args.official_dir))
        results["ratio"] = results["runs"][0]["ratio_over_official"]  # ours over official, CPU fp32
        if results["ratio"] is None:
            print("official BEATs code not found (--official-dir / $BEATS_OFFICIAL_DIR): official column skipped")
        if torch.cuda.is_available():
            results["runs"].append(run(torch.device("cuda"), torch.bfloat16, args.gpu_batch, 3, args.gpu_iters,
                                       args.official_dir))
    if "eat" in encoders:
        results["eat_runs"].append(run_eat(torch.device("cpu"), torch.float32, args.batch, args.warmup, args.iters))
        if torch.cuda.is_available():
            results["eat_runs"].append(run_eat(torch.device("cuda"), torch.bfloat16, args.gpu_batch, 3,
                                               args.gpu_iters))
    for r in results["eat_runs"]:
        print(f"EAT {r['device']} {r['dtype']} batch {r['batch']}: {r['clips_per_s']:.2f} clips/s")
    for r in results["runs"]:
        line = ", ".join(f"{impl} {v['clips_per_s']:.2f} clips/s" for impl, v in r["variants"].items())
        versus = "" if r["ratio_over_official"] is None else f"; sdpa/official = {r['ratio_over_official']:.3f}"
        print(f"{r['device']} {r['dtype']} batch {r['batch']}: {line}; "
              f"sdpa/explicit = {r['ratio_sdpa_over_explicit']:.3f}{versus}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
