"""Samples/s of one pre-training step (tiny and base BEATs, 10 s clips), with a student-only baseline.

    train_step    the paper's method (Eq. 7): SpecAugment -> student forward (all blocks + tagging head),
                  frozen teacher forward on clean and noise (2B clips, up to the aligned layer), tagging +
                  mixture losses, backward, AdamW step                       (`student.compute_losses`)
    student_only  baseline, same model and batch: tagging loss only (no teacher), backward, AdamW step

Both run in one process on the same weights and inputs, interleaved per iteration so machine load hits
both alike; the figure is the median step time. CPU fp32 always; CUDA bf16 autocast as well when a GPU
is present. No Ray: this is the per-worker compute, what the DDP all-reduce adds is not included.

    python benchmarks/train_step.py                   # writes benchmarks/results/train_step.json
    python benchmarks/train_step.py --base-batch 1 --iters 2 --out /tmp/train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from retain_asd.config import MixingConfig, ModelConfig, ObjectiveConfig, TrainConfig
from retain_asd.models.beats import BEATs, beats_base, beats_tiny
from retain_asd.train.loop_config import LoopConfig
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import Student, compute_losses

CLIP_S = 10.0
SAMPLE_RATE_HZ = 16000
NUM_MACHINE, NUM_NOISE = 231, 4  # the paper's 235 classes
VARIANTS = {"train_step": "tagging_mixture", "student_only": "tagging"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    samples = int(CLIP_S * SAMPLE_RATE_HZ)
    clean = 0.1 * torch.randn(batch, samples, generator=g)  # (B, S)
    noise = 0.1 * torch.randn(batch, samples, generator=g)
    label = torch.zeros(batch, NUM_MACHINE + NUM_NOISE)
    label[torch.arange(batch), torch.arange(batch) % NUM_MACHINE] = 1.0
    label[torch.arange(batch), NUM_MACHINE + torch.arange(batch) % NUM_NOISE] = 1.0
    out = {"mixture": clean + noise, "clean": clean, "noise": noise, "label": label,
           "snr_db": torch.zeros(batch)}
    return {k: v.to(device) for k, v in out.items()}


def run(size: str, device: torch.device, batch: int, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    cfg = beats_tiny() if size == "tiny" else beats_base()
    student = Student(BEATs(cfg), NUM_MACHINE + NUM_NOISE, cfg.encoder_layers).to(device).train()
    teacher = BEATs(cfg).to(device)
    teacher.load_state_dict(student.encoder.state_dict())
    teacher.freeze()
    specaug = SpecAugment(freq_mask_bins=24, time_mask_frames=80, num_masks=2)  # paper-size masks
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-3)
    data = _batch(batch, device)
    spec_gen, np_rng = torch.Generator().manual_seed(1), np.random.default_rng(2)
    config = LoopConfig(
        model=ModelConfig(), objective=ObjectiveConfig(freq_mask_bins=24, time_mask_frames=80, num_masks=2),
        mixing=MixingConfig(snr_sampler="fixed", snr_db=0.0), train=TrainConfig(warmup_steps=0, total_steps=1,
                                                                                grad_accum=1),
        init_checkpoint="", num_classes=NUM_MACHINE + NUM_NOISE, num_machine_classes=NUM_MACHINE,
        align_layer=cfg.encoder_layers, batch_size_per_worker=batch)

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(warmup + iters):
        for name, objective in VARIANTS.items():
            _sync(device)
            start = time.perf_counter()
            variant = replace(config, objective=replace(config.objective, name=objective))
            losses = compute_losses(student, teacher, specaug, data, variant, spec_gen, np_rng)
            losses.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step >= warmup:
                seconds[name].append(time.perf_counter() - start)
    variants = {name: {"median_s_per_step": statistics.median(s), "samples_per_s": batch / statistics.median(s),
                       "s_per_step": s} for name, s in seconds.items()}
    return {
        "size": size, "params_m": sum(p.numel() for p in student.parameters()) / 1e6,
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": "float32" if device.type == "cpu" else "bfloat16 autocast", "batch": batch, "iters": iters,
        "variants": variants,
        "ratio_train_step_over_student_only":
            variants["train_step"]["samples_per_s"] / variants["student_only"]["samples_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-batch", type=int, default=8)
    parser.add_argument("--tiny-iters", type=int, default=5)
    parser.add_argument("--base-batch", type=int, default=2, help="10 s clips per step for BEATs base on CPU")
    parser.add_argument("--iters", type=int, default=2, help="timed base iterations per variant")
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    runs = [run("tiny", cpu, args.tiny_batch, 1, args.tiny_iters), run("base", cpu, args.base_batch, 1, args.iters)]
    if torch.cuda.is_available():
        runs.append(run("base", torch.device("cuda"), args.gpu_batch, 3, 10))
    results = {"benchmark": "one pre-training step on 10 s clips: tagging + mixture (student + frozen teacher) "
                            "vs student-only tagging baseline",
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
               "runs": runs}
    for r in runs:
        line = ", ".join(f"{k} {v['samples_per_s']:.3f} samples/s" for k, v in r["variants"].items())
        print(f"{r['size']} {r['device']} {r['dtype']} batch {r['batch']}: {line}; "
              f"ratio = {r['ratio_train_step_over_student_only']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
