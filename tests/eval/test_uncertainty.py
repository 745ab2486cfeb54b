"""Intervals over training seeds and test clips: a planted difference smaller than the test-clip noise is not
called, a large one is; the seed-only interval would have called the small one."""

from __future__ import annotations

import numpy as np
import pytest

from retain_asd.eval.uncertainty import (
    Labels,
    clip_draws,
    combined_interval,
    difference_interval,
    figure_replicates,
    interval_text,
)

PER_GROUP = 40  # test clips per domain x label group: 160 clips, one machine
SEEDS = 3


def _labels() -> Labels:
    is_anomaly = np.repeat([False, True, False, True], PER_GROUP)
    is_target = np.repeat([False, False, True, True], PER_GROUP)
    return Labels(is_anomaly, is_target)


def _runs(separation: float, clip_errors: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """One row at each seed: its clip-specific errors (the same at every seed, as an encoder's are) plus a
    little seed jitter; the anomalies sit `separation` above the normals."""
    lab = _labels()
    jitter = 0.05 * rng.standard_normal((SEEDS, lab.is_anomaly.size))
    return [{("mismatch", -5.0, "m"): separation * lab.is_anomaly + clip_errors + jitter[s]} for s in range(SEEDS)]


def _figures(runs, draws):
    lab = {"m": _labels()}
    points = []
    reps = []
    for scores in runs:
        identity = {"m": np.arange(4 * PER_GROUP)[None]}
        points.append(figure_replicates(scores, lab, identity)["hmean_all"][0])
        reps.append(figure_replicates(scores, lab, draws)["hmean_all"])
    return np.asarray(points), np.stack(reps)


def test_a_planted_difference_smaller_than_the_clip_noise_is_not_called():
    rng = np.random.default_rng(4)
    draws = clip_draws({"m": _labels()}, resamples=100, seed=0)
    errors_base, errors_row = rng.standard_normal((2, 4 * PER_GROUP))  # two encoders err on different clips
    base = _figures(_runs(1.0, errors_base, rng), draws)
    small = _figures(_runs(1.05, errors_row, rng), draws)  # planted: +0.05 separation, about +1 AUC point
    large = _figures(_runs(2.5, errors_row, rng), draws)  # planted: about +20 AUC points

    d_small = difference_interval(*small, *base)
    assert not d_small.excludes_zero  # not called: the clips' noise covers it
    assert d_small.clip_half > 3 * d_small.seed_half  # the test clips are the larger source here
    seeds_only = combined_interval(small[0] - base[0], np.zeros((SEEDS, 1)))  # what a seeds-only interval says
    assert seeds_only.excludes_zero  # ... and it would have called it
    d_large = difference_interval(*large, *base)
    assert d_large.excludes_zero and d_large.mean > 0.1


def test_one_seed_counts_the_clips_only():
    draws = clip_draws({"m": _labels()}, resamples=50, seed=1)
    assert draws["m"].shape == (50, 4 * PER_GROUP)
    for g in range(4):  # every draw keeps each group's clips inside the group
        members = np.arange(g * PER_GROUP, (g + 1) * PER_GROUP)
        assert np.isin(draws["m"][:, members], members).all()
    one = combined_interval([0.7], np.full((1, 50), 0.7) + np.linspace(-0.01, 0.01, 50))
    assert np.isnan(one.seed_half) and one.half_width == one.clip_half > 0
    assert interval_text(1, 50).startswith("95% interval over 1 training seed (no seed term) and 50 bootstrap draws")


def test_the_whole_set_gives_the_evaluations_figures_and_the_calls_read_the_interval():
    from retain_asd.eval import metrics
    from retain_asd.eval.uncertainty import Interval, auc_steps, whole_set

    rng = np.random.default_rng(2)
    lab = _labels()
    cells = [(c, s) for c in ("factory_a", "mismatch") for s in (-10.0, -5.0, 0.0, 5.0)]
    scores = {(c, s, "m"): rng.standard_normal(4 * PER_GROUP) + lab.is_anomaly for c, s in cells}
    official = {(c, int(s)): metrics.official_score([metrics.machine_scores(scores[(c, s, "m")], lab.is_anomaly,
                                                                            lab.is_target)]) for c, s in cells}
    (overall,) = metrics.table2(official)[-1:]  # the figures the evaluation logs (sklearn's AUCs)
    got = figure_replicates(scores, {"m": lab}, whole_set({"m": lab}))
    assert got["hmean_all"][0] == pytest.approx(overall.hmean_all, abs=1e-12)
    assert got["hmean_low"][0] == pytest.approx(overall.hmean_low, abs=1e-12)
    partial = {k: v for k, v in scores.items() if not (k[0] == "mismatch" and k[1] == -10.0)}
    assert np.isnan(figure_replicates(partial, {"m": lab}, whole_set({"m": lab}))["hmean_low"][0])  # as table2
    # one AUC step: the domain's 40 normals x all 80 anomalies
    assert auc_steps({"m": lab}) == {("m", "source"): 3200, ("m", "target"): 3200}
    calls = [Interval(m, h, 0.0, h).call for m, h in ((0.02, 0.01), (-0.02, 0.01), (0.02, 0.03), (0.0, 0.0))]
    assert calls == ["better", "worse", "no difference", "no difference"]
