"""Metrics against hand-computed values and the DCASE evaluator's rules."""

import math
import sys

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from retain_asd.eval.metrics import (
    EVALUATOR_EPS,
    MachineScore,
    auc_source,
    auc_target,
    decisions,
    gamma_threshold,
    hmean,
    jackknife_interval,
    machine_scores,
    official_score,
    official_score_interval,
    pauc,
    table2,
)


def pairwise_auc(normal, anomaly) -> float:
    """Mann-Whitney AUC by counting pairs (ties count 1/2)."""
    normal, anomaly = np.asarray(normal)[:, None], np.asarray(anomaly)[None, :]
    return float(np.mean((anomaly > normal) + 0.5 * (anomaly == normal)))


def mcclish_pauc(normal, anomaly, max_fpr=0.1) -> float:
    """pAUC from an ROC built by hand: area up to max_fpr (interpolated), McClish-standardised."""
    thresholds = np.unique(np.concatenate([normal, anomaly]))[::-1]
    fpr = np.array([0.0] + [np.mean(normal >= t) for t in thresholds])
    tpr = np.array([0.0] + [np.mean(anomaly >= t) for t in thresholds])
    area = 0.0
    for i in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], tpr[i - 1], tpr[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    a_min, a_max = max_fpr**2 / 2, max_fpr
    return 0.5 * (1 + (area - a_min) / (a_max - a_min))


# Tiny machine: source normals 0.1, 0.4; target normals 0.35, 0.8; anomalies 0.5 (source), 0.3 (target).
SCORES = [0.1, 0.4, 0.35, 0.8, 0.5, 0.3]
IS_ANOMALY = [0, 0, 0, 0, 1, 1]
IS_TARGET = [0, 0, 1, 1, 0, 1]


def test_domain_aucs_by_hand():
    # Source: anomalies {0.5, 0.3} vs normals {0.1, 0.4}: 0.5>0.1, 0.5>0.4, 0.3>0.1 -> 3/4.
    assert auc_source(SCORES, IS_ANOMALY, IS_TARGET) == 0.75
    # Target: anomalies {0.5, 0.3} vs normals {0.35, 0.8}: only 0.5>0.35 -> 1/4.
    assert auc_target(SCORES, IS_ANOMALY, IS_TARGET) == 0.25


def test_tie_counts_half():
    assert auc_source([0.2, 0.2], [0, 1], [0, 0]) == 0.5


def test_no_target_anomalies_uses_source_anomalies():
    # Evaluator mask (domain == target) | anomaly: the source anomaly 0.5 judges the target normals.
    scores, is_anomaly, is_target = [0.1, 0.6, 0.2, 0.5], [0, 0, 0, 1], [0, 1, 1, 0]
    assert auc_target(scores, is_anomaly, is_target) == 0.5  # 0.5 > 0.2, 0.5 < 0.6
    assert auc_source(scores, is_anomaly, is_target) == 1.0


def test_missing_domain_normals_is_a_clear_error():
    with pytest.raises(ValueError, match="target normal"):
        auc_target([0.1, 0.9], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="anomal"):
        pauc([0.1, 0.9], [0, 0])


def test_unbalanced_machine_matches_the_evaluator_rules():
    # 67 source normals, 40 source anomalies, 60 target normals, 33 target anomalies.
    rng = np.random.default_rng(7)
    counts = {(0, 0): 67, (0, 1): 40, (1, 0): 60, (1, 1): 33}  # (is_target, is_anomaly) -> n
    is_target = np.concatenate([np.full(n, d) for (d, _), n in counts.items()])
    is_anomaly = np.concatenate([np.full(n, a) for (_, a), n in counts.items()])
    scores = rng.normal(size=is_target.size) + 0.8 * is_anomaly + 0.3 * is_target
    perm = rng.permutation(scores.size)  # order must not matter
    scores, is_anomaly, is_target = scores[perm], is_anomaly[perm], is_target[perm]

    anomalies = scores[is_anomaly == 1]  # all 73, both domains
    want_s = pairwise_auc(scores[(is_anomaly == 0) & (is_target == 0)], anomalies)
    want_t = pairwise_auc(scores[(is_anomaly == 0) & (is_target == 1)], anomalies)
    want_p = mcclish_pauc(scores[is_anomaly == 0], anomalies)
    got = machine_scores(scores, is_anomaly, is_target)
    assert got.auc_source == pytest.approx(want_s, abs=1e-12)
    assert got.auc_target == pytest.approx(want_t, abs=1e-12)
    assert got.pauc == pytest.approx(want_p, abs=1e-12)
    assert got.hmean == pytest.approx(3 / (1 / want_s + 1 / want_t + 1 / want_p), abs=1e-12)
    # Not the within-domain AUC (the 2021 rule): the cross-domain anomalies change the figure.
    source = is_target == 0
    within = pairwise_auc(scores[(is_anomaly == 0) & source], scores[(is_anomaly == 1) & source])
    assert abs(got.auc_source - within) > 1e-3


def test_pauc_is_mcclish_not_area_over_max_fpr():
    rng = np.random.default_rng(1)
    normal, anomaly = rng.normal(size=127), rng.normal(size=73) + 1.0  # FPR 0.1 = 12.7 normals: interpolated
    scores = np.concatenate([normal, anomaly])
    labels = np.r_[np.zeros(127), np.ones(73)]
    got = pauc(scores, labels)
    assert got == pytest.approx(mcclish_pauc(normal, anomaly), abs=1e-12)
    # Perfect separation: McClish gives 1; the chance diagonal gives 0.5.
    assert pauc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0


def test_hmean_by_hand_and_errors():
    assert hmean([1.0, 0.5]) == pytest.approx(2 / 3, abs=1e-15)
    assert hmean([0.3, 0.7, 0.9]) == pytest.approx(scipy.stats.hmean([0.3, 0.7, 0.9]), abs=1e-15)
    for bad in ([0.5, 0.0], [0.5, -0.1], []):
        with pytest.raises(ValueError):
            hmean(bad)


def test_official_score_is_one_hmean_over_the_concatenation():
    a = MachineScore(0.5, 1.0, 0.5, hmean([0.5, 1.0, 0.5]))
    b = MachineScore(1.0, 0.25, 0.5, hmean([1.0, 0.25, 0.5]))
    # 6 values, reciprocals 2, 1, 1, 4, 2, 2 -> 6 / 12.
    assert official_score([a, b]) == pytest.approx(0.5, abs=1e-15)
    # Not the hmean of section-averaged AUCs (the per-machine-type "paper" table).
    assert official_score([a, b]) != pytest.approx(hmean([0.75, 0.625, 0.5]))


def test_official_score_clips_at_machine_epsilon_like_the_evaluator():
    zero = MachineScore(0.0, 1.0, 1.0, 0.0)
    assert official_score([zero]) == pytest.approx(3 / (1 / sys.float_info.epsilon + 2), rel=1e-12)
    assert EVALUATOR_EPS == sys.float_info.epsilon


def test_table2_hmeans_by_hand():
    results = {("factory_a", -10): 0.5, ("factory_a", -5): 0.5, ("factory_a", 0): 1.0, ("factory_a", 5): 1.0,
               ("factory_b", 20): 0.5, ("factory_b", -10): 0.5}
    rows = table2(results)
    assert [r.condition for r in rows] == ["factory_a", "factory_b", "all"]
    a, b, overall = rows
    assert list(a.scores_by_snr_db) == [-10, -5, 0, 5]
    assert a.hmean_low == pytest.approx(3 / 5)  # reciprocals 2, 2, 1
    assert a.hmean_all == pytest.approx(4 / 6)  # reciprocals 2, 2, 1, 1
    assert math.isnan(b.hmean_low)  # -5 and 0 dB missing
    assert b.hmean_all == pytest.approx(0.5)
    assert math.isnan(overall.hmean_low)
    assert overall.hmean_all == pytest.approx(6 / 10)  # reciprocals 2, 2, 1, 1, 2, 2
    results.update({("factory_b", -5): 1.0, ("factory_b", 0): 1.0})
    overall = table2(results)[-1]
    assert overall.hmean_low == pytest.approx(6 / 9)  # reciprocals 2, 2, 1 (A) + 2, 1, 1 (B)


def test_jackknife_of_a_mean_is_the_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    ci = jackknife_interval(values)
    half = 3.182446305284263 * np.std(values, ddof=1) / 2  # t_{0.975, 3} * s / sqrt(4)
    assert ci.value == ci.jackknife_estimate == pytest.approx(2.5)
    assert ci.half_width == pytest.approx(half, rel=1e-9)
    assert (ci.low, ci.high) == pytest.approx((2.5 - half, 2.5 + half))


def test_official_score_interval_leaves_out_one_section():
    scores = [MachineScore(a, t, p, hmean([a, t, p])) for a, t, p in
              [(0.8, 0.6, 0.55), (0.9, 0.7, 0.6), (0.7, 0.65, 0.52), (0.85, 0.5, 0.58)]]
    ci = official_score_interval(scores)
    assert ci.value == official_score(scores)
    loo = np.array([official_score(scores[:i] + scores[i + 1:]) for i in range(4)])
    pseudo = 4 * ci.value - 3 * loo
    assert ci.jackknife_estimate == pytest.approx(pseudo.mean())
    assert ci.half_width == pytest.approx(3.182446305284263 * pseudo.std(ddof=1) / 2)


def test_gamma_threshold_recovers_a_known_gamma_quantile():
    rng = np.random.default_rng(0)
    ref = rng.gamma(shape=2.0, scale=1.5, size=20_000) + 3.0
    want = 3.0 + scipy.stats.gamma.ppf(0.9, 2.0, scale=1.5)  # ~8.83
    assert gamma_threshold(ref, 0.9) == pytest.approx(want, rel=0.02)
    assert gamma_threshold(np.full(10, 2.0)) == 2.0
    with pytest.raises(ValueError):
        gamma_threshold([1.0, 2.0])


def test_decisions_are_strictly_above_threshold():
    assert decisions([0.1, 0.5, 0.9], 0.5).tolist() == [0, 0, 1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-500, 500), min_size=6, max_size=40, unique=True), st.integers(0, 2**32 - 1))
