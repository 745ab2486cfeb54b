"""Ray Tune sweep: trial choices become validated configs; a real 4-trial ASHA sweep of pretrain + evaluate that
stops trials early and selects on validation; the summary of failed, stopped and finished trials."""

from __future__ import annotations

import dataclasses
import re

import mlflow
import numpy as np
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


def test_sweep_validates_by_default_and_checks_the_scheduler_settings():
    from retain_asd.config import ConfigError
    from tune.space import check_trials, grace_steps, sweep_base
    from tune.sweep import sweep_plan

    base = load_config("smoke", overrides=["train.total_steps=45"])
    assert (base.train.validate_every, sweep_base(base).train.validate_every) == (0, 4)  # 45 // 10 steps
    assert sweep_base(load_config("smoke", overrides=["train.validate_every=7"])).train.validate_every == 7
    assert sweep_base(load_config("smoke", overrides=["train.total_steps=3"])).train.validate_every == 1
    asha = load_config("smoke", overrides=["train.total_steps=45", "tune.scheduler=asha", "tune.grace_period=2"])
    assert grace_steps(asha) == 8 and check_trials(asha) == 2
    assert "validated every 4 steps (train.validate_every 0: 10 validation points by default" in sweep_plan(asha)
    assert "asha (grace 2 validation points = 8 steps, reduction factor 3)" in sweep_plan(asha)
    for override, message in [("tune.scheduler=hyperband", "tune.scheduler = 'hyperband': must be one of ['fifo', "),
                              ("tune.grace_period=0", "tune.grace_period = 0: must be >= 1"),
                              ("tune.reduction_factor=1", "tune.reduction_factor = 1.0: must be > 1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("smoke", overrides=[override])
    late = load_config("smoke", overrides=["train.total_steps=6", "tune.scheduler=asha", "tune.grace_period=6",
                                           "train.validate_every=1"])
    with pytest.raises(ConfigError, match=r"tune.grace_period = 6: .* = 6 steps, not before train.total_steps \(6\)"):
        check_trials(late)


@pytest.fixture(scope="module")
def validation_world(tmp_path_factory, small_worlds) -> list[str]:
    """`small_worlds` with an evaluation world large enough for validation to rank trials: 20 test clips per
    domain (2 s), of which the validation share 0.3 gives 6 normal + 6 anomalous per domain (the small world's
    4 give 1 + 1: AUCs of 0 or 1, every trial tied or apart by a coin flip)."""
    from retain_asd.corpus.synth import write_eval_world

    ev = write_eval_world(tmp_path_factory.mktemp("validation_world"), machines=("bearing",),
                          noise_categories=("hvac", "hammering"), train_source_per_attr=2, train_target_per_attr=2,
                          test_per_domain=20, clip_s=2.0, noise_clips_per_category=2, noise_clip_s=60.0)
    return [o for o in small_worlds if not o.startswith("eval.")] + [
        f"eval.machine_root={ev.machine_root}", f"eval.noise_root={ev.noise_root}"]


@pytest.mark.slow
def test_asha_grid_sweep_stops_trials_early_selects_on_validation_and_tests_only_finished_trials(
        ray_local, tmp_path, validation_world):
    """The acceptance run of `tune.scheduler=asha`: a 4-point grid, one trial at a time (one worker each),
    validating every step of 3 (grace 1, reduction 2: rungs at steps 1 and 2; no warm-up and lr 5e-3, so the
    first step already separates the trials) on 6 normal + 6 anomalous validation clips per domain. A trial
    whose figure at a rung is below the median of the earlier trials' stops there (ASHA's rule, checked on the
    figures; here the third trial stops at step 1), and fewer steps run than 4 full trials. Each grid point runs
    once with its runs nested; only finished trials are evaluated on the test sets; best.yaml is the finished
    trial with the best validation figure; stopped trials are tagged (never failed) and `compare` shows them as
    stopped."""
    from retain_asd.eval.compare import compare_experiment
    from retain_asd.train.launch import read_metrics
    from tune.sweep import best_trial, run_sweep, summarize_sweep, trial_outcomes, write_best_config

    db = tmp_path / "mlflow.db"
    cfg = load_config("smoke", overrides=[*validation_world,
        f"data.work_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{db}",
        "train.total_steps=3", "train.warmup_steps=0", "train.checkpoint_every=3", "train.validate_every=1",
        "train.num_workers=1", "train.lr=5e-3",
        "tune.scheduler=asha", "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_concurrent=1",
        "tune.snr_ranges_db=[[0.0, 0.0], [-5.0, 5.0]]", "tune.alphas=[0.5, 2.0]", "tune.betas=[1.0]",
        "eval.source_refs=6", "eval.target_refs=2", "eval.test_normal=6", "eval.test_anomaly=6",
        "eval.snrs_db=[-5.0, 5.0]", "eval.conditions=[factory_a]"])
    said: list[str] = []
    grid = run_sweep(cfg, tmp_path / "sweep", say=said.append)
    assert len(grid) == 4 and not grid.errors
    assert said == []  # validation sets large enough to rank the trials: no warning
    frame = grid.get_dataframe()
    points = sorted((tuple(r), a) for r, a in zip(frame["config/snr_range_db"], frame["config/alpha"]))
    assert points == [((-5.0, 5.0), 0.5), ((-5.0, 5.0), 2.0), ((0.0, 0.0), 0.5), ((0.0, 0.0), 2.0)]  # each once

    outcomes = {o.trial_id: o for o in trial_outcomes(grid)}
    stopped = {t for t, o in outcomes.items() if o.status == "stopped_early"}
    finished = {t for t, o in outcomes.items() if o.status == "finished"}
    assert finished and stopped | finished == set(outcomes)
    history = {t: read_metrics(tmp_path / "sweep" / "trials" / t / "pretrain" / "metrics.jsonl") for t in outcomes}
    steps_run = {t: max(m["step"] for m in rows) for t, rows in history.items()}
    # ASHA's rule at its rungs (steps 1 and 2), trials in the order they ran: a trial stops when its figure is
    # below the median of the earlier trials' at that rung
    order = sorted(outcomes, key=lambda t: t.rsplit("_", 1)[-1])
    rungs = {step: [m["val/hmean_low"] for t in order for m in history[t] if m["step"] == step
                    and "val/hmean_low" in m] for step in (1, 2)}
    below = any(v < np.percentile(vs[:i], 50) for vs in rungs.values() for i, v in enumerate(vs) if i)
    # The figures are the same from run to run (same corpus files, same seeds: the same draws and weights);
    # on these sets trial 3 is below the median of trials 1-2 at step 1 (0.4720 against 0.4741) and stops.
    assert below and stopped, rungs
    assert sum(steps_run.values()) < 4 * 3  # fewer steps than four full trials
    assert all(steps_run[t] == outcomes[t].step == 3 for t in finished)
    assert all(1 <= outcomes[t].step < 3 and steps_run[t] < 3 for t in stopped)  # killed before the last step
    for t in finished:  # the figure selected on: the final student's validation, apart from the test figures
        assert outcomes[t].validation == history[t][-1]["val/hmean_low"] and 0 <= outcomes[t].test["hmean_all"] <= 1
        assert outcomes[t].student_path.endswith("student_beats.pt")

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["retain-asd-sweep"], output_format="list")
    trials = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("kind") == "point"}  # one point each
    assert sorted(trials) == sorted(outcomes) == sorted(frame["trial_id"])
    parents = {r.info.run_id: t for t, r in trials.items()}
    pretrains = [r for r in runs if r.data.tags.get("kind") == "pretrain"]
    assert sorted(parents[r.data.tags["mlflow.parentRunId"]] for r in pretrains) == sorted(outcomes)  # nested
    evaluated = [parents[r.data.tags["mlflow.parentRunId"]] for r in runs if r.data.tags.get("kind") == "evaluate"]
    assert sorted(evaluated) == sorted(finished)  # the test evaluation ran once per finished trial, never else
    assert all("hmean_all" in trials[t].data.metrics and trials[t].info.run_id == outcomes[t].point_run_id
               for t in finished)
    for r in [trials[t] for t in stopped] + [p for p in pretrains if p.data.tags["trial_id"] in stopped]:
        tid = r.data.tags["trial_id"]
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "stopped_early"
        assert r.data.tags["stopped_at_step"] == str(outcomes[tid].step)
    assert all(trials[t].data.metrics["val/hmean_low"] == outcomes[t].validation for t in outcomes)

    best = best_trial(grid)
    assert best.trial_id in finished and best.validation == max(outcomes[t].validation for t in finished)
    chosen = load_config(path=write_best_config(grid, cfg, tmp_path / "best.yaml"))
    assert (chosen.objective.alpha, chosen.name) == (best.choices["alpha"], trials[best.trial_id].data.tags["preset"])

    text, code = summarize_sweep(grid, "hmean_all")
    assert code == 0 and sum(" stopped early at step " in line for line in text.splitlines()) == len(stopped)
    assert sum(" finished " in line for line in text.splitlines()) == len(finished)
    assert f"best by validation: val/hmean_low = {best.validation:.4f}" in text

    result = compare_experiment("retain-asd-sweep", tracking_uri=f"sqlite:///{db}", out_dir=tmp_path / "cmp",
                                metric="hmean_all")
    assert sorted(r.name for r in result.rows) == [
        "smoke-snr-5_5-a0.5-b1", "smoke-snr-5_5-a2-b1", "smoke-snr0_0-a0.5-b1", "smoke-snr0_0-a2-b1"]
    status = {r.name: r.status for r in result.rows}
    names = {t: trials[t].data.tags["preset"] for t in outcomes}
    assert {status[names[t]] for t in finished} == {"ok"} and all(
        status[names[t]] == f"stopped early at step {outcomes[t].step}" for t in stopped)
    assert all(r.failed == 0 for r in result.rows) and ("stopped early at step" in result.markdown) == bool(stopped)


