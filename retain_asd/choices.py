"""The choice lists: every name a config setting may take where code acts on the name, defined once.

The ground floor: `config.py` checks settings against these lists, and the modules that act on the names
(`mixing.py`, `train/objectives.py`, `eval/evalsets.py`, `models/`) import them from here, never the config
schema. Plain tuples and dicts of strings; the encoder families are the model registry's (which imports nothing).
"""

from __future__ import annotations

from retain_asd.models.registry import FAMILIES

OBJECTIVES = (
    "frozen",  # no training: the pre-trained BEATs as is (Table 2, first row)
    "denoise",  # Eq. 1: BCE over machine classes on the noisy input
    "linear_mixup",  # Eq. 1 on linear mixup of two noisy clips (ratio ~ Beta(a, a), soft labels)
    "snr_mixup",  # Eq. 1 on two noisy clips mixed by Eq. 3 at an SNR (hard, union labels)
    "tagging",  # Eq. 4: BCE over machine + noise classes (C + N multi-hot)
    "mixture",  # Eq. 5-6: student(mixture) aligned to lam T(clean) + (1 - lam) T(noise)
    "tagging_mixture",  # Eq. 7: alpha * tagging + beta * mixture (the paper's method)
)
# Eq. 7 is the only weighting rule: L = alpha * L_tag + beta * L_mix for every objective. alpha weights the
# classification term (Eq. 4 tagging, or Eq. 1 for the denoising baselines), beta the mixture term (Eq. 5-6).
# The weights an objective can use; any other must be 0 (Table 2: "Tagging Loss (alpha=1, beta=0)").
OBJECTIVE_WEIGHTS = {
    "frozen": (),
    "denoise": ("alpha",),
    "linear_mixup": ("alpha",),
    "snr_mixup": ("alpha",),
    "tagging": ("alpha",),
    "mixture": ("beta",),
    "tagging_mixture": ("alpha", "beta"),
}
SNR_SAMPLERS = ("fixed", "uniform", "discrete")  # mixing.make_snr_sampler kinds
LEVELS = ("unit_noise", "clean")  # mixing.level_gains: Eq. 3 as written, or both parts rescaled to the clean's power
LAM_MODES = ("fixed", "snr")  # fixed: the paper (lam = 0.5); snr: lam = R / (1 + R)
TEACHER_INPUTS = ("scaled", "unit_power")  # what the teacher hears in Eq. 5 (objectives.teacher_components)
CONDITIONS = ("factory_a", "factory_b", "mismatch")  # the evaluation sets (eval/evalsets.py), in table order
ENCODER_FAMILIES = tuple(FAMILIES)  # model.family: the families of retain_asd/models/registry.py

__all__ = ["CONDITIONS", "ENCODER_FAMILIES", "LAM_MODES", "LEVELS", "OBJECTIVES", "OBJECTIVE_WEIGHTS",
           "SNR_SAMPLERS", "TEACHER_INPUTS"]
