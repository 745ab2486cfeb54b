"""Helpers of the train tests: rows like the stream's, a LoopConfig, tiny models and seeded generators."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from retain_asd.config import MixingConfig, ModelConfig, ObjectiveConfig, TrainConfig
from retain_asd.models.beats import load_beats
from retain_asd.train.loop_config import LoopConfig
from retain_asd.train.student import Student

NUM_MACHINE, NUM_NOISE = 3, 2
CLIP_SAMPLES = 32000  # 2 s: 198 fbank frames, a (12, 8) patch grid


def _draws(n: int, seed: int):
    """n (clean, noise, snr_db, a1, a2, label, m, k) draws: Eq. 3 at a per-row SNR, multi-hot label."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / 16000
    for i in range(n):
        m, k = i % NUM_MACHINE, i % NUM_NOISE
        clean = (np.sin(2 * np.pi * (200 + 150 * m) * t) + 0.05 * rng.standard_normal(CLIP_SAMPLES))
        noise = rng.standard_normal(CLIP_SAMPLES) * (1 + k)
        snr_db = float(rng.uniform(-5, 5))
        a2 = 1 / np.sqrt(np.mean(noise**2))
        a1 = np.sqrt(10 ** (snr_db / 10) / np.mean(clean**2))
        label = np.zeros(NUM_MACHINE + NUM_NOISE, np.float32)
        label[m] = label[NUM_MACHINE + k] = 1.0
        yield clean, noise, snr_db, a1, a2, label, m, k


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """n mixed rows with their audio formed, as the training loop's batches hold them."""
    return [{"mixture": (a1 * clean + a2 * noise).astype(np.float32),
             "clean": (a1 * clean).astype(np.float32), "noise": (a2 * noise).astype(np.float32),
             "label": label, "machine_idx": np.int64(m), "noise_idx": np.int64(k),
             "snr_db": np.float32(snr_db), "clip_idx": np.int64(i)}
            for i, (clean, noise, snr_db, a1, a2, label, m, k) in enumerate(_draws(n, seed))]


def make_stream_rows(n: int, seed: int = 0):
    """n compact rows as the stream's tasks yield them (the clean clip as stored, Eq. 3's gains, the noise
    recording and offset), and the noise bank (one recording per row) the loop forms their noise from."""
    from retain_asd.stream import NoiseBank

    rows, noises = [], []
    for i, (clean, noise, snr_db, a1, a2, label, m, k) in enumerate(_draws(n, seed)):
        noises.append(noise.astype(np.float32))
        rows.append({"clean_stored": clean.astype(np.float32), "clean_gain": np.float32(a1),
                     "noise_gain": np.float32(a2), "noise_rec": np.int64(i), "noise_offset": np.int64(0),
                     "label": label, "machine_idx": np.int64(m), "noise_idx": np.int64(k),
                     "snr_db": np.float32(snr_db), "clip_idx": np.int64(i)})
    bank = NoiseBank(audio=np.concatenate(noises), starts=np.arange(n, dtype=np.int64) * CLIP_SAMPLES,
                     lengths=np.full(n, CLIP_SAMPLES, dtype=np.int64),
                     noise_ids=np.asarray([f"n{i}" for i in range(n)]),
                     noise_idx=np.arange(n, dtype=np.int64) % NUM_NOISE)
    return rows, bank


def make_batch(n: int, seed: int = 0) -> dict:
    rows = make_rows(n, seed)
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("mixture", "clean", "noise", "label",
                                                                           "snr_db")}


BASE = LoopConfig(
    model=ModelConfig(size="tiny", init="random"),  # layerdrop and grad_decay off
    objective=ObjectiveConfig(name="tagging_mixture", alpha=0.7, beta=1.3, lam=0.5, lam_mode="fixed", align_layer=2,
                              teacher_inputs="scaled", mixup_beta=0.5, specaugment=False, freq_mask_bins=8,
                              time_mask_frames=20, num_masks=0),
    mixing=MixingConfig(snr_sampler="fixed", snr_db=0.0),
    train=TrainConfig(lr=1e-3, weight_decay=1e-3, warmup_steps=0, total_steps=2, batch_size=2, grad_accum=1,
                      grad_clip=0.0, num_workers=1, log_every=1, checkpoint_every=1, seed=0),
    init_checkpoint="unused.pt", num_classes=NUM_MACHINE + NUM_NOISE, num_machine_classes=NUM_MACHINE, align_layer=2,
    batch_size_per_worker=2)
OBJECTIVE_FIELDS = {f.name for f in dataclasses.fields(ObjectiveConfig)}


def loop_config(objective: str | None = None, **over) -> LoopConfig:
    """BASE with another objective (its name), objective-section settings (lam_mode=...) or LoopConfig fields."""
    section = {k: over.pop(k) for k in list(over) if k in OBJECTIVE_FIELDS}
    section |= {"name": objective} if objective else {}
    return dataclasses.replace(BASE, objective=dataclasses.replace(BASE.objective, **section), **over)


def make_models(init_path, head=True, top_layer=3):
    torch.manual_seed(0)
    student = Student(load_beats(init_path), NUM_MACHINE + NUM_NOISE if head else None, top_layer).train()
    return student, load_beats(init_path).freeze()


def generators():
    return torch.Generator().manual_seed(1), np.random.default_rng(2)
