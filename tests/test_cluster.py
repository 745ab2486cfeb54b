"""Cluster path, for real: `ray start --head` on 127.0.0.1, a job through the job API, an MLflow server.

The job runs the same entry point a user submits (``python -m pipelines.ingest``) with the checkout as its
working_dir; it joins the head through $RAY_ADDRESS that Ray sets for a job driver.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from retain_asd.runtime import ENV_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the service is still starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not up after {timeout_s} s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the leader, then SIGKILL to what is left of its group (a SIGTERM to the whole group stops
    `ray start --block`'s GCS before the leader's shutdown reaches it)."""
    try:
        proc.terminate()
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # No drain on SIGTERM: Ray's waits up to 30 s for the node's leases to end (for a Serve deployment's traffic),
    # and the job's leftover workers kept this head waiting the full 30 s at every teardown.
    env = {**os.environ, **ENV_DEFAULTS, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    gcs_port, dash_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("rayhead") / "ray_start.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=2",
         # own agent ports: the embedded test cluster on this machine already holds the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}",
         f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        client = wait_until(lambda: JobSubmissionClient(url), 90, f"Ray dashboard at {url}")
        yield client
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, **ENV_DEFAULTS}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 90, "MLflow server")
        yield uri
    finally:
        stop_group(proc)
        log.close()


def test_ingest_job_submitted_to_head(ray_head, shared_data, tmp_path):
    from ray.job_submission import JobStatus

    machine = tmp_path / "raw" / "fan" / "train"
    machine.mkdir(parents=True)
    clips = sorted((shared_data / "machine" / "dcase2020t2_dev_id00" / "train").glob("*.wav"))[:4]
    for i, clip in enumerate(clips):  # real DCASE 2020 clips renamed into the 2023 convention
        shutil.copy(clip, machine / f"section_00_source_train_normal_{i:04d}_noAttribute.wav")
    noise = tmp_path / "noise" / "tap"
    noise.mkdir(parents=True)
    shutil.copy(shared_data / "noise" / "running_tap.wav", noise)
    (tmp_path / "noise" / "categories.yaml").write_text("tap: {stationary: true}\n")
    out = tmp_path / "corpus"
    entry = (f"{sys.executable} -m pipelines.ingest --machine-root {tmp_path / 'raw'} "
             f"--noise-root {tmp_path / 'noise'} --out {out}")
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", "runs", ".git", "**/__pycache__"],
                   "env_vars": dict(ENV_DEFAULTS)}
    # the dashboard answers before its job agent is ready ("No available agent"): retry the submission
    job = wait_until(lambda: ray_head.submit_job(entrypoint=entry, runtime_env=runtime_env), 90, "job agent")
    status = wait_until(lambda: ray_head.get_job_status(job) if ray_head.get_job_status(job).is_terminal()
                        else None, 480, "job to finish")
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert re.search(r"machine\s+4 inputs\s+4 written\s+0 rejected", logs), logs
    pretrain_corpus = out / "corpus_pretrain"  # the pre-training corpus; the evaluation corpus beside it
    assert (pretrain_corpus / "machine" / "manifest.json").is_file() and (pretrain_corpus / "labels.json").is_file()
    # a real corpus without an evaluation corpus: no synthetic evaluation world is written in its place
    assert "evaluation corpus: not ingested. eval.machine_root / eval.noise_root empty" in logs, logs
    assert not (out / "corpus_eval").exists()


def test_runs_logged_to_mlflow_server_compare_side_by_side(mlflow_server):
    from retain_asd.tracking import compare_runs, log_metrics, mlflow_run

    for name, score in (("denoise", 0.61), ("tagging_mixture_pm5", 0.68)):
        with mlflow_run(mlflow_server, "ablation", name, params={"objective": {"name": name}}):
            log_metrics({"hmean_all": score, "factory_a/snr_-10/official": score - 0.1})
    rows = {r["run_name"]: r for r in compare_runs(mlflow_server, "ablation", ["hmean_all",
                                                                             "factory_a/snr_-10/official"])}
    assert rows["denoise"]["hmean_all"] == pytest.approx(0.61)
    assert rows["tagging_mixture_pm5"]["factory_a/snr_-10/official"] == pytest.approx(0.58)
