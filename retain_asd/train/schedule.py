"""Learning-rate schedules precomputed per optimiser step and indexed `lr[step]` (as in MAE / DINO).

A precomputed array makes the schedule a value, not state: resuming at step k is `lr[k]`, and the
whole curve can be logged or plotted before training starts.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> np.ndarray:
    """Linear warm-up from 0 to `base_lr`, then half a cosine down to `min_lr`; (total_steps,) float64.

        step s < W:       lr = base_lr * s / W                                  (lr[0] = 0)
        step s >= W:      lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2,
                          p = (s - W) / (total_steps - W - 1)                   (lr[W] = base_lr,
                                                                                 lr[-1] = min_lr)

    W = `warmup_steps` (the paper: 200 of 20k steps). With a single decay step it stays at base_lr.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps: must be an integer >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: must be an integer >= 0, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps: {warmup_steps} exceeds total_steps {total_steps}; "
                         "lower warmup_steps or raise total_steps")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr: must be a finite number > 0, got {base_lr!r}")
    if not (math.isfinite(min_lr) and 0 <= min_lr <= base_lr):
        raise ValueError(f"min_lr: must be in [0, base_lr={base_lr}], got {min_lr!r}")

    warmup = base_lr * np.arange(warmup_steps, dtype=np.float64) / max(warmup_steps, 1)  # (W,)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps, dtype=np.float64) / max(decay_steps - 1, 1)  # (total - W,) in [0, 1]
    decay = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay])
