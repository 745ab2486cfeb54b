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


def test_metrics_buffer_never_waits_for_the_store_and_delivers_everything_in_order_when_it_is_back():
    """`add` returns while the store hangs (the first send blocks) and while it fails (the next three raise);
    every value arrives once, in order, after the outage; the outage and the return are reported with the
    retries it took."""
    import threading

    hanging, calls, delivered, events = threading.Event(), [], [], []

    def send(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            hanging.wait(30)  # a server that does not answer
        if len(calls) <= 4:
            raise ConnectionError("connection refused")
        delivered.extend((m.key, m.step, m.value) for m in batch)

    buffer = tracking.MetricsBuffer(send, backoff_s=0.01, max_backoff_s=0.05,
                                    on_event=lambda name, **fields: events.append((name, fields)))
    adder = threading.Thread(target=lambda: [buffer.add({"loss": float(s), "lr a=b": s / 10}, step=s)
                                             for s in range(1, 21)])
    adder.start()
    adder.join(10)
    assert not adder.is_alive() and buffer.pending == 40  # all 20 steps added while the first send hangs
    hanging.set()
    assert buffer.close(timeout_s=30) == 0
    assert delivered == [(k, s, v) for s in range(1, 21) for k, v in (("loss", float(s)), ("lr_a_b", s / 10))]
    assert (buffer.sent, buffer.retries, buffer.dropped) == (40, 4, 0)
    assert [name for name, _ in events] == ["unreachable", "still_unreachable", "still_unreachable", "back"]
    assert [fields["retries"] for _, fields in events[1:]] == [2, 4, 4]
    assert events[0][1]["error"] == "ConnectionError: connection refused"


def test_metrics_buffer_gives_up_at_close_after_its_time_and_counts_what_is_left():
    buffer = tracking.MetricsBuffer(lambda batch: (_ for _ in ()).throw(OSError("down")), backoff_s=0.01,
                                    max_pending=5)
    for step in range(4):
        buffer.add({"a": 1.0, "b": 2.0}, step=step)
    assert buffer.dropped == 3  # beyond max_pending the oldest go (metrics.jsonl keeps them: backfill)
    assert buffer.close(timeout_s=0.3) == 5 and buffer.retries >= 1


def test_a_closed_metrics_buffer_sends_nothing_more_when_the_store_comes_back():
    """After `close` the back-fill takes over: a store back a moment later must get nothing from the buffer (its
    batch and the back-fill's would log each step twice), and `quick_failures` holds its settings until the last
    thread inside leaves."""
    import os
    import threading
    import time

    up, delivered = threading.Event(), []

    def send(batch):
        if not up.is_set():
            raise ConnectionError("connection refused")
        delivered.extend(batch)

    buffer = tracking.MetricsBuffer(send, backoff_s=0.05, max_backoff_s=0.05, name="mlflow-metrics-test")
    buffer.add({"loss": 1.0}, step=1)
    assert buffer.close(timeout_s=0.2) == 1
    assert "mlflow-metrics-test" not in {t.name for t in threading.enumerate()}
    up.set()
    time.sleep(0.3)
    assert delivered == [] and buffer.pending == 1

    inside, leave = threading.Event(), threading.Event()

    def other_thread():
        with tracking.quick_failures():
            inside.set()
            leave.wait(10)

    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    worker = threading.Thread(target=other_thread)
    worker.start()
    inside.wait(10)
    with tracking.quick_failures():
        pass  # this block ends first: the other thread's calls keep failing fast
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    leave.set()
    worker.join(10)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before


def test_backfill_logs_only_the_missing_steps_once(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.mlflow_run(uri, "exp", "run") as run:
        tracking.log_metrics({"loss": 1.0, "lr": 0.1}, step=1)
    run_id = run.info.run_id
    rows = [{"step": s, "loss": float(s), "lr": 0.1, "resumed": True, "note": "x"} for s in (1, 2, 3)]
    assert tracking.backfill(uri, run_id, rows) == 4  # steps 2 and 3 of loss and lr; bools and text are no metrics
    assert tracking.backfill(uri, run_id, rows) == 0
    client = mlflow.MlflowClient(uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == \
        [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_every_experiment_opens_on_its_runs_table(tmp_path):
    """MLflow 3 shows an experiment without a kind as a GenAI traces page: every experiment the system creates, or
    finds without it, carries mlflow.experimentKind = custom_model_development."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("older", artifact_location=(tmp_path / "a").as_uri())  # made before the rule
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    for name in ("older", "fresh"):
        with tracking.mlflow_run(uri, name, "r"):
            pass
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development", name