def test_auc_properties(scores, seed):
    rng = np.random.default_rng(seed)
    n = len(scores)
    is_anomaly = np.r_[0, 0, 1, 1, rng.integers(0, 2, n - 4)]
    is_target = np.r_[0, 1, 0, 1, rng.integers(0, 2, n - 4)]
    is_target[:2], is_anomaly[:2] = (0, 1), (0, 0)  # at least one normal per domain
    scores = np.asarray(scores, dtype=np.float64)
    s = auc_source(scores, is_anomaly, is_target)
    assert 0.0 <= s <= 1.0
    # Invariant to a strictly increasing transform; flipping the sign flips the AUC (no ties).
    assert auc_source(np.exp(scores / 100), is_anomaly, is_target) == pytest.approx(s, abs=1e-12)
    assert auc_source(-scores, is_anomaly, is_target) == pytest.approx(1 - s, abs=1e-12)
    assert 0.0 <= pauc(scores, is_anomaly) <= 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 40), st.booleans())
def test_replicate_machine_scores_equal_machine_scores(seed, n, ties):
    """The bootstrap's numpy ROC gives the sklearn-based figures (AUC_s, AUC_t, pAUC, hmean) to 1e-12."""
    from retain_asd.eval.metrics import replicate_machine_scores

    rng = np.random.default_rng(seed)
    is_anomaly = np.r_[np.zeros(n, bool), np.ones(n, bool), np.zeros(n, bool), rng.random(n) < 0.5]
    is_anomaly[-1] = True
    is_target = np.r_[np.zeros(2 * n, bool), np.ones(2 * n, bool)]
    scores = rng.standard_normal(4 * n) + is_anomaly * rng.uniform(0, 2)
    if ties:
        scores = np.round(scores, 1)
    ref, fast = machine_scores(scores, is_anomaly, is_target), replicate_machine_scores(scores, is_anomaly, is_target)
    for field in ("auc_source", "auc_target", "pauc", "hmean"):
        assert abs(getattr(ref, field) - getattr(fast, field)) < 1e-12, field
