"""Intervals that count both sources of uncertainty of a Table-2 figure: the training seed and the sample of
evaluation clips.

Every row and seed of a study is scored on the same evaluation sets, so a bootstrap draw of the test clips
(with replacement, per machine, within each domain x label group so every group keeps its size) can be
applied to all of them at once: the replicates of two rows are paired, and so are their differences.

For a row (or a difference of two rows) scored at S seeds:

    estimate   m = mean over seeds of the figure
    seeds      se_seed^2 = var_s(figure_s) / S                      (t with S - 1 degrees of freedom)
    clips      se_clips^2 = var_b(mean over seeds of replicate_b)   (the bootstrap replicates)
    interval   m +- sqrt((t_{S-1} se_seed)^2 + (z se_clips)^2)      (z = 1.96 at 95 %)

With one seed the seed term is left out (it cannot be estimated) and the interval counts the clips only.
The per-clip scores are kept as scored on the whole set (the references, and the domain normalisation's
statistics, are not redrawn). A difference is *called* only when its interval excludes 0.

Pure numpy (`metrics` for the figures): no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

from retain_asd.eval import metrics

INTERVAL_TEXT = ("95% interval over {seeds} training seed{s} (t) and {resamples} bootstrap draws of the test clips "
                 "(paired across rows, within each machine's domain x label groups), combined in quadrature")


def interval_text(seeds: int, resamples: int) -> str:
    """What an interval of this module counts, for a table header (INTERVAL_TEXT filled in; with one seed the seed
    term cannot be estimated, and the text says so)."""
    text = INTERVAL_TEXT.format(seeds=seeds, s="s" * (seeds != 1), resamples=resamples)
    return text if seeds > 1 else text.replace("1 training seed (t)", "1 training seed (no seed term)")


@dataclass(frozen=True)
class Labels:
    """The test clips of one machine, in scoring order (identical for every row: the sets are shared)."""

    is_anomaly: np.ndarray  # (Q,) bool
    is_target: np.ndarray  # (Q,) bool


def clip_draws(labels: Mapping[str, Labels], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """machine -> (resamples, Q) indices: test clips drawn with replacement within each domain x label group."""
    rng = np.random.default_rng(seed)
    out = {}
    for machine in sorted(labels):
        lab = labels[machine]
        key = np.asarray(lab.is_anomaly, int) * 2 + np.asarray(lab.is_target, int)
        draws = np.empty((resamples, key.size), dtype=np.int64)
        for g in np.unique(key):
            members = np.flatnonzero(key == g)
            draws[:, members] = members[rng.integers(0, members.size, (resamples, members.size))]
        out[machine] = draws
    return out


def figure_replicates(scores: Mapping[tuple[str, float, str], np.ndarray], labels: Mapping[str, Labels],
                      draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bootstrap replicates of one run's Table-2 figures from its per-clip scores.

    `scores`: (condition, snr_db, machine) -> (Q,) anomaly scores of that machine's test clips (in `labels`'
    order). Returns {"hmean_low": (B,), "hmean_all": (B,)}: per draw, each set's official score over machines,
    then the harmonic means of Table 2's overall row (`metrics.table2`).
    """
    cells = sorted({(c, float(s)) for c, s, _ in scores})
    machines = sorted({m for _, _, m in scores})
    num = len(next(iter(draws.values())))
    out = {"hmean_low": np.empty(num), "hmean_all": np.empty(num)}
    for b in range(num):
        official = {}
        for c, s in cells:
            figures = []
            for m in machines:
                idx = draws[m][b]
                figures.append(metrics.replicate_machine_scores(np.asarray(scores[(c, s, m)])[idx],
                                                                labels[m].is_anomaly[idx], labels[m].is_target[idx]))
            official[(c, s)] = metrics.official_score(figures)
        overall = metrics.table2(official)[-1]  # hmean_low is NaN unless every condition has -10, -5 and 0 dB
        out["hmean_all"][b] = overall.hmean_all
        out["hmean_low"][b] = overall.hmean_low
    return out


def whole_set(labels: Mapping[str, Labels]) -> dict[str, np.ndarray]:
    """machine -> (1, Q): the one "draw" that is the test set itself (`figure_replicates` of it = the figures)."""
    return {m: np.arange(np.asarray(lab.is_anomaly).size)[None] for m, lab in labels.items()}


def auc_steps(labels: Mapping[str, Labels]) -> dict[tuple[str, str], int]:
    """(machine, "source" | "target") -> normal x anomalous clip pairs of its AUC (the evaluator's masks: the
    domain's normals against every anomaly): one pair moves that AUC by 1 / pairs, its resolution."""
    out = {}
    for m, lab in sorted(labels.items()):
        is_anomaly, is_target = np.asarray(lab.is_anomaly, bool), np.asarray(lab.is_target, bool)
        for domain, in_domain in (("source", ~is_target), ("target", is_target)):
            out[(m, domain)] = int(np.sum(in_domain & ~is_anomaly)) * int(np.sum(is_anomaly))
    return out


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # of the 95% interval
    seed_half: float  # the training seeds' part alone (NaN with one seed)
    clip_half: float  # the test clips' part alone

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    @property
    def call(self) -> str:
        """A difference's reading (higher scores are better): "better" / "worse" only when its interval excludes
        0, else "no difference"."""
        if not self.excludes_zero:
            return "no difference"
        return "better" if self.mean > 0 else "worse"


def combined_interval(points: Sequence[float], replicates: np.ndarray, confidence: float = 0.95) -> Interval:
    """`points`: the figure at each seed (S,); `replicates`: (S, B) its bootstrap replicates over test clips
    (the same draws for every seed). See the module docstring for the formula."""
    points = np.asarray(points, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64).reshape(len(points), -1)
    s = len(points)
    mean = float(points.mean())
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    clip_half = z * float(np.std(replicates.mean(0), ddof=1)) if replicates.shape[1] > 1 else math.nan
    seed_half = math.nan
    if s > 1:
        t = float(scipy.stats.t.ppf(0.5 + confidence / 2, s - 1))
        seed_half = t * float(np.std(points, ddof=1)) / math.sqrt(s)
    parts = [h for h in (seed_half, clip_half) if not math.isnan(h)]
    half = math.sqrt(sum(h * h for h in parts)) if parts else math.nan
    return Interval(mean, half, seed_half, clip_half)


def difference_interval(points: Sequence[float], replicates: np.ndarray, base_points: Sequence[float],
                        base_replicates: np.ndarray, confidence: float = 0.95) -> Interval:
    """The interval of (row - base), paired by seed and by bootstrap draw."""
    return combined_interval(np.asarray(points) - np.asarray(base_points),
                             np.asarray(replicates) - np.asarray(base_replicates), confidence)


__all__ = ["INTERVAL_TEXT", "Interval", "Labels", "auc_steps", "clip_draws", "combined_interval",
           "difference_interval", "figure_replicates", "interval_text", "whole_set"]
