"""Object storage end to end, against the real S3-compatible server of `s3_server` (moto, 127.0.0.1), with
``data.storage=s3://<bucket>/e2e`` and the endpoint and keys only in the AWS_* environment variables:

ingest both corpora into the bucket -> pre-train the smoke preset in a child `retain-asd pretrain`, SIGKILLed
(with the Ray it started) once a checkpoint in the bucket is complete -> re-run in this process: it resumes
from the newest complete checkpoint in the bucket and finishes -> evaluate the student by its URI. boto3 then
lists the shards, manifests, checkpoints, student, evaluation sets, embedding cache and MLflow artifacts as
objects in the bucket, and the local work dir holds no corpus, no checkpoint, no evaluation set, no cached
embedding and no artifact.

The bucket sits behind a fault-injecting proxy (`FlakyProxy`, tests/conftest.py) that answers 30% of the
requests with 503 SlowDown or a connection reset, 60 requests in a row at three points: the start of ingest, the
resumed pre-training's first report (its checkpoints, the student's upload, the MLflow artifacts), and the start
of evaluation. Every stage finishes through the retries of `storage.RetryingS3FileSystem` (pyarrow, also in Ray's
workers) and of boto3 (MLflow's artifacts), and no object listed as complete (a checkpoint's complete.json, a
corpus manifest) lacks a file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retain_asd.config import load_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "retain-asd-test"  # created by the `s3_server` fixture (tests/conftest.py)
FAULTY_REQUESTS = 60  # each fault window: the next 60 requests to the bucket, 30% of them answered with a fault
SMALL = ["data.clip_s=1.0", "train.total_steps=6", "train.checkpoint_every=2", "eval.snrs_db=[0.0]",
         "eval.conditions=[factory_a]", "eval.source_refs=2", "eval.target_refs=2", "eval.test_normal=2",
         "eval.test_anomaly=2", "tracking.experiment=storage-e2e"]


def _complete_steps(bucket_keys, prefix: str) -> dict[int, str]:
    """{step: checkpoint folder key} of the checkpoints whose completeness marker is in the bucket."""
    import boto3

    client = boto3.client("s3")  # endpoint and keys from the AWS_* environment, like the library
    out = {}
    for key in bucket_keys(prefix):
        if key.endswith("/complete.json"):
            marker = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            out[int(marker["step"])] = key.rpartition("/")[0]
    return out


def _wait_until_gone(session: int, timeout_s: float = 60) -> None:
    """Wait until no process of the killed driver's session (its Ray, its Ray Train controller) is left."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (OSError, psutil.Error):
                pass
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of session {session} still alive after {timeout_s} s")


