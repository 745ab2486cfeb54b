"""Objectives against hand-computed numbers (literal values worked out in the comments)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retain_asd.train import objectives as obj

# log(1 + e^-2) and log(1 + e^-1), worked out by hand: log(1.1353352832) and log(1.3678794412).
SOFTPLUS_MINUS_2 = 0.1269280110
SOFTPLUS_MINUS_1 = 0.3132616875


# --- Eq. 4 tagging --------------------------------------------------------------------------------------

def test_tagging_loss_hand_value_1x2():
    # BCE(x, y=1) = log(1 + e^-x); BCE(x, y=0) = log(1 + e^x). x = (2, -1), y = (1, 0):
    # mean(log(1 + e^-2), log(1 + e^-1)) = (0.1269280110 + 0.3132616875) / 2 = 0.22009484925
    loss = obj.tagging_loss(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.22009484925, abs=1e-7)
    assert loss.item() == pytest.approx((SOFTPLUS_MINUS_2 + SOFTPLUS_MINUS_1) / 2, abs=1e-7)


def test_tagging_loss_soft_target_at_zero_logit_is_log2():
    # sigmoid(0) = 0.5, so BCE = -(y log 0.5 + (1 - y) log 0.5) = log 2 for any y.
    loss = obj.tagging_loss(torch.zeros(2, 3), torch.tensor([[0.3, 1.0, 0.0], [0.5, 0.25, 1.0]]))
    assert loss.item() == pytest.approx(0.69314718056, abs=1e-7)


def test_tagging_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="tagging_loss"):
        obj.tagging_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --- Eq. 1 denoise --------------------------------------------------------------------------------------

def test_denoise_loss_uses_machine_columns_only():
    # Two machine columns (2, -1 with targets 1, 0) -> same hand value as the tagging example.
    logits = torch.tensor([[2.0, -1.0, 5.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    loss = obj.denoise_loss(logits, targets, num_machine_classes=2)
    assert loss.item() == pytest.approx(0.22009484925, abs=1e-7)
    # Changing the noise columns (logits and targets) does not change the loss.
    logits2 = logits.clone()
    logits2[:, 2:] = torch.tensor([-40.0, 7.0])
    targets2 = targets.clone()
    targets2[:, 2:] = torch.tensor([1.0, 0.0])
    assert torch.equal(obj.denoise_loss(logits2, targets2, 2), loss)
    # A head with machine columns only gives the same value.
    assert torch.equal(obj.denoise_loss(logits[:, :2], targets[:, :2], 2), loss)


def test_denoise_loss_rejects_bad_class_count():
    with pytest.raises(ValueError, match="num_machine_classes"):
        obj.denoise_loss(torch.zeros(1, 3), torch.zeros(1, 3), num_machine_classes=4)
    with pytest.raises(ValueError, match="num_machine_classes"):
        obj.denoise_loss(torch.zeros(1, 3), torch.zeros(1, 3), num_machine_classes=0)


# --- Eq. 5-6 mixture ------------------------------------------------------------------------------------

def test_mixture_target_equals_eq5_bit_exact():
    g = torch.Generator().manual_seed(0)
    teacher_clean = torch.randn(3, 7, 5, generator=g)
    teacher_noise = torch.randn(3, 7, 5, generator=g)
    lam = 0.3
    assert torch.equal(obj.mixture_target(teacher_clean, teacher_noise, lam),
                       lam * teacher_clean + (1 - lam) * teacher_noise)
    lam_b = torch.tensor([0.1, 0.5, 0.9])
    expected = lam_b[:, None, None] * teacher_clean + (1 - lam_b[:, None, None]) * teacher_noise
    assert torch.equal(obj.mixture_target(teacher_clean, teacher_noise, lam_b), expected)


def test_mixture_target_per_sample_extremes():
    teacher_clean = torch.ones(2, 2, 2)
    teacher_noise = torch.full((2, 2, 2), 3.0)
    target = obj.mixture_target(teacher_clean, teacher_noise, torch.tensor([1.0, 0.0]))
    assert torch.equal(target[0], teacher_clean[0]) and torch.equal(target[1], teacher_noise[1])


def test_mixture_loss_hand_value():
    teacher_clean = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher_noise = torch.tensor([[[5.0, 6.0], [7.0, 8.0]]])
    # lam = 0.5 -> target [[3, 4], [5, 6]]; student differs by (0, 1, 0, 2) -> MSE = (0 + 1 + 0 + 4) / 4
    student = torch.tensor([[[3.0, 5.0], [5.0, 8.0]]])
    assert obj.mixture_loss(student, teacher_clean, teacher_noise, 0.5).item() == 1.25
    # lam = 0.25 -> target [[4, 5], [6, 7]]; differences (-1, 0, -1, 1) -> MSE = 3 / 4
    assert obj.mixture_loss(student, teacher_clean, teacher_noise, 0.25).item() == 0.75


def test_mixture_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mixture_loss"):
        obj.mixture_loss(torch.zeros(1, 4, 2), torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), 0.5)
    with pytest.raises(ValueError, match="lam"):
        obj.mixture_target(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.tensor([0.5, 0.5, 0.5]))


# --- lambda ---------------------------------------------------------------------------------------------

def test_lam_from_snr_hand_values():
    assert obj.lam_from_snr(0.0).item() == 0.5
    lam = obj.lam_from_snr(torch.tensor([10.0, -10.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([10 / 11, 1 / 11, 100 / 101], dtype=torch.float64))
    # No overflow to NaN at extreme SNRs: R -> inf gives 1, R -> 0 gives 0.
    assert obj.lam_from_snr(torch.tensor([400.0, -400.0])).tolist() == [1.0, 0.0]


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=-60, max_value=60))
def test_lam_from_snr_is_r_over_1_plus_r(snr_db):
    r = 10 ** (snr_db / 10)
    lam = obj.lam_from_snr(torch.tensor(snr_db, dtype=torch.float64)).item()
    assert lam == pytest.approx(r / (1 + r), rel=1e-12, abs=1e-15)
    # Swapping clean and noise swaps the shares.
    assert lam + obj.lam_from_snr(torch.tensor(-snr_db, dtype=torch.float64)).item() == pytest.approx(1.0)


def test_resolve_lam_modes():
    snr_db = torch.tensor([0.0, 10.0, -10.0])
    assert obj.resolve_lam("fixed", 0.5, snr_db).tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(obj.resolve_lam("snr", 0.5, snr_db), torch.tensor([0.5, 10 / 11, 1 / 11]))
    with pytest.raises(ValueError, match="fixed, snr"):
        obj.resolve_lam("adaptive", 0.5, snr_db)
    with pytest.raises(ValueError, match="lam"):
        obj.resolve_lam("fixed", 1.5, snr_db)
    with pytest.raises(ValueError, match="snr_db"):
        obj.resolve_lam("snr", 0.5, torch.tensor([float("nan")]))


# --- Eq. 7 combined, gradients -------------------------------------------------------------------------

def test_combined_loss_hand_value_and_parts():
    terms = obj.combined_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, beta=2.0)
    assert terms.total.item() == 7.0  # 0.5 * 2 + 2 * 3
    assert terms.as_floats() == {"loss": 7.0, "loss_tagging": 2.0, "loss_mixture": 3.0}
    only_mixture = obj.combined_loss(None, torch.tensor(3.0), alpha=1.0, beta=1.0)
    assert only_mixture.as_floats() == {"loss": 3.0, "loss_mixture": 3.0}
    with pytest.raises(ValueError, match="at least one"):
        obj.combined_loss(None, None, 1.0, 1.0)


def test_combined_gradients_reach_student_not_teacher():
    student = torch.tensor([[[3.0, 5.0], [5.0, 8.0]]], requires_grad=True)
    # Even if a caller forgot no_grad, the teacher target is a stop-gradient.
    teacher_clean = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    teacher_noise = torch.tensor([[[5.0, 6.0], [7.0, 8.0]]], requires_grad=True)
    logits = torch.tensor([[2.0, -1.0]], requires_grad=True)
    tagging = obj.tagging_loss(logits, torch.tensor([[1.0, 0.0]]))
    mixture = obj.mixture_loss(student, teacher_clean, teacher_noise, 0.5)
    obj.combined_loss(tagging, mixture, alpha=1.0, beta=2.0).total.backward()
    assert teacher_clean.grad is None and teacher_noise.grad is None
    # d/ds beta * mean((s - t)^2) = beta * 2 (s - t) / 4 with s - t = (0, 1, 0, 2), beta = 2.
    assert torch.equal(student.grad, torch.tensor([[[0.0, 1.0], [0.0, 2.0]]]))
    # d/dx BCE mean over 2 = (sigmoid(x) - y) / 2: (sigmoid(2) - 1) / 2, sigmoid(-1) / 2.
    torch.testing.assert_close(logits.grad, torch.tensor([[(0.8807970780 - 1) / 2, 0.2689414214 / 2]]))


# --- linear mixup ---------------------------------------------------------------------------------------

def test_linear_mixup_hand_values():
    x1, x2 = torch.tensor([[1.0, 2.0], [4.0, 4.0]]), torch.tensor([[3.0, 6.0], [0.0, 8.0]])
    y1, y2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    x, y = obj.linear_mixup(x1, x2, y1, y2, torch.tensor([0.25, 0.5]))
    # row 0: 0.25 * (1, 2) + 0.75 * (3, 6) = (2.5, 5); row 1: 0.5 * (4, 4) + 0.5 * (0, 8) = (2, 6)
    assert torch.equal(x, torch.tensor([[2.5, 5.0], [2.0, 6.0]]))
    assert torch.equal(y, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    x_f, y_f = obj.linear_mixup(x1, x2, y1, y2, 0.25)
    assert torch.equal(x_f[0], x[0]) and torch.equal(y_f[0], y[0])


def test_sample_mixup_ratio_is_seeded_numpy_beta():
    ratio = obj.sample_mixup_ratio(np.random.default_rng(7), 5, 0.4)
    expected = np.random.default_rng(7).beta(0.4, 0.4, size=5).astype(np.float32)
    assert ratio.dtype == torch.float32 and np.array_equal(ratio.numpy(), expected)
    # torch.Generator path: same seed -> same ratios, different seed -> different.
    a = obj.sample_mixup_ratio(torch.Generator().manual_seed(1), 4, 0.4)
    b = obj.sample_mixup_ratio(torch.Generator().manual_seed(1), 4, 0.4)
    c = obj.sample_mixup_ratio(torch.Generator().manual_seed(2), 4, 0.4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 1/7.2 for a = 0.4 (fixed seed, 20k draws).
    many = obj.sample_mixup_ratio(np.random.default_rng(0), 20_000, 0.4).double()
    assert ((many >= 0) & (many <= 1)).all()  # a = 0.4 piles mass at the ends; fp32 may round to 0 or 1
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 7.2) < 0.005
    with pytest.raises(ValueError, match="alpha_beta"):
        obj.sample_mixup_ratio(np.random.default_rng(0), 4, 0.0)


# --- SNR mixup (Eq. 3) ----------------------------------------------------------------------------------

def test_snr_mixup_hand_values_constant_signals():
    # mix1 = 2 (P1 = 4), mix2 = 0.5 (P2 = 0.25), 0 dB: a2 = 1 / 0.5 = 2, a1 = sqrt(1 / 4) = 0.5
    # -> x = 0.5 * 2 + 2 * 0.5 = 2 everywhere.
    x, _ = obj.snr_mixup(torch.full((1, 8), 2.0), torch.full((1, 8), 0.5),
                         torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    assert torch.equal(x, torch.full((1, 8), 2.0))
    # 20 dB: R = 100, a1 = sqrt(100 / 4) = 5 -> x = 5 * 2 + 2 * 0.5 = 11.
    x, _ = obj.snr_mixup(torch.full((1, 8), 2.0), torch.full((1, 8), 0.5),
                         torch.zeros(1, 2), torch.zeros(1, 2), 20.0)
    torch.testing.assert_close(x, torch.full((1, 8), 11.0))


def test_snr_mixup_measured_snr_and_union_labels():
    # Disjoint supports: the mixture's first half is the scaled mix1, its second half the scaled mix2,
    # so the SNR of the two components can be measured on the output itself.
    g = torch.Generator().manual_seed(3)
    batch, half = 4, 8000
    mix1 = torch.cat([torch.randn(batch, half, generator=g) * 0.3, torch.zeros(batch, half)], dim=1)
    mix2 = torch.cat([torch.zeros(batch, half), torch.randn(batch, half, generator=g) * 2.0], dim=1)
    snr_db = torch.tensor([-5.0, 0.0, 2.5, 5.0])
    y1 = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * batch)
    y2 = torch.tensor([[0.0, 1.0, 1.0, 0.0]] * batch)
    x, y = obj.snr_mixup(mix1, mix2, y1, y2, snr_db)
    energy = x.double().square()  # (B, L)
    measured_db = 10 * torch.log10(energy[:, :half].sum(1) / energy[:, half:].sum(1))
    assert (measured_db - snr_db.double()).abs().max().item() < 0.01
    # mix2 goes to unit power (a2 = 1 / sqrt(P2)).
    assert (x[:, half:].double().square().sum(1) / (2 * half) - 1.0).abs().max().item() < 1e-5
    assert torch.equal(y, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * batch))  # union, "hard" multi-hot


def test_snr_mixup_silent_input_is_an_error():
    mix2 = torch.ones(3, 10)
    mix2[1] = 0.0
    with pytest.raises(ValueError, match=r"mix2.*\[1\]"):
        obj.snr_mixup(torch.ones(3, 10), mix2, torch.zeros(3, 2), torch.zeros(3, 2), 0.0)


# --- names, layers, teacher inputs ----------------------------------------------------------------------

def test_objective_terms_names_and_errors():
    assert obj.OBJECTIVES == ("frozen", "denoise", "linear_mixup", "snr_mixup", "tagging", "mixture",
                              "tagging_mixture")
    both = obj.objective_terms("tagging_mixture")
    assert both.uses_tagging and both.uses_mixture and both.needs_teacher and not both.uses_denoise
    assert not obj.objective_terms("frozen").trains_student
    assert obj.objective_terms("snr_mixup").mixup == "snr" and obj.objective_terms("snr_mixup").uses_denoise
    assert not obj.objective_terms("tagging").needs_teacher
    assert not obj.objective_terms("mixture").needs_head
    with pytest.raises(ValueError, match="frozen, denoise, linear_mixup, snr_mixup, tagging, mixture"):
        obj.objective_terms("denoising")


def test_resolve_align_layer():
    assert obj.DEFAULT_ALIGN_LAYER is None
    assert obj.resolve_align_layer(None, 12) == 12
    assert obj.resolve_align_layer(6, 12) == 6
    for bad in (0, 13, True, 6.0):
        with pytest.raises(ValueError, match="align_layer"):
            obj.resolve_align_layer(bad, 12)


def test_teacher_components():
    clean = torch.full((2, 4), 3.0)  # power 9
    noise = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])  # powers 1 and 1
    same = obj.teacher_components(clean, noise, "scaled")
    assert same[0] is clean and same[1] is noise
    unit_clean, unit_noise = obj.teacher_components(clean, noise, "unit_power")
    assert torch.equal(unit_clean, torch.ones(2, 4)) and torch.equal(unit_noise, noise)
    with pytest.raises(ValueError, match="scaled, unit_power"):
        obj.teacher_components(clean, noise, "clean")
    with pytest.raises(ValueError, match="clean_scaled"):
        obj.teacher_components(torch.zeros(1, 4), noise[:1], "unit_power")
    assert obj.DEFAULT_TEACHER_INPUT in obj.TEACHER_INPUTS


def test_softplus_constants():
    # Guards the hand-computed constants used above.
    assert math.log1p(math.exp(-2)) == pytest.approx(SOFTPLUS_MINUS_2, abs=1e-10)
    assert math.log1p(math.exp(-1)) == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-10)


# --- mixup partners ---------------------------------------------------------------------------------------

def test_mixup_partners_is_a_seeded_derangement_over_clips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = int(rng.integers(2, 33))
        clip = rng.integers(0, max(2, b // 2), size=b)  # repeats: a class-weighted epoch draws clips twice
        if np.bincount(clip).max() > b // 2:
            continue  # no pairing can avoid the same clip then
        perm = obj.mixup_partners(clip, np.random.default_rng(7))
        assert sorted(perm.tolist()) == list(range(b))  # a permutation: each row is someone's partner once
        assert (clip[perm] != clip).all()  # never the same clip (so never the row itself)
        np.testing.assert_array_equal(perm, obj.mixup_partners(clip, np.random.default_rng(7)))
    # the construction used when rejection sampling gives up: 8 rows of one clip in 16
    clip = np.asarray([5] * 8 + list(range(10, 18)))
    perm = obj.mixup_partners(clip, np.random.default_rng(1), tries=0)
    assert sorted(perm.tolist()) == list(range(16)) and (clip[perm] != clip).all()
    assert (obj.mixup_partners(torch.arange(2), np.random.default_rng(0)) == [1, 0]).all()
    with pytest.raises(ValueError, match=">= 2 rows"):
        obj.mixup_partners(np.zeros(1), np.random.default_rng(0))
