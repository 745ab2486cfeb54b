"""`LoopConfig`: the flat, frozen, typed configuration one training worker receives.

Built once on the driver by `launch.loop_config_from` (from a `Config`, the label vocabulary and the initial
checkpoint) and handed to `loop.train_fn_per_worker` through Ray Train; the worker never reads a `Config`.
A misspelt or missing field, or a value of the wrong type, fails when it is built, on the driver.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopConfig:
    # ---- model
    init_checkpoint: str  # the BEATs checkpoint student and teacher start from (a path; in init_fs when set)
    layerdrop: bool  # model.layerdrop: the official iter3 layerdrop on the student
    grad_decay: bool  # model.grad_decay: iter3's per-layer gradient decay
    num_classes: int  # C + N tagging-head outputs (machine classes, then noise classes)
    num_machine_classes: int  # C: the columns Eq. 1 (denoise) reads
    # ---- objective (train/objectives.py)
    objective: str  # choices.OBJECTIVES
    alpha: float  # Eq. 7 weight of the tagging loss
    beta: float  # Eq. 7 weight of the mixture loss
    lam: float  # Eq. 5 lambda (lam_mode "fixed")
    lam_mode: str  # choices.LAM_MODES
    align_layer: int  # 1-based block aligned by Eq. 6 (resolved against the encoder)
    teacher_inputs: str  # choices.TEACHER_INPUTS
    mixup_beta: float  # linear mixup ratio ~ Beta(a, a)
    snr_sampler: dict  # mixing.make_snr_sampler kwargs (snr_mixup draws its SNR from it)
    specaugment: bool
    freq_mask_bins: int
    time_mask_frames: int
    num_masks: int
    # ---- optimisation and schedule
    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    batch_size_per_worker: int
    grad_accum: int
    grad_clip: float  # 0 = off
    # ---- logging, checkpoints, reproducibility
    log_every: int
    checkpoint_every: int
    seed: int  # train.seed: model init, per-rank RNGs (`seed_rngs`)
    stop_at_step: int | None = None  # stop after this step (checkpointed); None = total_steps
    skip_seen_batches: bool = True  # on resume, draw and drop the micro-batches already consumed
    skip_nonfinite_steps: int = 0  # divergence guard (train/guard.py): bad steps skipped before the run stops
    resume_from: str | None = None  # a new fit starts from this checkpoint folder (the newest complete one)
    resume_fs: object = None  # pyarrow filesystem of resume_from when it is in an object store (None: local)
    init_fs: object = None  # pyarrow filesystem of init_checkpoint when it is in an object store (None: local)
    noise_bank: object = None  # the stream's StreamPlan.state_ref: the bank each row's noise is formed from
    checkpoint_dir: str | None = None  # the local folder Ray Train persists checkpoints to (room checked first)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            allowed = typing.get_args(hint) or (hint,)
            allowed = tuple(type(None) if a is None else a for a in allowed)
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise TypeError(f"LoopConfig.{f.name} = {value!r}: expected {hint}")

    @property
    def stop(self) -> int:
        """The last optimiser step of this fit: stop_at_step, or total_steps."""
        return min(self.total_steps, self.stop_at_step or self.total_steps)
