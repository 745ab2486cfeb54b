"""Training objectives of "retain, not denoise" as pure torch functions, one per paper equation.

A student BEATs continues pre-training on machine sound mixed with factory noise; a frozen copy (the
teacher) gives the targets. The equations, as numbered in the paper:

    Eq. 1  denoising baseline      L_dn  = BCE(h(S(x_noisy)), y_machine)             -> `denoise_loss`
    Eq. 3  mixing at an SNR        x = a1 x1 + a2 x2, a1^2 P1 / (a2^2 P2) = R         -> `mixing.snr_gains`
    Eq. 4  tagging                 L_tag = BCE(h(S(x)), y), y multi-hot over C + N    -> `tagging_loss`
    Eq. 5  mixture target          T_mix = lam T(a1 x1) + (1 - lam) T(a2 x2)          -> `mixture_target`
    Eq. 6  mixture alignment       L_mix = MSE(S(x), T_mix) at frame level            -> `mixture_loss`
    Eq. 7  total                   L = alpha L_tag + beta L_mix                       -> `combined_loss`

plus the Table-2 baselines `linear_mixup` (ratio ~ Beta, soft labels) and `snr_mixup` (two noisy
mixtures mixed by Eq. 3, hard labels), and, beyond the paper, `lam_mode: snr` (`lam_from_snr`): lambda
from the sample's SNR, R / (1 + R), the paper's stated future work.

Conventions: S = student, T = teacher, h = linear tagging head on the time-pooled student output.
Label columns are ordered machine classes first, then noise classes (235 = 231 + 4 in the paper), so
the machine part of a multi-hot label is `y[:, :num_machine_classes]`. Nothing here imports Ray or
MLflow. The name lists (objectives, lambda modes, teacher inputs) live in `retain_asd.choices`; the config checks
every name when a Config is built; the functions here raise a clear error for an unknown name as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retain_asd.choices import LAM_MODES, OBJECTIVE_WEIGHTS, OBJECTIVES, TEACHER_INPUTS
from retain_asd.mixing import snr_gains

DEFAULT_LAM = 0.5  # paper default (Eq. 5)

# Which encoder block is aligned in Eq. 6 (1-based like the paper). None = the last block (12 for
# BEATs base), i.e. the output the teacher exposes (`extract_features` of the official code): aligning
# the output constrains the whole stack while leaving the inner layers (layer 6 is read for eval) free
# to reorganise, and it is the same sequence the tagging head pools. A number selects an inner block.
DEFAULT_ALIGN_LAYER: int | None = None

# What the teacher hears in Eq. 5. "scaled" (default): the two components as they are in the mixture,
# a1 x1 and a2 x2, so lam T(a1 x1) + (1 - lam) T(a2 x2) describes exactly the content of x = a1 x1 +
# a2 x2 (at low SNR the teacher hears a quiet machine, as the student does). "unit_power": each
# component rescaled to mean power 1, so the teacher's view of the machine does not depend on the SNR.
DEFAULT_TEACHER_INPUT = "scaled"


@dataclass(frozen=True)
class ObjectiveTerms:
    """Which loss terms and inputs an objective needs; the loop computes only these."""

    trains_student: bool  # False only for "frozen"
    uses_denoise: bool  # Eq. 1 (machine columns only)
    uses_tagging: bool  # Eq. 4 (all C + N columns)
    uses_mixture: bool  # Eq. 5-6, so the teacher must run on the two components
    mixup: str  # "none" | "linear" | "snr": how a second clip is mixed into the student's input

    @property
    def needs_teacher(self) -> bool:
        return self.uses_mixture

    @property
    def needs_head(self) -> bool:
        return self.uses_denoise or self.uses_tagging


_TERMS = {
    "frozen": ObjectiveTerms(False, False, False, False, "none"),
    "denoise": ObjectiveTerms(True, True, False, False, "none"),
    "linear_mixup": ObjectiveTerms(True, True, False, False, "linear"),
    "snr_mixup": ObjectiveTerms(True, True, False, False, "snr"),
    "tagging": ObjectiveTerms(True, False, True, False, "none"),
    "mixture": ObjectiveTerms(True, False, False, True, "none"),
    "tagging_mixture": ObjectiveTerms(True, False, True, True, "none"),
}
assert tuple(_TERMS) == OBJECTIVES
assert all(("alpha" in OBJECTIVE_WEIGHTS[k]) == (t.uses_tagging or t.uses_denoise)
           and ("beta" in OBJECTIVE_WEIGHTS[k]) == t.uses_mixture for k, t in _TERMS.items())


def objective_terms(objective: str) -> ObjectiveTerms:
    """The loss terms of a named objective; a clear error for an unknown name."""
    if objective not in _TERMS:
        raise ValueError(f"objective: unknown {objective!r}; use one of {', '.join(OBJECTIVES)}")
    return _TERMS[objective]


def resolve_align_layer(align_layer: int | None, num_layers: int) -> int:
    """The 1-based block aligned by Eq. 6: `align_layer`, or the last block when it is None."""
    if align_layer is None:
        return num_layers
    valid = isinstance(align_layer, int) and not isinstance(align_layer, bool)
    if not (valid and 1 <= align_layer <= num_layers):
        raise ValueError(
            f"align_layer: {align_layer!r} is not a block of this encoder; use 1..{num_layers} "
            "(1-based, like the paper) or null for the last block"
        )
    return align_layer


def _mean_power(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mean power per sample over all non-batch dims, in fp32 at least; a silent sample is an error."""
    power = x.flatten(1).to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=1)  # (B,)
    bad = ~(torch.isfinite(power) & (power > 0))
    if power.device.type != "cpu":  # checked on the device: a host sync here would stall the training step
        torch._assert_async(~bad.any(), f"{name}: a sample is silent or not finite (mean power 0/NaN/inf)")
    elif bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name}: samples {rows} are silent or not finite (mean power 0/NaN/inf); drop them")
    return power


