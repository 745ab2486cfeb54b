"""The one definition of every evaluation metric (DCASE Task 2 rules, GenRep Table 2).

Rules follow the official evaluators (nttcslab/dcase2023_task2_evaluator,
Kota-Dohi/dcase2022_evaluator, `dcase2023_task2_evaluator.py`):

- AUC_source: source-domain normals + ALL anomalies of both domains (the evaluator's mask
  ``(y_domain == 0) | (y_true != 0)``); AUC_target likewise with target normals. A machine with no
  target anomalies therefore still has an AUC_target (its source anomalies stand in).
- pAUC: ``sklearn.metrics.roc_auc_score(max_fpr=0.1)`` over all clips of the section: the McClish
  standardised partial AUC, not area / 0.1.
- Official score: ONE harmonic mean over the concatenation [AUC_s..., AUC_t..., pAUC...] of every
  machine/section, each value clipped below at machine epsilon as the evaluator does. With unequal
  section counts this is not the hmean of per-machine hmeans.

Numpy + scikit-learn + scipy only: no torch, Ray or MLflow here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
from sklearn.metrics import roc_auc_score

MAX_FPR = 0.1  # pAUC range of the DCASE Task 2 rules
EVALUATOR_EPS = sys.float_info.epsilon  # the evaluator clips values to >= eps before its hmean
LOW_SNRS_DB = (-10, -5, 0)  # Table 2 "low SNR" group


def _as_labels(scores, is_anomaly, is_target=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert inputs to (scores float64, is_anomaly bool, is_target bool | None)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_anomaly = np.asarray(is_anomaly).reshape(-1)
    if is_anomaly.shape != scores.shape:
        raise ValueError(f"is_anomaly has {is_anomaly.size} entries but scores has {scores.size}")
    if not np.all(np.isin(is_anomaly, (0, 1))):
        raise ValueError("is_anomaly must hold only 0/1 or False/True")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf: fix the scorer before computing metrics")
    if is_target is not None:
        is_target = np.asarray(is_target).reshape(-1)
        if is_target.shape != scores.shape:
            raise ValueError(f"is_target has {is_target.size} entries but scores has {scores.size}")
        if not np.all(np.isin(is_target, (0, 1))):
            raise ValueError("is_target must hold only 0/1 or False/True (0 = source, 1 = target)")
        is_target = is_target.astype(bool)
    return scores, is_anomaly.astype(bool), is_target


def _domain_auc(scores, is_anomaly, is_target, domain_is_target: bool) -> float:
    """AUC over the domain's normals + every anomaly (both domains), as the evaluator masks them."""
    scores, is_anomaly, is_target = _as_labels(scores, is_anomaly, is_target)
    name = "target" if domain_is_target else "source"
    keep = (is_target == domain_is_target) | is_anomaly
    n_normal = int(np.sum(keep & ~is_anomaly))
    n_anomaly = int(np.sum(is_anomaly))
    if n_normal == 0 or n_anomaly == 0:
        # The evaluator would crash in roc_auc_score here; say which class is missing instead.
        raise ValueError(
            f"AUC_{name} needs at least one {name} normal and one anomaly; got {n_normal} {name} "
            f"normals and {n_anomaly} anomalies"
        )
    return float(roc_auc_score(is_anomaly[keep], scores[keep]))


def auc_source(scores, is_anomaly, is_target) -> float:
    """AUC of source normals vs all anomalies (both domains). Higher score = more anomalous."""
    return _domain_auc(scores, is_anomaly, is_target, domain_is_target=False)


def auc_target(scores, is_anomaly, is_target) -> float:
    """AUC of target normals vs all anomalies (both domains). Higher score = more anomalous."""
    return _domain_auc(scores, is_anomaly, is_target, domain_is_target=True)


def pauc(scores, is_anomaly, max_fpr: float = MAX_FPR) -> float:
    """McClish-standardised partial AUC over FPR in [0, max_fpr] on all clips (sklearn's definition).

    pAUC_std = 1/2 (1 + (A - A_min) / (A_max - A_min)), A = area under the ROC up to max_fpr
    (interpolated at max_fpr), A_min = max_fpr^2 / 2, A_max = max_fpr (McClish 1989).
    """
    scores, is_anomaly, _ = _as_labels(scores, is_anomaly)
    if is_anomaly.all() or not is_anomaly.any():
        raise ValueError("pAUC needs both normal and anomalous clips")
    return float(roc_auc_score(is_anomaly, scores, max_fpr=max_fpr))