def _listed_but_missing(bucket_keys) -> list[str]:
    """Files a completion marker lists that are not in the bucket (or not at the listed size): each checkpoint's
    complete.json, each corpus manifest.json."""
    import boto3

    client = boto3.client("s3")
    keys = bucket_keys("e2e/")
    missing = []
    for key in keys:
        folder = key.rpartition("/")[0]
        if key.endswith("/complete.json"):
            marker = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            for name, meta in marker["files"].items():
                found = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{folder}/{name}").get("Contents", [])
                if not any(o["Key"] == f"{folder}/{name}" and o["Size"] == meta["bytes"] for o in found):
                    missing.append(f"{folder}/{name}")
        elif key.endswith("/manifest.json") and "/corpus_" in key:
            manifest = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            missing += [f"{folder}/{name}" for name in manifest["shards"] if f"{folder}/{name}" not in keys]
    return missing


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("bucket-errors")
def test_ingest_pretrain_kill_resume_evaluate_in_the_bucket(ray_local, flaky_s3_env, bucket_keys, small_worlds,
                                                           tmp_path, caplog, reliability_figures):
    from retain_asd.corpus.ingest import corpora_from_config
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.eval.evalsets import evalsets_from_config
    from retain_asd.experiments import resolve_checkpoints
    from retain_asd.models.beats import load_beats
    from retain_asd.train.checkpoint import read_train_state, state_digest
    from retain_asd.train.launch import pretrain, read_metrics

    work = tmp_path / "data"
    overrides = [f"data.work_dir={work}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"data.storage=s3://{BUCKET}/e2e", *SMALL, *small_worlds]
    cfg = load_config("smoke", overrides=overrides)

    proxy = flaky_s3_env
    # 1. ingest: shards, manifests, rejects and labels are objects in the bucket (30% errors in its first 60 requests)
    proxy.faults(FAULTY_REQUESTS, rate=0.3)
    pre, ev, _ = corpora_from_config(cfg)
    assert (pre.root, ev.root) == (f"s3://{BUCKET}/e2e/corpus_pretrain", f"s3://{BUCKET}/e2e/corpus_eval")
    for corpus in ("corpus_pretrain", "corpus_eval"):
        keys = bucket_keys(f"e2e/{corpus}/")
        for part in ("machine", "noise"):
            names = [k.rpartition("/")[2] for k in keys if k.startswith(f"e2e/{corpus}/{part}/")]
            assert {"manifest.json", "rejects.csv", "source.json"} <= set(names)
            assert any(n.startswith("part-") and n.endswith(".parquet") for n in names)
        assert f"e2e/{corpus}/labels.json" in keys
    assert pre.machine.num_rows > 0 and ev.machine.num_rows > 0

    # 2. pre-train in a child driver; SIGKILL it (and its Ray) once a checkpoint in the bucket is complete
    out = tmp_path / "run"
    prefix = f"e2e/runs/run/{cfg.name}/"
    log = open(tmp_path / "driver.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the AWS_* variables of `s3_env` included
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pretrain", "--preset", "smoke", "--out",
                               str(out), "--no-mlflow", *overrides], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _complete_steps(bucket_keys, prefix):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no complete checkpoint in the bucket after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
        _wait_until_gone(driver.pid)  # Ray's workers notice the kill late: one could still write to the bucket
    newest, folder = max(_complete_steps(bucket_keys, prefix).items())
    assert 2 <= newest < cfg.train.total_steps
    saved = read_train_state(f"s3://{BUCKET}/{folder}")  # read back from the bucket (weights_only)
    assert saved["step"] == newest
    assert not (out / "ray").exists() and not (out / "student_beats.pt").exists()

    # 3. the re-run resumes from the bucket's newest complete checkpoint and finishes (30% errors in 60 requests from
    # its first report: its checkpoints, the student's upload and the MLflow artifacts go through them)
    def faults_at_the_first_report():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any("resumed_from_step" in m
                                                      for m in read_metrics(out / "metrics.jsonl")):
            time.sleep(0.1)
        proxy.faults(FAULTY_REQUESTS, rate=0.3)

    opener = threading.Thread(target=faults_at_the_first_report, daemon=True)
    opener.start()
    with pytest.warns(UserWarning, match="RANDOM"):
        result = pretrain(cfg, out)
    opener.join(timeout=1)
    assert (result.step, result.summary["status"]) == (cfg.train.total_steps, "completed")
    assert result.summary["resumed_from_step"] == [newest]
    assert result.checkpoint_path.startswith(f"s3://{BUCKET}/{prefix}checkpoint_")
    assert result.student_uri == f"s3://{BUCKET}/{prefix}student_beats.pt"
    assert max(_complete_steps(bucket_keys, prefix)) == cfg.train.total_steps
    resumed = next(m for m in read_metrics(out / "metrics.jsonl") if "resumed_from_step" in m)
    assert resumed["optimizer_sha256_at_resume"] == state_digest(saved["optimizer"])  # the bucket's optimizer
    final = read_train_state(result.checkpoint_path)
    assert final["data"]["micro_batches_seen"] == cfg.train.total_steps * cfg.train.grad_accum
    assert all(int(s["step"]) == cfg.train.total_steps for s in final["optimizer"]["state"].values())
    assert state_digest(load_beats(result.student_path).state_dict()) == state_digest(final["student"])

    # 4. evaluate the student by its URI (copied to a local cache, loaded weights_only; 30% errors in 60 requests)
    proxy.faults(FAULTY_REQUESTS, rate=0.3)
    (scores,) = evaluate_from_config(cfg, resolve_checkpoints(cfg, [result.student_uri], tmp_path / "eval"),
                                     tmp_path / "eval")
    assert scores.name == f"{cfg.name}-seed{cfg.train.seed}" and scores.cells

    with caplog.at_level(logging.INFO, logger="retain_asd.eval.evalsets"):
        sets = evalsets_from_config(cfg)  # read back from the bucket: the manifest matches, nothing is rebuilt
    assert f"s3://{BUCKET}/e2e/evalsets: evaluation sets up to date" in caplog.text
    assert sets.root == f"s3://{BUCKET}/e2e/evalsets" and sets.table.num_rows == sets.manifest["rows"]

    # 5. what is in the bucket, and what is not on local disk
    keys = bucket_keys("e2e/")
    run_keys = [k for k in keys if k.startswith(prefix)]
    assert {f"{prefix}{n}" for n in ("student_beats.pt", "config.yaml", "summary.json", "mlflow_run.json")} \
        <= set(run_keys)
    init_name = f"init_beats_{cfg.model.size}_seed{cfg.train.seed}.pt"  # the workers read it from the bucket
    assert [k for k in run_keys if k.startswith(f"{prefix}init/")] == [f"{prefix}init/{init_name}"]
    checkpoints = {k.split("/")[4] for k in run_keys if k.split("/")[4].startswith("checkpoint_")}
    assert 1 <= len(checkpoints) <= cfg.train.keep_checkpoints
    for folder in checkpoints:
        assert {f"{prefix}{folder}/train_state.pt", f"{prefix}{folder}/complete.json"} <= set(run_keys)
    artifacts = [k for k in keys if k.startswith("e2e/mlartifacts/storage-e2e/")]
    assert any(k.endswith("/artifacts/student_beats.pt") for k in artifacts)  # the pre-training run's
    assert any("/artifacts/evaluate/" in k and k.endswith("table2_dn.md") for k in artifacts)  # the evaluation's
    assert {"e2e/evalsets/recipes.parquet", "e2e/evalsets/manifest.json"} <= set(keys)
    assert any(k.startswith("e2e/embeddings/") and k.endswith(".npz") for k in keys)
    assert not any((work / name).exists()
                   for name in ("corpus_pretrain", "corpus_eval", "mlartifacts", "evalsets", "embeddings"))
    assert not (out / "ray").exists() and not (tmp_path / "mlartifacts").exists()
    assert _listed_but_missing(bucket_keys) == []  # a marker or manifest never lists a file the bucket lacks
    faults = sum(proxy.injected.values())
    assert proxy.injected["slowdown"] > 0 and proxy.injected["reset"] > 0, proxy.injected
    reliability_figures(steps_lost=0, retries=faults, bytes_lost=0)
