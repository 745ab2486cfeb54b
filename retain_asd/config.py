"""Run configuration: frozen dataclasses whose defaults are the paper's, YAML in and out.

Every field has the paper's value (or the value its reference code uses) as default, with a short comment.
A preset (``retain_asd/presets/<name>.yaml``) is a partial YAML merged over these defaults: presets are data,
not code paths. Loading is strict: an unknown key is an error naming the key and the allowed ones, a value of
the wrong type or out of range is an error naming the field (``train.lr``) and what it must be.

Modules never read a ``Config``: builders (pipelines, train/launch.py) turn it into flat arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retain_asd.choices import (
    CONDITIONS,
    ENCODER_FAMILIES,
    LAM_MODES,
    LEVELS,
    OBJECTIVE_WEIGHTS,
    OBJECTIVES,
    SNR_SAMPLERS,
    TEACHER_INPUTS,
)

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------------- sections
class AutoBool(str):
    """A config field that is ``auto``, ``true`` or ``false`` (YAML booleans accepted), kept as that string."""


@dataclass(frozen=True)
class DataConfig:
    """The PRE-TRAINING corpus (paper Sec. 4.1); the evaluation corpus is `eval.machine_root` / `eval.noise_root`,
    disjoint from this one in machine types, clips and noise recordings (checked: corpus/protocol.py)."""

    machine_root: str = ""  # raw machine corpus (DCASE / MIMII DG / ToyADMOS2 tree); "" = synthetic pre-training world
    noise_root: str = ""  # noise folders <root>/<category>/*.wav + categories.yaml; "" = the world's synthetic noise
    work_dir: str = "runs/data"  # shards (corpus_pretrain/, corpus_eval/), eval sets, embedding cache live here
    storage: str = ""  # "" = durable output under work_dir / --out (local); s3://bucket/prefix = corpora, checkpoints,
    #                    students, MLflow artifacts in the bucket (endpoint, keys: AWS_* env vars); work_dir = scratch
    sample_rate_hz: int = 16000  # BEATs is trained on 16 kHz audio
    clip_s: float = 10.0  # DCASE clips are 10 s; everything is padded / cropped to this
    min_clip_s: float = 1.0  # shorter files are rejected rather than padded
    channel: str = "mean"  # "mean" or a channel index as a string ("0"): DCASE 2026 is stereo near/far mic
    rows_per_shard: int = 256  # at most this many Parquet rows per shard file
    audio_dtype: str = "float32"  # "float32" or "int16" audio column
    pad_mode: str = "zero"  # a short clip is zero-padded to clip_s (paper Sec. 4.2); "repeat" loops it
    include_test_normals: bool = False  # also pre-train on the normal test clips of this corpus (paper: 36,411 clips)
    add_eval_references: bool = False  # Table-5 "+ eval-reference data": eval references + eval noise join pre-training
    synth_seed: int = 0  # seed of the synthetic worlds (embedded default)
    synth_machines: tuple[str, ...] = ("fan", "pump", "gearbox", "compressor", "conveyor")  # pre-training world types
    synth_noise: tuple[str, ...] = ("pink_hum", "brown_fan", "bursts", "clatter")  # pre-training world noise
    synth_generic_per_family: int = 0  # > 0: add generic clean sounds (Table 5 "other data", AS-20K-like) per family


@dataclass(frozen=True)
class MixingConfig:
    snr_sampler: str = "uniform"  # "fixed" | "uniform" | "discrete"
    snr_low_db: float = -5.0  # paper: SNR ~ U[-5, 5] dB
    snr_high_db: float = 5.0
    snr_db: float = 0.0  # used by "fixed" (0 dB fixed is the paper's best Table-4 row)
    snr_values_db: tuple[float, ...] = ()  # used by "discrete"
    level: str = "unit_noise"  # Eq. 3 as written (noise at unit power) | "clean": the clean part keeps its power
    seed: int = 0  # pairing permutation and SNR draws


@dataclass(frozen=True)
class ModelConfig:
    family: str = "beats"  # encoder family: "beats" | "eat" (EAT / SSLAM); must match the checkpoint's
    size: str = "base"  # "base" (BEATs iter3 sizes) or "tiny" (tests, smoke runs)
    checkpoint: str = ""  # official BEATs .pt (BEATs_iter3.pt ...); "" = the initial encoder of `init`
    init: str = "foundation"  # with no checkpoint: "foundation" (the stand-in encoder of the `foundation` section,
    #                           trained once and cached) or "random" (a seeded random `size` BEATs: smoke tests only)
    layerdrop: bool = False  # iter3 trains with layerdrop 0.05; off for the student: alignment needs every layer
    grad_decay: bool = False  # iter3's per-layer gradient decay (0.6); off: the student must move its layers


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "tagging_mixture"  # frozen | denoise | linear_mixup | snr_mixup | tagging | mixture | tagging_mixture
    alpha: float = 1.0  # Eq. 7 weight of the tagging (or Eq. 1 denoise) loss; 0 for objectives without one
    beta: float = 1.0  # Eq. 7 weight of the mixture loss; 0 for objectives without one (OBJECTIVE_WEIGHTS)
    lam: float = 0.5  # Eq. 5 lambda: weight of teacher(clean) in the mixture target
    lam_mode: str = "fixed"  # "fixed" (paper) or "snr": lambda = R / (1 + R) from the sample's SNR
    align_layer: int = 12  # student/teacher layer aligned by the mixture loss (1-based)
    teacher_inputs: str = "scaled"  # "scaled": teacher sees a1*x1, a2*x2 (what is in the mixture); or "unit_power"
    mixup_beta: float = 0.5  # linear mixup ratio ~ Beta(a, a)
    specaugment: bool = True  # on the student's mixture input only
    freq_mask_bins: int = 48  # the paper gives none: AST's AudioSet recipe (48 bins, 192 frames, 1 mask each)
    time_mask_frames: int = 192
    num_masks: int = 1


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4  # AdamW
    weight_decay: float = 1e-3
    warmup_steps: int = 200  # linear warm-up, then cosine
    total_steps: int = 20000  # optimiser steps
    batch_size: int = 64  # global batch per optimiser micro-step, split across workers
    grad_accum: int = 2  # micro-batches per optimiser step
    grad_clip: float = 0.0  # max grad norm; 0 = off
    class_weighted: bool = True  # sample clips with weight 1 / count(class)
    num_workers: int = 2  # DDP workers (Ray Train)
    use_gpu: AutoBool = "auto"  # auto: a GPU per worker when the Ray cluster has GPUs; true / false to force
    cpus_per_worker: float = 0.5  # fractional so Ray Data read tasks keep a CPU (see README)
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    log_every: int = 10  # steps between ray.train.report of losses
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 3  # Ray Train FailureConfig: worker-group restarts from the latest checkpoint
    resource_wait_s: float = 600.0  # how long a worker group may wait to be placed (start, or a lost node); then stop
    skip_nonfinite_steps: int = 0  # divergence guard: skip up to N steps with a non-finite loss / grad norm
    compile: bool = False  # opt-in torch.compile of student and teacher: the first steps compile, later ones are faster
    validate_every: int = 0  # steps between scores of the student on the validation sets (val/hmean_low); 0 = off
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    machine_root: str = ""  # EVALUATION corpus (other machine types than data.machine_root); "" = synthetic eval world
    noise_root: str = ""  # its noise (categories.yaml: stationary -> Factory A, else Factory B); "" = synthetic
    synthetic: bool = False  # true: the synthetic evaluation world on purpose (needed with a real data.machine_root)
    validation_fraction: float = 0.3  # share of each machine's clips (and of the noise segments) kept for validation
    synth_machines: tuple[str, ...] = ("bearing", "blower", "slider", "spindle", "mixer",
                                       "turbine")  # evaluation world types (when roots are ""), 6 as the paper's
    synth_noise: tuple[str, ...] = ("hvac", "transformer", "hammering", "passby")  # stationary: hvac, transformer
    synth_noise_spread: float = 1.0  # > 1: each noise category's recordings vary that much more (noises.spread_draw)
    conditions: tuple[str, ...] = ("factory_a", "factory_b", "mismatch")
    snrs_db: tuple[float, ...] = (-10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 30.0)
    source_refs: int = 990  # normal source references per machine
    target_refs: int = 10  # normal target references per machine
    test_normal: int = 50  # normal test clips per domain
    test_anomaly: int = 50  # anomalous test clips per domain
    layer: int = 6  # student embeddings from layer 6 (1-based)
    ssl_layer: int = 12  # the frozen SSL baseline (`--checkpoint frozen`) is read at layer 12 (Table 2)
    pooling: str = "genrep"  # "genrep" (mean over time, flatten F*D) | "mean" | "spectral"
    k: int = 1  # kNN neighbours
    metric: str = "euclidean"  # or "cosine"
    memmixup: bool = False
    memmixup_k: int = 5  # MemMixup: K nearest source references mixed into each target reference
    memmixup_ratio: float = 0.9  # MemMixup: weight of the target reference in each mix
    primary: str = "dn"  # the reported figure: "dn" (domain normalisation, paper Table 2) or "raw" (Table 3)
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class ValidationConfig:
    """Validation sets, disjoint from the test sets: scored by `train.validate_every` (never the test
    sets). Built like the evaluation sets from the held-out share eval.validation_fraction of the evaluation
    corpus, or from a validation corpus of its own (e.g. a DCASE development set, with the evaluation set for
    testing)."""

    machine_root: str = ""  # "" = the held-out share of the evaluation corpus
    noise_root: str = ""  # with machine_root: the validation corpus's noise (categories.yaml as eval.noise_root)
    conditions: tuple[str, ...] = ("mismatch", "factory_b")  # scored during pre-training (train.validate_every)
    snrs_db: tuple[float, ...] = (-5.0, 0.0)  # the low-SNR end, where the methods differ


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 8  # draws of the random / optuna search (the grid runs each of its points once)
    snr_ranges_db: tuple[tuple[float, float], ...] = ((-5.0, 5.0), (0.0, 0.0), (-10.0, 10.0), (-5.0, 15.0))
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    betas: tuple[float, ...] = (0.5, 1.0, 2.0)
    metric: str = "hmean_all"  # the TEST figure reported per finished trial (selection is on val/hmean_low)
    max_concurrent: int = 1  # trials at once (Ray Tune's max_concurrent_trials)
    search: str = "grid"  # grid: every (SNR range, alpha, beta) once; random: num_samples draws; optuna: TPE
    scheduler: str = "fifo"  # fifo: every trial runs to the end; asha: Ray Tune's ASHA stops weak ones early
    grace_period: int = 1  # asha: validation points (train.validate_every steps each) before a trial may stop
    reduction_factor: float = 3.0  # asha: 1 / share of trials kept at each rung (Hyperband's eta)


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = sqlite:///<abs work dir>/mlflow.db
    experiment: str = "retain-asd"


@dataclass(frozen=True)
class FoundationConfig:
    """The stand-in foundation encoder for runs without a BEATs checkpoint: a BEATs trained on clean generic
    synthetic sounds, never mixtures, as BEATs iter3 is to the paper (Sec. 2). See retain_asd/train/foundation.py."""

    encoder_layers: int = 4  # BEATs blocks (iter3: 12)
    encoder_embed_dim: int = 128  # transformer width D (iter3: 768)
    encoder_ffn_embed_dim: int = 256
    encoder_attention_heads: int = 4
    patch_embed_dim: int = 64  # patch-embedding width (BEATs cfg `embed_dim`; iter3: 512)
    conv_pos: int = 16  # convolutional position-embedding kernel, in tokens (iter3: 128)
    conv_pos_groups: int = 4
    objective: str = "tagging"  # tagging | masked | masked_tagging | ema | ema_tagging | bestrq | bestrq_tagging
    mask_ratio: float = 0.75  # share of patch tokens masked (BEATs masks 75 %)
    ema_decay: float = 0.99  # ema: the teacher's EMA decay at the start (data2vec / EAT), rising to ema_decay_end
    ema_decay_end: float = 0.999
    families: str = "basic"  # generic sound families: "basic" (6 machine-like) | "rich" (+ textures, impacts, ...)
    clip_s: float = 2.0  # generic training clips (fresh ones every step)
    steps: int = 200  # optimiser steps: 2 min measured on 2 shared cores (4-8 min when heavily overloaded)
    batch_size: int = 16  # fresh generic clips per step
    lr: float = 1e-3  # AdamW, linear warm-up then cosine
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class StudyConfig:
    """`retain-asd study`: the Table-2 rows over seeds (retain_asd/experiments/study.py)."""

    rows: tuple[str, ...] = ("frozen", "denoise", "denoise_linear_mixup", "denoise_snr_mixup", "tagging_pm5",
                             "mixture_pm5", "tagging_mixture_pm5", "tagging_0db", "mixture_0db",
                             "tagging_mixture_0db")  # presets, or label:preset (their objective + mixing)
    seeds: tuple[int, ...] = (0, 1, 2)  # train.seed and mixing.seed of each run
    extra_layers: tuple[int, ...] = ()  # layers scored besides the primary one (logged, not in the table)
    base: str = "denoise"  # the row every other row is compared with (paired by seed and draw); "" = none


@dataclass(frozen=True)
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    foundation: FoundationConfig = field(default_factory=FoundationConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self):
        validate(self)


# ---------------------------------------------------------------------------------------------------- validation
_CHOICES = {
    "data.audio_dtype": ("float32", "int16"),
    "data.pad_mode": ("zero", "repeat"),
    "mixing.snr_sampler": SNR_SAMPLERS,
    "mixing.level": LEVELS,
    "model.size": ("base", "tiny"),
    "model.family": ENCODER_FAMILIES,
    "model.init": ("foundation", "random"),
    "objective.name": OBJECTIVES,
    "objective.lam_mode": LAM_MODES,
    "objective.teacher_inputs": TEACHER_INPUTS,
    "eval.pooling": ("genrep", "mean", "spectral"),
    "eval.metric": ("euclidean", "cosine"),
    "eval.primary": ("dn", "raw"),
    "foundation.objective": ("masked", "tagging", "masked_tagging", "ema", "ema_tagging", "bestrq", "bestrq_tagging"),
    "foundation.families": ("basic", "rich"),
    "train.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "train.use_gpu": ("auto", "true", "false"),
    "tune.search": ("grid", "random", "optuna"),
    "tune.scheduler": ("fifo", "asha"),
}


def _check(ok: bool, name: str, must: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r}: must be {must}")


def validate(cfg: Config) -> None:
    """Range and choice checks that a type alone cannot express; raises ConfigError naming the field."""
    validate_finite(cfg)  # first: a NaN would otherwise surface as a confusing range error
    for name, allowed in _CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        _check(value in allowed, name, f"one of {list(allowed)}", value)
    d, m, o, t, e = cfg.data, cfg.mixing, cfg.objective, cfg.train, cfg.eval
    _check(d.sample_rate_hz > 0, "data.sample_rate_hz", "> 0", d.sample_rate_hz)
    _check(d.clip_s > 0, "data.clip_s", "> 0", d.clip_s)
    _check(0 < d.min_clip_s <= d.clip_s, "data.min_clip_s", "in (0, data.clip_s]", d.min_clip_s)
    _check(d.channel == "mean" or d.channel.isdigit(), "data.channel", '"mean" or a channel index', d.channel)
    _check(d.rows_per_shard > 0, "data.rows_per_shard", "> 0", d.rows_per_shard)
    if d.storage:
        from retain_asd.storage import check_uri

        try:
            check_uri(d.storage)
        except ValueError as err:
            raise ConfigError(f"data.storage: {err}") from None
    _check(d.synth_generic_per_family >= 0, "data.synth_generic_per_family", ">= 0", d.synth_generic_per_family)
    _check(len(d.synth_machines) > 0 or d.synth_generic_per_family > 0, "data.synth_machines",
           "non-empty, or data.synth_generic_per_family > 0 (pre-training needs clips)", d.synth_machines)
    _check(m.snr_low_db <= m.snr_high_db, "mixing.snr_low_db",
           f"<= mixing.snr_high_db ({m.snr_high_db})", m.snr_low_db)
    if m.snr_sampler == "discrete":
        _check(len(m.snr_values_db) > 0, "mixing.snr_values_db", "non-empty for the discrete sampler", ())
    _check(t.lr > 0, "train.lr", "> 0", t.lr)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(t.total_steps > 0, "train.total_steps", "> 0", t.total_steps)
    _check(0 <= t.warmup_steps <= t.total_steps, "train.warmup_steps", "in [0, train.total_steps]",
           t.warmup_steps)
    _check(t.batch_size > 0, "train.batch_size", "> 0", t.batch_size)
    _check(t.batch_size % t.num_workers == 0 if t.num_workers > 0 else False, "train.batch_size",
           f"a multiple of train.num_workers ({t.num_workers})", t.batch_size)
    _check(t.grad_accum >= 1, "train.grad_accum", ">= 1", t.grad_accum)
    _check(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 = off)", t.grad_clip)
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "> 0", t.cpus_per_worker)
    _check(t.log_every > 0 and t.checkpoint_every > 0, "train.log_every/checkpoint_every", "> 0",
           (t.log_every, t.checkpoint_every))
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", t.keep_checkpoints)
    _check(t.validate_every >= 0, "train.validate_every", ">= 0 (0 = off)", t.validate_every)
    _check(0.0 <= o.lam <= 1.0, "objective.lam", "in [0, 1]", o.lam)
    _check(o.alpha >= 0 and o.beta >= 0, "objective.alpha/beta", ">= 0", (o.alpha, o.beta))
    validate_weights(o.name, o.alpha, o.beta)
    _check(1 <= o.align_layer <= 48, "objective.align_layer", "a 1-based layer index", o.align_layer)
    _check(o.mixup_beta > 0, "objective.mixup_beta", "> 0", o.mixup_beta)
    _check(all(c in CONDITIONS for c in e.conditions) and len(e.conditions) > 0, "eval.conditions",
           f"a non-empty subset of {list(CONDITIONS)}", e.conditions)
    _check(len(e.snrs_db) > 0, "eval.snrs_db", "non-empty", e.snrs_db)
    _check(0.0 <= e.validation_fraction < 1.0, "eval.validation_fraction", "in [0, 1)", e.validation_fraction)
    _check(math.isfinite(e.synth_noise_spread) and e.synth_noise_spread > 0, "eval.synth_noise_spread",
           "a number > 0 (1 = the generators' own ranges)", e.synth_noise_spread)
    v = cfg.validation
    _check(all(c in CONDITIONS for c in v.conditions) and len(v.conditions) > 0, "validation.conditions",
           f"a non-empty subset of {list(CONDITIONS)}", v.conditions)
    _check(len(v.snrs_db) > 0, "validation.snrs_db", "non-empty", v.snrs_db)
    _check(bool(v.machine_root) == bool(v.noise_root), "validation.machine_root / validation.noise_root",
           "both set (a validation corpus of its own) or both empty (a share of the evaluation corpus)",
           (v.machine_root, v.noise_root))
    _check(not (e.synthetic and (e.machine_root or e.noise_root)), "eval.synthetic",
           "false when eval.machine_root / eval.noise_root name a real evaluation corpus", e.synthetic)
    _check(e.source_refs > 0 and e.target_refs > 0, "eval.source_refs/target_refs", "> 0",
           (e.source_refs, e.target_refs))
    _check(e.test_normal > 0 and e.test_anomaly > 0, "eval.test_normal/test_anomaly", "> 0",
           (e.test_normal, e.test_anomaly))
    _check(e.layer >= 1, "eval.layer", ">= 1 (layers are 1-based)", e.layer)
    _check(e.ssl_layer >= 1, "eval.ssl_layer", ">= 1 (layers are 1-based)", e.ssl_layer)
    _check(e.k >= 1, "eval.k", ">= 1", e.k)
    _check(e.memmixup_k >= 1, "eval.memmixup_k", ">= 1", e.memmixup_k)
    _check(0.0 <= e.memmixup_ratio <= 1.0, "eval.memmixup_ratio", "in [0, 1]", e.memmixup_ratio)
    _check(all(lo <= hi for lo, hi in cfg.tune.snr_ranges_db), "tune.snr_ranges_db",
           "pairs (low, high) with low <= high", cfg.tune.snr_ranges_db)
    _check(cfg.tune.num_samples >= 1, "tune.num_samples", ">= 1", cfg.tune.num_samples)
    fd = cfg.foundation
    _check(fd.encoder_layers >= 1 and fd.steps >= 1 and fd.batch_size >= 1,
           "foundation.encoder_layers/steps/batch_size", ">= 1", (fd.encoder_layers, fd.steps, fd.batch_size))
    _check(fd.encoder_embed_dim % fd.encoder_attention_heads == 0, "foundation.encoder_embed_dim",
           f"a multiple of foundation.encoder_attention_heads ({fd.encoder_attention_heads})", fd.encoder_embed_dim)
    _check(fd.encoder_embed_dim % fd.conv_pos_groups == 0, "foundation.conv_pos_groups",
           f"a divisor of foundation.encoder_embed_dim ({fd.encoder_embed_dim})", fd.conv_pos_groups)
    _check(0.0 < fd.mask_ratio < 1.0, "foundation.mask_ratio", "in (0, 1)", fd.mask_ratio)
    _check(0.0 <= fd.ema_decay <= fd.ema_decay_end < 1.0, "foundation.ema_decay/ema_decay_end",
           "0 <= ema_decay <= ema_decay_end < 1", (fd.ema_decay, fd.ema_decay_end))
    _check(fd.clip_s >= 0.5, "foundation.clip_s", ">= 0.5 (BEATs needs 16 fbank frames)", fd.clip_s)
    _check(fd.lr > 0 and fd.weight_decay >= 0, "foundation.lr/weight_decay", "> 0 / >= 0", (fd.lr, fd.weight_decay))
    _check(0 <= fd.warmup_steps < fd.steps, "foundation.warmup_steps", "in [0, foundation.steps)", fd.warmup_steps)
    st = cfg.study
    _check(len(st.rows) > 0 and len(st.seeds) > 0, "study.rows/seeds", "non-empty", (st.rows, st.seeds))
    validate_numbers(cfg)


def uses_foundation(cfg: Config) -> bool:
    """True when the initial (and `frozen`) encoder is the stand-in foundation encoder: no checkpoint given,
    model.init = "foundation", BEATs family."""
    return not cfg.model.checkpoint and cfg.model.init == "foundation" and cfg.model.family == "beats"


# ---------------------------------------------------------------------------------------------------- numbers
# Checked before any work starts (a multi-hour job must not fail in its workers on a typo): every number
# finite, and the ranges a type cannot express. Sweep values are checked here too, and each trial's whole
# config again when the sweep is planned (tune/space.py).
SWEEP_METRICS = ("hmean_all", "hmean_low", "hmean_all_dn", "hmean_low_dn")


def _numbers(value: Any, name: str) -> typing.Iterator[tuple[str, float]]:
    """(field name, number) for every int/float in a config section, tuples included."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _numbers(getattr(value, f.name), f"{name}.{f.name}" if name else f.name)
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{name}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield name, value


