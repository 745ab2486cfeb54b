"""Students in the MLflow Model Registry (real SQLite store, real tiny BEATs checkpoints): versions, tags, aliases,
the local copy a `models:/` URI resolves to, and the errors of `retain-asd evaluate --checkpoint models:/...`.
A sweep's own registration is checked on a real sweep in tests/experiments/test_point.py."""

from __future__ import annotations

import shutil

import mlflow
import pytest

from retain_asd import tracking
from retain_asd.models.beats import beats_tiny, write_random_checkpoint


def pretrain_run(uri: str, experiment: str, out, seed: int, log_student: bool) -> tuple[str, object]:
    """A pre-training run's id and its student (a random tiny BEATs; logged as the run's artifact if asked)."""
    student = write_random_checkpoint(out / "student_beats.pt", beats_tiny(), seed=seed)
    with tracking.mlflow_run(uri, experiment, f"pretrain-x-seed{seed}", tags={"kind": "pretrain"}) as run:
        if log_student:
            tracking.log_artifact(student)
        tracking.log_metrics({"val/hmean_low": 0.25 + seed / 10})
    return run.info.run_id, student


def test_a_student_registered_twice_is_versions_1_and_2_with_tags_and_an_alias(tmp_path):
    uri = tracking.resolve_tracking_uri("", tmp_path / "store")
    runs = []
    for seed, logged in ((1, True), (2, False)):  # the second run lacks the artifact: uploaded on registration
        (tmp_path / f"out{seed}").mkdir()
        runs.append(pretrain_run(uri, "x-sweep", tmp_path / f"out{seed}", seed, logged))
    client = mlflow.MlflowClient(uri)
    first = tracking.register_student(uri, "x", runs[0][0], runs[0][1], alias="best",
                                      tags={"preset": "x-snr0_0-a1-b1", "val/hmean_low": 0.35, "trial_id": "t1"})
    assert [a.path for a in client.list_artifacts(runs[0][0])] == ["student_beats.pt"]  # not uploaded twice
    assert client.list_artifacts(runs[1][0]) == []
    second = tracking.register_student(uri, "x", runs[1][0], runs[1][1], alias="best",
                                       tags={"preset": "x-snr5_5-a1-b1", "val/hmean_low": 0.45, "trial_id": "t2"})
    assert [a.path for a in client.list_artifacts(runs[1][0])] == ["student_beats.pt"]
    assert (first.uri, second.uri) == ("models:/retain-asd-x/1", "models:/retain-asd-x/2")
    version = client.get_model_version("retain-asd-x", "2")
    assert version.run_id == runs[1][0] and version.source == second.source
    assert {k: version.tags[k] for k in ("preset", "val/hmean_low", "trial_id")} == {
        "preset": "x-snr5_5-a1-b1", "val/hmean_low": "0.45", "trial_id": "t2"}
    assert version.tags[tracking.CHECKPOINT_SHA] == tracking.file_sha256(runs[1][1])
    assert client.get_registered_model("retain-asd-x").aliases == {"best": 2}  # the alias moved to the newest

    cache = tmp_path / "cache"
    by_version = tracking.resolve_model_uri("models:/retain-asd-x/1", uri, cache)
    by_alias = tracking.resolve_model_uri("models:/retain-asd-x@best", uri, cache)
    assert by_version == cache / "retain-asd-x" / "1" / "student_beats.pt"
    assert by_version.read_bytes() == runs[0][1].read_bytes()
    assert by_alias == cache / "retain-asd-x" / "2" / "student_beats.pt"
    assert by_alias.read_bytes() == runs[1][1].read_bytes()
    assert tracking.read_run_pointer(by_alias.parent)["run_id"] == runs[1][0]  # evaluate's pretrain_run_id tag

    # The source changed under the version (the run's student re-logged): refused, not scored as version 1.
    source = (tmp_path / "store" / "mlartifacts" / "x-sweep" / runs[0][0] / "artifacts" / "student_beats.pt")
    shutil.copy(runs[1][1], source)
    shutil.rmtree(cache)
    with pytest.raises(ValueError, match="has changed since it was registered"):
        tracking.resolve_model_uri("models:/retain-asd-x/1", uri, cache)


def test_registry_errors_exit_2_with_the_message(tmp_path, capsys):
    from pipelines.common import run_main
    from pipelines.evaluate import main

    work = tmp_path / "work"
    uri = tracking.resolve_tracking_uri("", work)
    out = tmp_path / "out"

    def evaluate(checkpoint: str, *overrides: str) -> str:
        code = run_main(main, ["--preset", "smoke", "--checkpoint", checkpoint, "--out", str(out),
                               f"data.work_dir={work}", *overrides])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        return " ".join(err.split())

    err = evaluate("models:/retain-asd-x/1")  # no store yet: the settings that choose it
    assert f"no MLflow store at {work / 'mlflow.db'}" in err and "tracking.tracking_uri=" in err
    assert "data.work_dir=" in err and not (work / "mlflow.db").exists()  # none created either
    (tmp_path / "run").mkdir()
    run_id, student = pretrain_run(uri, "x", tmp_path / "run", seed=0, log_student=True)
    tracking.register_student(uri, "x", run_id, student, alias="best")
    err = evaluate("models:/retain-asd-y/1")
    assert "no registered model 'retain-asd-y'" in err and "it has: retain-asd-x" in err
    err = evaluate("models:/retain-asd-x/3")
    assert "has no version 3; its versions: 1; its aliases: @best" in err
    assert "has no alias @champion; its versions: 1" in evaluate("models:/retain-asd-x@champion")
    assert "give models:/NAME/VERSION or models:/NAME@ALIAS" in evaluate("models:/retain-asd-x/latest")
    source = mlflow.MlflowClient(uri).get_model_version("retain-asd-x", "1").source
    (tmp_path / "store_moved").mkdir()
    shutil.move(str(work / "mlartifacts"), str(tmp_path / "store_moved"))  # the artifacts are gone
    err = evaluate("models:/retain-asd-x/1")
    assert f"models:/retain-asd-x/1: its checkpoint {source} is not in the artifact store" in err
    assert "register the student again" in err and not (out / "retain-asd-x-v1-seed0").exists()
    other = tmp_path / "other" / "mlflow.db"  # tracking.tracking_uri wins over data.work_dir
    assert f"no MLflow store at {other}" in evaluate("models:/retain-asd-x/1", f"tracking.tracking_uri={other}")
