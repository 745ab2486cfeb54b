"""`LoopConfig`: the frozen, typed configuration one training worker receives.

Built once on the driver by `launch.loop_config_from`: the config sections the loop reads, as they are
(model, objective, mixing, train), plus what only the driver can resolve (the label vocabulary's sizes, the
initial checkpoint, the aligned block, the per-worker batch, resume state); handed to `loop.train_fn_per_worker`
through Ray Train. A misspelt or missing field, or a value of the wrong type, fails when it is built.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from retain_asd.config import MixingConfig, ModelConfig, ObjectiveConfig, TrainConfig


@dataclass(frozen=True)
class LoopConfig:
    # ---- the config sections a worker reads, as they are (frozen dataclasses of retain_asd.config)
    model: ModelConfig  # layerdrop, grad_decay (the student's iter3 train-mode behaviour)
    objective: ObjectiveConfig  # name, alpha / beta (Eq. 7), lam / lam_mode (Eq. 5), teacher_inputs, mixup, masks
    mixing: MixingConfig  # the SNR sampler snr_mixup draws from (`snr_sampler_args`)
    train: TrainConfig  # optimiser, schedule, grad_accum / grad_clip, log and checkpoint cadence, seed, guard
    # ---- resolved on the driver
    init_checkpoint: str  # the BEATs checkpoint student and teacher start from (a path; in init_fs when set)
    num_classes: int  # C + N tagging-head outputs (machine classes, then noise classes)
    num_machine_classes: int  # C: the columns Eq. 1 (denoise) reads
    align_layer: int  # objective.align_layer resolved against the encoder (1-based block aligned by Eq. 6)
    batch_size_per_worker: int  # train.batch_size / train.num_workers
    stop_at_step: int | None = None  # stop after this step (checkpointed); None = train.total_steps
    skip_seen_batches: bool = True  # on resume, draw and drop the micro-batches already consumed
    checkpoint_dir: str | None = None  # the local folder Ray Train persists checkpoints to (room checked first)
    resume_from: str | None = None  # a new fit starts from this checkpoint folder (the newest complete one)
    resume_fs: object = None  # pyarrow filesystem of resume_from when it is in an object store (None: local)
    init_fs: object = None  # pyarrow filesystem of init_checkpoint when it is in an object store (None: local)
    validation: dict | None = None  # `train.validate.validation_args`: the validation sets and the scoring
    noise_bank: object = None  # the stream's StreamPlan.state_ref: the bank each row's noise is formed from

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
                raise TypeError(f"LoopConfig.{f.name} = {value!r}: expected {getattr(hint, '__name__', hint)}")

    @property
    def stop(self) -> int:
        """The last optimiser step of this fit: stop_at_step, or train.total_steps."""
        return min(self.train.total_steps, self.stop_at_step or self.train.total_steps)


def snr_sampler_args(mixing: MixingConfig) -> dict:
    """Flat `mixing.make_snr_sampler` arguments from the mixing section (the stream and snr_mixup draw from it)."""
    if mixing.snr_sampler == "fixed":
        return {"kind": "fixed", "snr_db": mixing.snr_db}
    if mixing.snr_sampler == "uniform":
        return {"kind": "uniform", "low_db": mixing.snr_low_db, "high_db": mixing.snr_high_db}
    return {"kind": "discrete", "values_db": list(mixing.snr_values_db)}
