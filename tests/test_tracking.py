"""MLflow through `retain_asd.tracking` on a real SQLite store: artifacts land beside the database (never in
the working folder), tags, metrics and nested runs."""

from __future__ import annotations

from pathlib import Path

from retain_asd import tracking


def test_artifacts_beside_the_store_tags_and_nested_runs(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's default artifact root would be ./mlruns here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "table.md").write_text("| a |\n")
    with tracking.mlflow_run(uri, "exp", "outer", params={"train": {"lr": 1e-4}}, tags={"kind": "test"}) as outer:
        tracking.set_tags({"student_beats": Path("x.pt")})
        tracking.log_metrics({"loss a=b": 1.5}, step=2)
        tracking.log_artifacts(tmp_path / "files", artifact_path="evaluate")
        with tracking.mlflow_run(uri, "exp", "inner", nested=True) as inner:
            tracking.log_metrics({"hmean_all": 0.5})
    assert list(cwd.iterdir()) == []  # no mlruns/ in the working folder
    stored = tmp_path / "store" / "mlartifacts" / "exp"
    assert [p.name for p in stored.rglob("table.md")] == ["table.md"]
    assert tracking.artifact_location(uri, "exp") == stored.as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", "exp") is None

    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(outer.info.run_id)
    assert run.data.tags["student_beats"] == "x.pt" and run.data.tags["kind"] == "test"
    assert run.data.params["train.lr"] == "0.0001" and run.data.metrics["loss_a_b"] == 1.5
    child = client.get_run(inner.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == outer.info.run_id