# ---------------------------------------------------------------------------------------------------- summary
def _fit(tmp_path, name: str, fail_on: set[float], alphas=(1.0, 2.0)):
    """A real Tune run of a grid over alpha whose trials with alpha in ``fail_on`` raise; validation and test
    figures rank the trials in opposite orders, and a trial with alpha 4 reports only a validation point (what
    a trial stopped by the scheduler leaves: no test figures)."""
    from ray import tune

    def trainable(config):
        alpha = config["alpha"]
        if alpha in fail_on:
            raise ValueError(f"objective.alpha = {alpha}: the loss diverged at step 3")
        if alpha == 4.0:
            tune.report({"val/hmean_low": 0.9, "step": 1})
            return
        tune.report({"hmean_all": 0.5 + alpha / 10, "hmean_low": 0.5, "val/hmean_low": 0.7 - alpha / 10, "step": 4})

    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.5}),  # every trial at once on 2 CPUs
                       param_space={"alpha": tune.grid_search(list(alphas))},
                       tune_config=tune.TuneConfig(metric="val/hmean_low", mode="max"),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0))
    return tuner.fit()


@pytest.mark.ray
@pytest.mark.reliability("sweep-failures")
def test_summary_lists_every_trial_and_fails_when_one_trial_failed(ray_local, tmp_path):
    from tune.sweep import best_trial, summarize_sweep

    grid = _fit(tmp_path, "one-fails", {2.0}, alphas=(1.0, 2.0, 3.0, 4.0))
    text, code = summarize_sweep(grid, "hmean_all")
    assert code == 1
    lines = text.splitlines()
    assert sum(" finished " in line for line in lines) == 2 and sum(" ERROR " in line for line in lines) == 1
    assert sum(" stopped early at step 1 " in line for line in lines) == 1  # listed, never counted as failed
    # selected on validation among the finished trials: alpha 1 (val 0.6), not alpha 3 (best test figure, 0.8)
    # nor alpha 4 (best validation, but stopped)
    assert "best by validation: val/hmean_low = 0.6000 (test hmean_all = 0.6000) with {'alpha': 1.0}" in text
    assert best_trial(grid).choices == {"alpha": 1.0}
    assert "1 of 4 trials stopped early by the scheduler (not failed)" in text
    assert "1 of 4 trials failed:" in text and "objective.alpha = 2.0: the loss diverged at step 3" in text


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
