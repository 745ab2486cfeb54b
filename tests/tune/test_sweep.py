"""Ray Tune sweep: trial choices become validated configs; a real 2-trial sweep of pretrain + evaluate."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest

from retain_asd.config import load_config
from tune.space import search_space, trial_config, trial_name


def test_trial_config_applies_choices():
    base = load_config("tagging_mixture_pm5")
    fixed = trial_config(base, {"snr_range_db": [0.0, 0.0], "alpha": 2.0, "beta": 0.5}, name="t1")
    assert (fixed.mixing.snr_sampler, fixed.mixing.snr_db) == ("fixed", 0.0)
    assert (fixed.objective.alpha, fixed.objective.beta, fixed.name) == (2.0, 0.5, "t1")
    ranged = trial_config(base, {"snr_range_db": [-10.0, 10.0], "alpha": 1.0, "beta": 1.0}, name="t2")
    assert (ranged.mixing.snr_sampler, ranged.mixing.snr_low_db, ranged.mixing.snr_high_db) == (
        "uniform", -10.0, 10.0)
    space = search_space(base.tune)  # the default: a grid, every point once
    assert sorted(space) == ["alpha", "beta", "snr_range_db"]
    assert space["snr_range_db"] == {"grid_search": [list(r) for r in base.tune.snr_ranges_db]}
    drawn = search_space(dataclasses.replace(base.tune, search="random"))  # still available as a setting
    assert [list(r) for r in base.tune.snr_ranges_db] == drawn["snr_range_db"].categories
    assert trial_name("tm", {"snr_range_db": [-5.0, 5.0], "alpha": 2.0, "beta": 0.5}) == "tm-snr-5_5-a2-b0.5"


@pytest.mark.slow
def test_grid_sweep_runs_each_point_once_nested_runs_and_compare_shows_every_trial(ray_local, tmp_path, small_worlds):
    from retain_asd.eval.compare import compare_experiment
    from tune.sweep import run_sweep, write_best_config

    db = tmp_path / "mlflow.db"
    cfg = load_config("smoke", overrides=[*small_worlds,
        f"data.work_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{db}",
        "train.total_steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "tune.max_concurrent=1",
        "tune.snr_ranges_db=[[0.0, 0.0], [-5.0, 5.0]]", "tune.alphas=[0.5, 2.0]", "tune.betas=[1.0]",
        "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2",
        "eval.snrs_db=[-5.0, 5.0]", "eval.conditions=[factory_a]"])
    grid = run_sweep(cfg, tmp_path / "sweep")
    assert len(grid) == 4 and not grid.errors
    frame = grid.get_dataframe()
    points = sorted((tuple(r), a) for r, a in zip(frame["config/snr_range_db"], frame["config/alpha"]))
    assert points == [((-5.0, 5.0), 0.5), ((-5.0, 5.0), 2.0), ((0.0, 0.0), 0.5), ((0.0, 0.0), 2.0)]  # each once
    assert frame["hmean_all"].between(0.0, 1.0).all() and (frame["step"] == 2).all()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["retain-asd-sweep"], output_format="list")
    trials = {r.info.run_id: r for r in runs if r.data.tags.get("kind") == "point"}  # one experiment point each
    assert len(trials) == 4 and all("hmean_all" in r.data.metrics for r in trials.values())
    assert sorted(r.data.tags["trial_id"] for r in trials.values()) == sorted(frame["trial_id"])
    for kind in ("pretrain", "evaluate"):  # nested under their trial's run, in the same experiment
        children = [r for r in runs if r.data.tags.get("kind") == kind]
        assert sorted(r.data.tags["mlflow.parentRunId"] for r in children) == sorted(trials)
    result = compare_experiment("retain-asd-sweep", tracking_uri=f"sqlite:///{db}", out_dir=tmp_path / "cmp",
                                metric="hmean_all")
    assert sorted(r.name for r in result.rows) == [
        "smoke-snr-5_5-a0.5-b1", "smoke-snr-5_5-a2-b1", "smoke-snr0_0-a0.5-b1", "smoke-snr0_0-a2-b1"]
    assert all(r.status == "ok" and r.seeds == ("0",) for r in result.rows)
    best = write_best_config(grid, cfg, tmp_path / "best.yaml")
    chosen = load_config(path=best)
    top = grid.get_best_result()
    assert chosen.objective.alpha == top.config["alpha"] and chosen.name in [r.name for r in result.rows]


# ---------------------------------------------------------------------------------------------------- summary
def _fit(tmp_path, name: str, fail_on: set[float]):
    """A real Tune run of a 2-point grid whose trial with alpha in ``fail_on`` raises."""
    from ray import tune

    def trainable(config):
        if config["alpha"] in fail_on:
            raise ValueError(f"objective.alpha = {config['alpha']}: the loss diverged at step 3")
        tune.report({"hmean_all": 0.5 + config["alpha"] / 10, "hmean_low": 0.5})

    tuner = tune.Tuner(trainable, param_space={"alpha": tune.grid_search([1.0, 2.0])},
                       tune_config=tune.TuneConfig(metric="hmean_all", mode="max"),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0))
    return tuner.fit()


@pytest.mark.ray
@pytest.mark.reliability("sweep-failures")
def test_summary_lists_every_trial_and_fails_when_one_trial_failed(ray_local, tmp_path):
    from tune.sweep import summarize_sweep

    text, code = summarize_sweep(_fit(tmp_path, "one-fails", {2.0}), "hmean_all")
    assert code == 1
    lines = text.splitlines()
    assert sum(" OK " in line for line in lines) == 1 and sum(" ERROR " in line for line in lines) == 1
    assert "best hmean_all = 0.6000 with {'alpha': 1.0}" in text
    assert "1 of 2 trials failed:" in text and "objective.alpha = 2.0: the loss diverged at step 3" in text


@pytest.mark.ray
@pytest.mark.reliability("sweep-failures")
def test_summary_when_every_trial_failed(ray_local, tmp_path):
    from tune.sweep import summarize_sweep

    text, code = summarize_sweep(_fit(tmp_path, "all-fail", {1.0, 2.0}), "hmean_all")
    assert code == 1
    assert sum(" ERROR " in line for line in text.splitlines()) == 2 and "best" not in text
    assert "all 2 trials failed; nothing to rank. First error" in text and "the loss diverged" in text


def test_sweep_state_goes_where_the_trials_checkpoints_go(tmp_path, monkeypatch):
    """Tune's experiment state: <out>/ray locally; with data.storage, the bucket beside the trials' checkpoints
    (so a sweep restarted on another machine resumes from the bucket)."""
    import pyarrow.fs as pafs

    from tune.sweep import sweep_storage

    local = sweep_storage(load_config("smoke"), tmp_path / "sweep")
    assert local == {"storage_path": str((tmp_path / "sweep" / "ray").resolve())}
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                       "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    bucket = sweep_storage(load_config("smoke", overrides=["data.storage=s3://my-bucket/p"]), tmp_path / "sw1")
    assert bucket["storage_path"] == "my-bucket/p/runs/sw1"
    assert isinstance(bucket["storage_filesystem"], pafs.S3FileSystem)
