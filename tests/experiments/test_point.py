"""One experiment point, three callers: the demo (`retain-asd demo`), the study (`run_study`) and a sweep trial
(`run_sweep`) leave the same MLflow run layout for the same point: run names, kinds, tags and parent links.
Real Ray, Tune, MLflow (one SQLite store) and Parquet on the small synthetic worlds; the point is a `frozen`
row (nothing to pre-train), so the three share one ingestion and no Ray Train run."""

from __future__ import annotations

import pytest

from retain_asd import tracking
from retain_asd.config import load_config

POINT = "smoke-snr0_0-a0-b0"  # the sweep's trial name for its one grid point; the study's row label
SMALL = ["data.clip_s=1.0", "eval.snrs_db=[0.0]", "eval.conditions=[factory_a]", "eval.ssl_layer=2",
         "eval.source_refs=2", "eval.target_refs=2", "eval.test_normal=2", "eval.test_anomaly=2"]
CALLER_TAGS = {"study", "row_preset", "trial_id"}  # what each caller adds to every run of its points


def layout(uri: str, experiment: str) -> tuple[list[tuple], set[str]]:
    """(sorted (run name, kind, parent's name, point tags), the caller tag keys every run carries); run-specific
    values (paths, hashes, ids) are compared by key only."""
    runs = [r for r in tracking.experiment_runs(uri, experiment) if r["tags"].get("kind") != "study_summary"]
    names = {r["run_id"]: r["run_name"] for r in runs}
    rows, caller = [], None
    for r in runs:
        tags = {k: v for k, v in r["tags"].items() if not k.startswith("mlflow.") and k not in CALLER_TAGS}
        shown = tuple(sorted((k, v if k in ("kind", "preset", "seed", "objective", "frozen") else "*")
                             for k, v in tags.items()))
        rows.append((r["run_name"], r["tags"]["kind"], names.get(r["tags"].get("mlflow.parentRunId")), shown))
        keys = set(r["tags"]) & CALLER_TAGS
        caller = keys if caller is None else caller & keys
        if r["tags"].get("kind") == "evaluate":  # the evaluation names the pre-training it scored
            (pre,) = [x for x in runs if x["tags"]["kind"] == "pretrain"]
            assert r["tags"]["pretrain_run_id"] == pre["run_id"]
    return sorted(rows), caller


@pytest.mark.slow
def test_demo_study_and_sweep_log_one_point_alike(small_worlds, ray_local, tmp_path):
    from pipelines.cli import main
    from retain_asd.experiments.study import run_study
    from tune.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = [*small_worlds, *SMALL, f"data.work_dir={tmp_path / 'work'}", f"tracking.tracking_uri={uri}"]
    rows = [f"study.rows=[{POINT}:frozen]", "study.seeds=[0]"]
    assert main(["demo", "--preset", "smoke", "--out", str(tmp_path / "demo"), *shared, *rows,
                 "tracking.experiment=layout-demo"]) == 0
    study = run_study(load_config("smoke", overrides=[*shared, *rows, "tracking.experiment=layout-study"]),
                      tmp_path / "study", say=lambda line: None)
    sweep_cfg = load_config("smoke", overrides=[
        *shared, "tracking.experiment=layout", "objective.name=frozen", "objective.alpha=0.0", "objective.beta=0.0",
        "tune.snr_ranges_db=[[0.0, 0.0]]", "tune.alphas=[0.0]", "tune.betas=[0.0]"])
    grid = run_sweep(sweep_cfg, tmp_path / "sweep")
    assert len(grid) == 1 and not grid.errors
    registered_trial_student(sweep_cfg, grid, tmp_path / "sweep", uri)

    demo, in_demo = layout(uri, "layout-demo")
    assert [(name, kind, parent) for name, kind, parent, _ in demo] == [
        (f"evaluate-{POINT}-seed0", "evaluate", f"point-{POINT}-seed0"), (f"point-{POINT}-seed0", "point", None),
        (f"pretrain-{POINT}-seed0", "pretrain", f"point-{POINT}-seed0")]
    assert dict(demo[1][3])["preset"] == POINT and dict(demo[0][3])["frozen"] == "true"
    assert in_demo == {"study", "row_preset"}
    assert layout(uri, "layout-study") == (demo, {"study", "row_preset"})
    assert layout(uri, "layout-sweep") == (demo, {"trial_id"})
    # the figures of the point: the same encoder (seeded random init) on the same sets
    (cell,) = study.cells
    assert grid[0].metrics["hmean_all_dn"] == pytest.approx(cell.hmean_all)


def registered_trial_student(cfg, grid, sweep_dir, uri: str) -> None:
    """The sweep's end (pipelines/sweep.py): its best trial's student becomes version 1 of retain-asd-<experiment>,
    alias best, the very file its pre-training run logged (not uploaded again), with the trial's tags."""
    import mlflow

    from retain_asd.experiments.registry import register_best_student
    from tune.sweep import best_trial

    trial = best_trial(grid)  # on validation
    registered = register_best_student(cfg, trial, sweep_dir)
    trial_id = trial.trial_id
    pretrain = sweep_dir.resolve() / "trials" / trial_id / "pretrain"
    run_id = tracking.read_run_pointer(pretrain)["run_id"]
    assert (registered.uri, registered.run_id) == ("models:/retain-asd-layout/1", run_id)
    client = mlflow.MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".pt")] == ["student_beats.pt"]
    version = client.get_model_version("retain-asd-layout", "1")
    assert client.get_registered_model("retain-asd-layout").aliases == {"best": 1}
    assert {k: version.tags[k] for k in ("preset", "trial_id", "choices", "hmean_all")} == {
        "preset": POINT, "trial_id": trial_id, "choices": '{"snr_range_db": [0.0, 0.0], "alpha": 0.0, "beta": 0.0}',
        "hmean_all": str(trial.test["hmean_all"])}
    assert version.tags["val/hmean_low"] == str(trial.validation)  # the figure it was selected on
    copy = tracking.resolve_model_uri("models:/retain-asd-layout@best", uri, sweep_dir / "models")
    assert copy.read_bytes() == (pretrain / "student_beats.pt").read_bytes()