def teacher_components(
    clean_scaled: torch.Tensor, noise_scaled: torch.Tensor, teacher_input: str = DEFAULT_TEACHER_INPUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two waveforms the teacher hears in Eq. 5, from the stream's scaled components a1 x1, a2 x2.

    "scaled" returns them unchanged; "unit_power" rescales each sample to mean power 1 (the noise
    already is, since a2 = 1 / sqrt(P2); the clean goes from power R back to 1).
    """
    if teacher_input == "scaled":
        return clean_scaled, noise_scaled
    if teacher_input == "unit_power":
        clean_power = _mean_power(clean_scaled, "clean_scaled")
        noise_power = _mean_power(noise_scaled, "noise_scaled")
        shape = (-1,) + (1,) * (clean_scaled.dim() - 1)
        return (
            clean_scaled / clean_power.sqrt().view(shape).to(clean_scaled.dtype),
            noise_scaled / noise_power.sqrt().view(shape).to(noise_scaled.dtype),
        )
    raise ValueError(f"teacher_input: unknown {teacher_input!r}; use one of {', '.join(TEACHER_INPUTS)}")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str, dims: int) -> None:
    if a.shape != b.shape or a.dim() != dims:
        raise ValueError(f"{names}: expected two {dims}-D tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


# --- Eq. 4 and Eq. 1: classification terms ------------------------------------------------------------

def tagging_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 4: L_tag = mean over samples and classes of BCE(sigmoid(logits), y), y multi-hot over C + N.

    logits: (B, C + N) from the tagging head; targets: (B, C + N) in [0, 1] (machine class + noise class;
    soft after linear mixup).
    """
    _check_same_shape(logits, targets, "tagging_loss(logits, targets)", 2)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def denoise_loss(logits: torch.Tensor, targets: torch.Tensor, num_machine_classes: int) -> torch.Tensor:
    """Eq. 1: L_dn = BCE over the machine-class columns only, on the noisy input.

    The student hears the noisy clip but is asked only for the machine, i.e. to ignore the noise; that
    is the "denoise" baseline the paper argues against. logits and targets: (B, C) or (B, C + N); the
    first `num_machine_classes` columns are the machine classes, any further (noise) columns are ignored.
    """
    _check_same_shape(logits, targets, "denoise_loss(logits, targets)", 2)
    if not 1 <= num_machine_classes <= logits.shape[1]:
        raise ValueError(f"num_machine_classes: {num_machine_classes} not in 1..{logits.shape[1]} "
                         "(the number of label columns)")
    c = num_machine_classes
    return F.binary_cross_entropy_with_logits(logits[:, :c], targets[:, :c].to(logits.dtype))


# --- Eq. 5-6: mixture alignment -----------------------------------------------------------------------

def mixture_target(
    teacher_clean: torch.Tensor, teacher_noise: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """Eq. 5: T_mix = lam * T(clean) + (1 - lam) * T(noise), frame by frame.

    teacher_clean, teacher_noise: (B, N, D) frame embeddings of the aligned layer; lam: a float or one
    weight per sample (B,). A float is kept a Python scalar so the result is bit-identical to the formula.
    """
    _check_same_shape(teacher_clean, teacher_noise, "mixture_target(teacher_clean, teacher_noise)", 3)
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 1 or lam.shape[0] != teacher_clean.shape[0]:
            raise ValueError(f"lam: expected a float or one value per sample ({teacher_clean.shape[0]},), "
                             f"got shape {tuple(lam.shape)}")
        lam = lam.view(-1, 1, 1)  # (B, 1, 1)
    return lam * teacher_clean + (1 - lam) * teacher_noise  # (B, N, D)


def mixture_loss(
    student_mixture: torch.Tensor,
    teacher_clean: torch.Tensor,
    teacher_noise: torch.Tensor,
    lam: float | torch.Tensor,
) -> torch.Tensor:
    """Eq. 6: L_mix = MSE(S(x), T_mix), the mean over all B * N * D elements.

    The target is a stop-gradient (detached): only the student learns. Computed in fp32 so a bf16
    student (autocast) is compared against the target without rounding the difference.
    """
    _check_same_shape(student_mixture, teacher_clean, "mixture_loss(student_mixture, teacher_clean)", 3)
    target = mixture_target(teacher_clean.detach(), teacher_noise.detach(), lam)  # (B, N, D)
    return F.mse_loss(student_mixture.float(), target.float())


def lam_from_snr(snr_db: float | np.ndarray | torch.Tensor) -> torch.Tensor:
    """lam = R / (1 + R), R = 10^(snr_db / 10): the clean share of the mixture's power (beyond the paper).

    Computed as sigmoid(snr_db * ln(10) / 10), the same value without overflow at extreme SNRs.
    0 dB -> 0.5; 10 dB -> 10/11; -10 dB -> 1/11.
    """
    snr_db = torch.as_tensor(snr_db)
    if not snr_db.is_floating_point():
        snr_db = snr_db.float()
    if snr_db.device.type != "cpu":  # checked on the device: no host sync inside the training step
        torch._assert_async(torch.isfinite(snr_db).all(), "snr_db: must be finite to derive lam (lam_mode: snr)")
    elif not bool(torch.isfinite(snr_db).all()):
        raise ValueError("snr_db: must be finite to derive lam (lam_mode: snr)")
    return torch.sigmoid(snr_db * (np.log(10.0) / 10.0))


def resolve_lam(lam_mode: str, lam: float, snr_db: torch.Tensor) -> torch.Tensor:
    """One lambda per sample (B,): the fixed `lam` ("fixed", the paper) or `lam_from_snr` ("snr")."""
    snr_db = torch.as_tensor(snr_db)
    if snr_db.dim() != 1:
        raise ValueError(f"snr_db: expected one SNR per sample (B,), got shape {tuple(snr_db.shape)}")
    if lam_mode == "fixed":
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam: {lam} must be in [0, 1]")
        return torch.full(snr_db.shape, float(lam), dtype=torch.float32, device=snr_db.device)
    if lam_mode == "snr":
        return lam_from_snr(snr_db).float()
    raise ValueError(f"lam_mode: unknown {lam_mode!r}; use one of {', '.join(LAM_MODES)}")


# --- Eq. 7: total ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossTerms:
    """The total and its parts (None when the objective does not use a term), each logged under its name."""

    total: torch.Tensor
    tagging: torch.Tensor | None = None  # Eq. 4
    mixture: torch.Tensor | None = None  # Eq. 6
    denoise: torch.Tensor | None = None  # Eq. 1 (the denoising baselines)

    def as_tensors(self, prefix: str = "loss") -> dict[str, torch.Tensor]:
        """Detached 0-d tensors, still on the device (no host sync): {"loss": total, "loss_tagging": ...}."""
        out = {prefix: self.total.detach()}
        for name in ("tagging", "mixture", "denoise"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}_{name}"] = value.detach()
        return out

    def as_floats(self, prefix: str = "loss") -> dict[str, float]:
        """Detached floats for logging: {"loss": total, "loss_tagging": ..., "loss_mixture": ..., ...}."""
        return {name: float(value) for name, value in self.as_tensors(prefix).items()}


def combined_loss(
    tagging: torch.Tensor | None, mixture: torch.Tensor | None, alpha: float, beta: float, *,
    denoise: torch.Tensor | None = None,
) -> LossTerms:
    """Eq. 7: L = alpha * L_tag + beta * L_mix, the one weighting rule of every objective.

    The classification term (Eq. 4 `tagging`, or the Eq. 1 `denoise` term of the baselines) is weighted by
    alpha, the mixture term by beta: tagging alone is "alpha=1, beta=0", mixture alone "alpha=0, beta=1"
    (Table 2). A term passed as None is absent (not computed); the config refuses a non-zero weight for an
    absent term (`config.validate_weights`).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha, beta: loss weights must be >= 0, got {alpha}, {beta}")
    if denoise is not None:
        if tagging is not None or mixture is not None:
            raise ValueError("combined_loss: the denoise term (Eq. 1) is not combined with tagging or mixture")
        return LossTerms(total=alpha * denoise, denoise=denoise)
    if tagging is None and mixture is None:
        raise ValueError("combined_loss: needs at least one of tagging, mixture, denoise")
    total = sum(w * t for w, t in ((alpha, tagging), (beta, mixture)) if t is not None)
    return LossTerms(total=total, tagging=tagging, mixture=mixture)


# --- Table-2 baselines: linear mixup and SNR mixup ------------------------------------------------------

def sample_mixup_ratio(
    generator: np.random.Generator | torch.Generator, batch: int, alpha_beta: float
) -> torch.Tensor:
    """Mixup ratios r ~ Beta(alpha_beta, alpha_beta), one per sample, (B,) float32.

    torch's Beta sampler takes no generator, so the draw is numpy's `Generator.beta`: give a numpy
    Generator (state saveable via `bit_generator.state`), or a torch.Generator, which seeds one.
    """
    if not alpha_beta > 0:
        raise ValueError(f"alpha_beta: the Beta parameter must be > 0, got {alpha_beta}")
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.beta(alpha_beta, alpha_beta, size=batch).astype(np.float32))


def linear_mixup(
    x1: torch.Tensor, x2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor, ratio: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear mixup: x = r x1 + (1 - r) x2 and soft labels y = r y1 + (1 - r) y2, r per sample (B,).

    x1, x2: (B, ...) noisy inputs (waveforms); y1, y2: (B, K) labels. The second clip is typically the
    batch permuted by `mixup_partners` (another clip per row).
    """
    if x1.shape != x2.shape or y1.shape != y2.shape or x1.shape[0] != y1.shape[0]:
        raise ValueError(f"linear_mixup: x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)} and y1 "
                         f"{tuple(y1.shape)}, y2 {tuple(y2.shape)} must pair up (same shapes, same batch)")
    if isinstance(ratio, torch.Tensor):
        if ratio.shape != (x1.shape[0],):
            raise ValueError(f"ratio: expected ({x1.shape[0]},), got {tuple(ratio.shape)}")
        rx = ratio.view((-1,) + (1,) * (x1.dim() - 1)).to(x1.dtype)
        ry = ratio.view((-1,) + (1,) * (y1.dim() - 1)).to(y1.dtype)
    else:
        rx = ry = ratio
    return rx * x1 + (1 - rx) * x2, ry * y1 + (1 - ry) * y2


def snr_mixup(
    mix1: torch.Tensor, mix2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor, snr_db: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SNR mixup: two noisy mixtures mixed by Eq. 3 at `snr_db` (mix1 as "clean", mix2 as "noise").

    x = a1 mix1 + a2 mix2 with the gains of `mixing.snr_gains`; labels are "hard" multi-hot: the union (elementwise max)
    of y1 and y2, whatever the SNR. mix1, mix2: (B, L) waveforms; y1, y2: (B, K); snr_db: float or (B,).
    """
    if mix1.shape != mix2.shape or mix1.dim() != 2 or y1.shape != y2.shape or y1.shape[0] != mix1.shape[0]:
        raise ValueError(f"snr_mixup: mix1 {tuple(mix1.shape)}, mix2 {tuple(mix2.shape)} must be (B, L) and "
                         f"y1 {tuple(y1.shape)}, y2 {tuple(y2.shape)} (B, K) with the same B")
    p1 = _mean_power(mix1, "first (mix1)")  # (B,)
    p2 = _mean_power(mix2, "second (mix2)")
    a1, a2 = snr_gains(p1, p2, torch.as_tensor(snr_db, dtype=p1.dtype, device=p1.device))  # (B,), (B,)
    x = a1[:, None].to(mix1.dtype) * mix1 + a2[:, None].to(mix2.dtype) * mix2  # (B, L)
    return x, torch.maximum(y1, y2)


def mixup_partners(clip_idx: np.ndarray | torch.Tensor, rng: np.random.Generator, tries: int = 64) -> np.ndarray:
    """Partner row per row for the mixup baselines: a seeded derangement whose partner is another clip.

    `clip_idx` (B,) identifies each row's clean clip (the stream's `clip_idx`; a class-weighted epoch may
    draw one clip twice). Rejection-samples permutations (about e tries for B = 16), then falls back to a
    construction: clips in random order, grouped, each row paired with the row half a batch away, which
    is another clip whenever no clip fills more than half the batch. Replaces `roll(1)`, whose partner is
    the neighbouring row: with rows grouped by shard, often the same clip or machine.
    """
    clip = np.asarray(clip_idx.cpu() if isinstance(clip_idx, torch.Tensor) else clip_idx).reshape(-1)
    b = len(clip)
    if b < 2:
        raise ValueError(f"mixup needs a batch of >= 2 rows to pair, got {b}")
    for _ in range(tries):
        perm = rng.permutation(b)
        if (clip[perm] != clip).all():
            return perm
    _, key = np.unique(clip, return_inverse=True)
    order = np.lexsort((rng.permutation(b), rng.permutation(key.max() + 1)[key]))  # random clip groups
    perm = np.empty(b, dtype=np.int64)
    perm[order] = order[(np.arange(b) + b // 2) % b]
    return perm