def validate_weights(objective: str, alpha: float, beta: float, prefix: str = "objective.") -> None:
    """Eq. 7 for every objective: a weight the objective cannot use must be 0, one it uses must be > 0."""
    uses = OBJECTIVE_WEIGHTS.get(objective, ())
    terms = {"alpha": "no tagging / classification term (Eq. 1 / 4)", "beta": "no mixture term (Eq. 5-6)"}
    for name, value in (("alpha", alpha), ("beta", beta)):
        if name not in uses and value != 0:
            raise ConfigError(f"{prefix}{name} = {value!r}: objective {objective!r} has {terms[name]}, so the Eq. 7 "
                              f"weight is unused; set {prefix}{name}: 0 (it is never silently ignored)")
    if uses and all((alpha, beta)[("alpha", "beta").index(n)] == 0 for n in uses):
        raise ConfigError(f"{prefix}{'/'.join(uses)} = 0: objective {objective!r} would train on a zero loss; "
                          f"give {' or '.join(prefix + n for n in uses)} a weight > 0")


def validate_finite(cfg: Config) -> None:
    for name, value in _numbers(cfg, ""):
        _check(math.isfinite(value), name, "a finite number", value)


def validate_numbers(cfg: Config) -> None:
    """Counts, sizes and weights in range; sweep values too (finiteness: validate_finite). Raises ConfigError."""
    t, o, e, tu = cfg.train, cfg.objective, cfg.eval, cfg.tune
    _check(t.num_workers >= 1, "train.num_workers", ">= 1", t.num_workers)
    _check(t.max_failures >= 0, "train.max_failures", ">= 0 (worker-group restarts)", t.max_failures)
    _check(t.resource_wait_s > 0, "train.resource_wait_s", "> 0 (seconds a worker group may wait for its resources)",
           t.resource_wait_s)
    _check(t.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps", ">= 0 (steps the divergence guard may skip)",
           t.skip_nonfinite_steps)
    _check(e.batch_size > 0, "eval.batch_size", "> 0", e.batch_size)
    _check(e.layer <= 48, "eval.layer", "a 1-based layer index (<= the encoder's depth)", e.layer)
    _check(min(o.freq_mask_bins, o.time_mask_frames, o.num_masks) >= 0,
           "objective.freq_mask_bins/time_mask_frames/num_masks", ">= 0",
           (o.freq_mask_bins, o.time_mask_frames, o.num_masks))
    _check(cfg.data.rows_per_shard > 0, "data.rows_per_shard", "> 0", cfg.data.rows_per_shard)
    _check(len(tu.alphas) > 0 and all(a >= 0 for a in tu.alphas), "tune.alphas",
           "a non-empty list of weights >= 0", tu.alphas)
    _check(len(tu.betas) > 0 and all(b >= 0 for b in tu.betas), "tune.betas",
           "a non-empty list of weights >= 0", tu.betas)
    _check(len(tu.snr_ranges_db) > 0, "tune.snr_ranges_db", "non-empty", tu.snr_ranges_db)
    _check(tu.max_concurrent >= 1, "tune.max_concurrent", ">= 1", tu.max_concurrent)
    _check(tu.metric in SWEEP_METRICS, "tune.metric", f"one of {list(SWEEP_METRICS)} (the test figure reported; "
           "trials are selected on val/hmean_low)", tu.metric)
    _check(tu.grace_period >= 1, "tune.grace_period", ">= 1 (validation points before ASHA may stop a trial)",
           tu.grace_period)
    _check(tu.reduction_factor > 1, "tune.reduction_factor", "> 1 (ASHA keeps 1 / reduction_factor of the trials "
           "at each rung)", tu.reduction_factor)