def hmean(values) -> float:
    """Harmonic mean (scipy.stats.hmean); every value must be > 0 (an AUC of 0 is a bug upstream)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("hmean of an empty list")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = values[~np.isfinite(values) | (values <= 0)]
        raise ValueError(f"hmean needs finite values > 0; got {bad.tolist()[:5]}")
    return float(scipy.stats.hmean(values))


@dataclass(frozen=True)
class MachineScore:
    """Figures of one machine (one section) of the DCASE rules."""

    auc_source: float
    auc_target: float
    pauc: float
    hmean: float  # hmean over [auc_source, auc_target, pauc] = official_score([self])


def machine_scores(scores, is_anomaly, is_target, max_fpr: float = MAX_FPR) -> MachineScore:
    """AUC_source, AUC_target, pAUC and their hmean for the test clips of one machine/section.

    Source-only test sets (DCASE 2020: no target clip at all): auc_target is NaN and the hmean runs over
    AUC and pAUC only.
    """
    a_s = auc_source(scores, is_anomaly, is_target)
    source_only = not np.asarray(is_target, dtype=bool).any()
    a_t = math.nan if source_only else auc_target(scores, is_anomaly, is_target)
    p = pauc(scores, is_anomaly, max_fpr=max_fpr)
    return MachineScore(a_s, a_t, p, _clipped_hmean([a_s, p] if source_only else [a_s, a_t, p]))


def _roc_area(scores: np.ndarray, is_anomaly: np.ndarray, max_fpr: float | None) -> float:
    """sklearn's `roc_auc_score` (and its McClish-standardised partial AUC) in plain numpy, without its input
    checks: the ROC of every distinct threshold, trapezoids, the last segment interpolated at max_fpr."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_anomaly[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last clip of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    if max_fpr is None:
        return float(np.trapezoid(tpr, fpr))
    stop = np.searchsorted(fpr, max_fpr, "right")
    tpr = np.append(tpr[:stop], np.interp(max_fpr, fpr[stop - 1: stop + 1], tpr[stop - 1: stop + 1]))
    fpr = np.append(fpr[:stop], max_fpr)
    area, min_area = float(np.trapezoid(tpr, fpr)), 0.5 * max_fpr**2
    return 0.5 * (1 + (area - min_area) / (max_fpr - min_area))


def replicate_machine_scores(scores, is_anomaly, is_target, max_fpr: float = MAX_FPR) -> MachineScore:
    """`machine_scores` without the input checks, for the many redraws of a bootstrap (about 20x faster than
    sklearn's validation): the same figures (equal to 1e-12, tests/eval/test_metrics.py). Both domains and both
    labels must be present."""
    scores = np.asarray(scores, dtype=np.float64)
    is_anomaly, is_target = np.asarray(is_anomaly, bool), np.asarray(is_target, bool)
    a_s = _roc_area(scores[~is_target | is_anomaly], is_anomaly[~is_target | is_anomaly], None)
    a_t = _roc_area(scores[is_target | is_anomaly], is_anomaly[is_target | is_anomaly], None)
    p = _roc_area(scores, is_anomaly, max_fpr)
    eps = EVALUATOR_EPS  # _clipped_hmean's figure without scipy's array machinery (most of a redraw's time)
    return MachineScore(a_s, a_t, p, 1.0 / ((1.0 / max(a_s, eps) + 1.0 / max(a_t, eps) + 1.0 / max(p, eps)) / 3.0))


def _clipped_hmean(values) -> float:
    # The evaluator: scipy.stats.hmean(numpy.maximum(values, sys.float_info.epsilon)).
    return hmean(np.maximum(np.asarray(values, dtype=np.float64), EVALUATOR_EPS))


def official_score(scores: Sequence[MachineScore]) -> float:
    """ONE harmonic mean over [AUC_s of all sections, AUC_t of all sections, pAUC of all sections]
    (source-only sections, auc_target NaN, add no AUC_t)."""
    if len(scores) == 0:
        raise ValueError("official_score needs at least one MachineScore")
    values = (
        [s.auc_source for s in scores] + [s.auc_target for s in scores if not math.isnan(s.auc_target)]
        + [s.pauc for s in scores]
    )
    return _clipped_hmean(values)


# ---------------------------------------------------------------------------------------------
# Table 2 aggregation (conditions x SNR)


@dataclass(frozen=True)
class Table2Row:
    """One condition of Table 2, or the overall row (condition == "all", scores_by_snr_db empty)."""

    condition: str
    scores_by_snr_db: dict[int, float]
    hmean_low: float  # hmean over LOW_SNRS_DB; NaN unless all three are present
    hmean_all: float  # hmean over every SNR present


