"""Ray Tune sweep: trial choices become validated configs; a real 2-trial sweep of pretrain + evaluate."""

from __future__ import annotations

import mlflow
import pytest

from retain_asd.config import load_config
from tune.space import search_space, trial_config


def test_trial_config_applies_choices():
    base = load_config("tagging_mixture_pm5")
    fixed = trial_config(base, {"snr_range_db": [0.0, 0.0], "alpha": 2.0, "beta": 0.5}, name="t1")
    assert (fixed.mixing.snr_sampler, fixed.mixing.snr_db) == ("fixed", 0.0)
    assert (fixed.objective.alpha, fixed.objective.beta, fixed.name) == (2.0, 0.5, "t1")
    ranged = trial_config(base, {"snr_range_db": [-10.0, 10.0], "alpha": 1.0, "beta": 1.0}, name="t2")
    assert (ranged.mixing.snr_sampler, ranged.mixing.snr_low_db, ranged.mixing.snr_high_db) == (
        "uniform", -10.0, 10.0)
    space = search_space(base.tune)
    assert sorted(space) == ["alpha", "beta", "snr_range_db"]
    assert [list(r) for r in base.tune.snr_ranges_db] == space["snr_range_db"].categories


@pytest.mark.slow
def test_two_trial_sweep_reports_hmeans_to_tune_and_mlflow(ray_local, tmp_path):
    from tune.sweep import run_sweep

    db = tmp_path / "mlflow.db"
    cfg = load_config("smoke", overrides=[
        f"data.work_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{db}",
        "train.total_steps=2", "train.warmup_steps=1", "train.checkpoint_every=2",
        "tune.num_samples=2", "tune.snr_ranges_db=[[0.0, 0.0]]", "tune.alphas=[0.5, 2.0]", "tune.betas=[1.0]",
        "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2"])
    grid = run_sweep(cfg, tmp_path / "sweep")
    assert len(grid) == 2 and not grid.errors
    frame = grid.get_dataframe()
    assert frame["hmean_all"].between(0.0, 1.0).all() and frame["hmean_low"].between(0.0, 1.0).all()
    assert (frame["step"] == 2).all()
    best = grid.get_best_result()
    assert best.metrics["hmean_all"] == frame["hmean_all"].max()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    trials = mlflow.search_runs(experiment_names=["retain-asd-sweep"], output_format="list")
    assert len(trials) == 2 and all("hmean_all" in r.data.metrics for r in trials)
    assert sorted(float(r.data.params["alpha"]) for r in trials) == sorted(frame["config/alpha"].tolist())
    # every trial also left its own pretrain and evaluate runs for side-by-side comparison
    runs = mlflow.search_runs(experiment_names=["retain-asd"], output_format="list")
    assert len([r for r in runs if r.info.run_name.startswith("evaluate-")]) == 2