def check_layer(layer: int, depth: int, name: str, source: str | os.PathLike) -> None:
    """A 1-based layer must exist in an encoder of ``depth`` blocks (known once the checkpoint is open)."""
    _check(1 <= layer <= depth, name, f"in 1..{depth}: {source} has {depth} encoder layers", layer)


# ---------------------------------------------------------------------------------------------------- dict / YAML
def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, name)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name} = {value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in the config")
    if tp is AutoBool:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value.lower()
        raise ConfigError(f"{name} = {value!r}: expected auto, true or false")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} = {value!r}: expected a string")
    raise ConfigError(f"{name}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        where = f"in '{prefix}'" if prefix else "at the top level"
        raise ConfigError(f"unknown key {unknown[0]!r} {where}; allowed keys: {', '.join(allowed)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML / MLflow params."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping, got {type(values).__name__}")
    return _build(Config, values)


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_yaml(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (written next to every checkpoint and run)."""
    from retain_asd import fsio

    return fsio.write_text(path, to_yaml(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    return values


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r}: empty key; expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())  # one line
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({first})") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(preset: str | None = None, path: str | os.PathLike | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- preset <- file <- KEY=VALUE overrides; validated once at the end."""
    values: dict = {}
    if preset is not None:
        preset_path = PRESETS_DIR / f"{preset}.yaml"
        if not preset_path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        values = merge_dicts(values, read_yaml(preset_path))
        values.setdefault("name", preset)
    if path is not None:
        values = merge_dicts(values, read_yaml(Path(path)))
    for text in overrides:
        values = merge_dicts(values, parse_override(text))
    try:
        return from_dict(values)
    except ConfigError as err:
        source = f"{path}: " if path is not None else (f"preset {preset}: " if preset else "")
        raise ConfigError(f"{source}{err}") from None