def table2(results: Mapping[tuple[str, int], float]) -> list[Table2Row]:
    """Aggregate official scores keyed by (condition, snr_db) into Table-2 rows.

    Returns one row per condition (first-seen order, SNRs ascending) and a final row "all" whose
    hmeans run over every (condition, SNR) cell, i.e. the model's overall Table-2 figures.
    """
    if not results:
        raise ValueError("table2 needs at least one (condition, snr_db) -> score entry")
    by_condition: dict[str, dict[int, float]] = {}
    for (condition, snr_db), score in results.items():
        by_condition.setdefault(str(condition), {})[int(snr_db)] = float(score)

    def low_and_all(cells: list[tuple[int, float]]) -> tuple[float, float]:
        snrs = {s for s, _ in cells}
        low = [v for s, v in cells if s in LOW_SNRS_DB]
        hmean_low = hmean(low) if set(LOW_SNRS_DB) <= snrs else math.nan
        return hmean_low, hmean([v for _, v in cells])

    rows = []
    for condition, cells in by_condition.items():
        ordered = dict(sorted(cells.items()))
        rows.append(Table2Row(condition, ordered, *low_and_all(list(ordered.items()))))
    every = [(s, v) for cells in by_condition.values() for s, v in cells.items()]
    low_all = [v for s, v in every if s in LOW_SNRS_DB]
    complete_low = all(set(LOW_SNRS_DB) <= set(c) for c in by_condition.values())
    rows.append(Table2Row("all", {}, hmean(low_all) if complete_low else math.nan,
                          hmean([v for _, v in every])))
    return rows


# ---------------------------------------------------------------------------------------------
# Jackknife confidence interval


@dataclass(frozen=True)
class JackknifeInterval:
    value: float  # the statistic on all items (what we report)
    jackknife_estimate: float  # bias-corrected estimate (Mesaros et al. 2019, eq. 5)
    half_width: float  # t_{N-1, 0.975} * sigma_jack
    low: float  # value - half_width
    high: float  # value + half_width


def jackknife_interval(
    items: Sequence[Any],
    statistic: Callable[[list[Any]], float] = lambda xs: float(np.mean(xs)),
    confidence: float = 0.95,
) -> JackknifeInterval:
    """Leave-one-item-out jackknife interval (Mesaros et al., TASLP 2019, Sec. IV, eq. 1-7).

    The evaluator's `jackknife_estimate` leaves out one *clip* of the pooled AUC/pAUC; we leave out
    one *item* of `items`. For the official score pass the
    per-section MachineScores and `statistic=official_score` (leave-one-section-out: clips of a
    section are not independent, so sections are the honest resampling unit).
    """
    items = list(items)
    n = len(items)
    if n < 2:
        raise ValueError(f"jackknife needs at least 2 items, got {n}")
    theta = float(statistic(items))
    loo = np.array([statistic(items[:i] + items[i + 1:]) for i in range(n)], dtype=np.float64)
    pseudo = n * theta - (n - 1) * loo  # eq. 4
    theta_jack = float(np.mean(pseudo))  # eq. 5
    # eq. 6 on the pseudo-values. The evaluator's code puts the leave-one-out values here instead,
    # which shrinks sigma by a factor N - 1; with statistic = mean this equals std(ddof=1) / sqrt(N).
    sigma = math.sqrt(float(np.sum((pseudo - theta_jack) ** 2)) / (n * (n - 1)))
    half = float(abs(scipy.stats.t.ppf((1 - confidence) / 2, n - 1)) * sigma)
    return JackknifeInterval(theta, theta_jack, half, theta - half, theta + half)


def official_score_interval(scores: Sequence[MachineScore], confidence: float = 0.95) -> JackknifeInterval:
    """95% leave-one-section-out jackknife interval of `official_score`."""
    return jackknife_interval(scores, official_score, confidence)


# ---------------------------------------------------------------------------------------------
# Decisions


def gamma_threshold(reference_scores, percentile: float = 0.9) -> float:
    """Decision threshold: the `percentile` quantile of a gamma fit to normal reference scores.

    As the DCASE baseline: `a, loc, scale = scipy.stats.gamma.fit(scores)` then
    `gamma.ppf(percentile, a, loc, scale)`. Fit on normal training/reference scores (e.g. kNN
    leave-one-out scores of the bank), never on test labels.
    """
    ref = np.asarray(reference_scores, dtype=np.float64).reshape(-1)
    if ref.size < 3:
        raise ValueError(f"gamma_threshold needs at least 3 reference scores, got {ref.size}")
    if not np.all(np.isfinite(ref)):
        raise ValueError("reference scores contain NaN or inf")
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    if np.ptp(ref) == 0:
        return float(ref[0])  # degenerate: every reference score equal, the fit is undefined
    shape, loc, scale = scipy.stats.gamma.fit(ref)
    return float(scipy.stats.gamma.ppf(percentile, shape, loc=loc, scale=scale))


def decisions(scores, threshold: float) -> np.ndarray:
    """1 (anomaly) where score > threshold, else 0, as the DCASE baseline decides."""
    return (np.asarray(scores, dtype=np.float64) > threshold).astype(np.int64)
