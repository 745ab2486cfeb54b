"""Worker loss, a killed driver and divergence, for real: smoke pre-training on Ray Train (2 gloo workers).

- a Ray Train worker SIGKILLed (by pid) after the first checkpoint, default settings: the group restarts
  from that checkpoint and the run finishes; summary.json counts the restart;
- a second `retain-asd pretrain` on the driver's --out while it runs: exit code 2 within 5 s naming the first;
- the driver (a child process running `retain-asd pretrain`) SIGKILLed right after a checkpoint is complete,
  with Ray's run snapshot one checkpoint behind and a torn checkpoint folder beside it: the re-run resumes
  from the newest complete checkpoint and removes the torn folder;
- `train.lr=1e30`: stops with the divergence message before the optimiser applies the bad step; nothing is
  exported and the last good checkpoint stays the latest.
The corpus is ingested once (module fixture) and shared by the three runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from retain_asd.config import load_config
from retain_asd.train.checkpoint import (
    COMPLETE,
    TRAIN_STATE,
    complete_checkpoints,
    complete_step,
    mark_complete,
    read_train_state,
)
from retain_asd.train.guard import OK, SKIP, STOP, DivergenceError, DivergenceGuard
from retain_asd.train.recovery import RAY_SNAPSHOT

REPO = Path(__file__).resolve().parents[2]


# The smallest evaluation world the protocol check accepts (one machine type; a stationary and a non-stationary
# noise): every pre-training writes it once per work folder before its first step (`ingest.check_protocol`), and
# the smoke preset's (3 types, 4 noises) took 12 s of the child driver's start at 10 s clips.
SMALL_EVAL = ["eval.synth_machines=[bearing]", "eval.synth_noise=[hvac, hammering]"]


def _overrides(work: Path, *more: str, tracking_uri: str | None = None) -> list[str]:
    """The module's runs: the shared work folder, the fan pre-training world, `SMALL_EVAL`; MLflow in a SQLite file
    of the work folder unless `tracking_uri` names a server."""
    tracking_uri = tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    return [f"data.work_dir={work / 'data'}", "data.synth_machines=[fan]", *SMALL_EVAL,
            f"tracking.tracking_uri={tracking_uri}", *more]


def _ten_second_clips(work: Path) -> list[str]:
    """10 s clips, in their own work folder: steps slow enough that a test acting between two checkpoints of a
    child driver gets there before the run ends (the smoke preset's 1 s clips can finish first)."""
    return ["data.clip_s=10.0", f"data.work_dir={work / 'data10s'}"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, ray_local) -> Path:
    """A work dir whose corpora (1 s and 10 s clips) are ingested once (the runs below and the child driver
    reuse them)."""
    from retain_asd.corpus.ingest import corpus_from_config

    work = tmp_path_factory.mktemp("recovery")
    corpus_from_config(load_config("smoke", overrides=_overrides(work)).data)
    corpus_from_config(load_config("smoke", overrides=_overrides(work, *_ten_second_clips(work))).data)
    return work


def _markers(run_dir: Path) -> dict[int, Path]:
    """{step: folder} of the checkpoint folders whose completeness marker is written (not verified)."""
    out = {}
    for marker in run_dir.glob(f"checkpoint_*/{COMPLETE}"):
        try:
            out[json.loads(marker.read_text())["step"]] = marker.parent
        except (OSError, ValueError):
            pass
    return out


def _wait_for(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (rc {proc.returncode})")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen after {timeout_s} s")


# ------------------------------------------------------------------------------------------------ no Ray
def test_guard_skips_up_to_n_bad_steps_then_stops():
    guard = DivergenceGuard(allowed_skips=1)
    guard.observe({"loss": 1.0, "loss_tagging": 0.5}, micro=0)
    assert guard.check(1, 2.0) == OK
    guard.observe({"loss": float("nan"), "loss_tagging": 0.5}, micro=1)
    assert guard.check(2, 2.0) == SKIP and guard.skipped == 1
    assert guard.check(3, float("inf")) == STOP
    assert guard.message.startswith("diverged at step 3: non-finite grad_norm = inf")
    assert "train.skip_nonfinite_steps" in guard.message


def test_completeness_marker_lists_every_file_and_catches_a_changed_one(tmp_path):
    folder = tmp_path / "checkpoint_a"
    folder.mkdir()
    torch.save({"step": 4}, folder / TRAIN_STATE)
    (folder / "rng_rank1.pt").write_bytes(b"x" * 100)
    assert complete_step(folder) is None  # no marker yet
    mark_complete(folder, 4)
    assert complete_step(folder) == 4
    (folder / "rng_rank1.pt").write_bytes(b"y" * 100)  # same size, other bytes
    assert complete_step(folder) is None and complete_step(folder, verify=False) == 4


def test_restarts_and_steps_lost_from_the_run_events():
    from retain_asd.train.recovery import restarts_and_steps_lost as count

    failure, failed = {"event": "worker_failure", "reached_step": 5}, {"event": "fit_failed"}

    def resumed(step: int) -> dict:
        return {"event": "resumed", "step": step}

    assert count([]) == (0, 0)
    assert count([resumed(2), failure, resumed(4)]) == (1, 1)  # lost at step 5, resumed from step 4
    assert count([failure, {**failure, "reached_step": 3}, resumed(2)]) == (2, 3)  # failed again before a report
    assert count([failure, resumed(4), failure, failed]) == (1, 1)  # the last failure not survived (max_failures)
    assert count([failure, {"event": "resource_wait_exceeded"}, failed]) == (0, 0)  # never placed again
    assert count([{"event": "resource_wait_exceeded"}, failed]) == (0, 0)  # never placed at all


def test_placement_attempts_end_at_the_resource_wait():
    from retain_asd.train.recovery import placement_attempt_s

    assert [placement_attempt_s(s) for s in (2, 60, 90, 600, 601)] == [2, 60, 45, 60, 601 / 11]


# ------------------------------------------------------------------------------------------------ Ray
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("worker-sigkill")
def test_sigkill_of_a_worker_restarts_the_group_and_the_run_finishes(work, tmp_path):
    import psutil

    from retain_asd.train.launch import pretrain

    cfg = load_config("smoke", overrides=_overrides(work, "train.total_steps=12"))  # max_failures: the default
    assert cfg.train.max_failures == 3
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not _markers(out / "ray" / cfg.name):
            time.sleep(0.05)
        workers = []
        for p in psutil.Process().children(recursive=True):  # only this session's Ray: other clusters run here
            try:
                if "RayTrainWorker" in " ".join(p.cmdline() or [p.name()]):
                    workers.append(p)
            except psutil.Error:
                pass
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    with pytest.warns(UserWarning, match="RANDOM"):
        result = pretrain(cfg, out, track=False)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker process found to kill"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert (summary["status"], summary["steps"], result.step) == ("completed", 12, 12)
    assert summary["restarts"] >= 1 and summary["resumed_from_step"]  # restarted from a checkpoint, not step 0
    assert min(summary["resumed_from_step"]) >= cfg.train.checkpoint_every
    assert math.isfinite(summary["final_loss"])
    assert read_train_state(result.checkpoint_path)["data"]["micro_batches_seen"] == 12 * cfg.train.grad_accum


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("resume-newest-complete")
@pytest.mark.reliability("two-runs-one-out")
def test_rerun_after_a_driver_kill_resumes_from_the_newest_complete_checkpoint(work, tmp_path, caplog,
                                                                               reliability_figures):
    from retain_asd.train.launch import pretrain

    overrides = _overrides(work, "train.total_steps=8", "train.checkpoint_every=2", *_ten_second_clips(work))
    cfg = load_config("smoke", overrides=overrides)
    out = tmp_path / "run"
    run_dir = out / "ray" / cfg.name
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pretrain", "--preset", "smoke", "--out",
                               str(out), "--no-mlflow", *overrides], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: 2 in _markers(run_dir), 600, "step-2 checkpoint", driver)
        stale_snapshot = (run_dir / RAY_SNAPSHOT).read_bytes()  # Ray's record while step 2 is its latest
        # the same job submitted again on the same --out: stops at once naming the first; the first goes on
        lock = json.loads((out / "run.lock").read_text())
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--preset", "smoke", "--out",
                                 str(out), "--no-mlflow", *overrides], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        second_s = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert second_s < 5.0
        assert f"pid {driver.pid} on {lock['host']}, started {lock['started']}" in second.stderr
        assert json.loads((out / "run.lock").read_text())["pid"] == driver.pid
        _wait_for(lambda: 4 in _markers(run_dir), 300, "step-4 checkpoint", driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
        log.close()
    complete, _ = complete_checkpoints(run_dir)
    newest = complete[-1][0]
    assert newest >= 4, (tmp_path / "driver.log").read_text()[-3000:]
    # Ray's snapshot one checkpoint behind (the driver died before it recorded the newest), and a torn folder
    (run_dir / RAY_SNAPSHOT).write_bytes(stale_snapshot)
    torn = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    torn.mkdir()
    (torn / TRAIN_STATE).write_bytes(b"PK\x03\x04 torn")

    caplog.set_level(logging.WARNING, logger="retain_asd.fsio")
    result = pretrain(cfg, out, track=False)
    assert (result.step, result.summary["status"]) == (8, "completed")
    assert f"took over the lock of a run that is no longer running (pid {driver.pid} " in caplog.text
    assert not (out / "run.lock").exists()
    reliability_figures("two-runs-one-out", steps_lost=0, retries=0, bytes_lost=0)  # the first reached step 4
    assert result.summary["resumed_from_step"] == [newest]  # not 2 (Ray's snapshot), not the torn folder
    assert not torn.exists()
    assert all(complete_step(p) is not None for p in run_dir.glob("checkpoint_*"))  # nothing incomplete left
    assert len(list(run_dir.glob("checkpoint_*"))) <= cfg.train.keep_checkpoints


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("divergence")
def test_huge_lr_stops_with_the_divergence_message_and_keeps_the_good_checkpoint(work, tmp_path):
    from retain_asd.train.launch import pretrain

    cfg = load_config("smoke", overrides=_overrides(work, "train.lr=1e30", "train.checkpoint_every=2"))
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"diverged at step (\d+): non-finite (loss|grad_norm)") as err:
        pretrain(cfg, out, track=False)
    bad_step = int(err.value.args[0].split()[3].rstrip(":"))
    assert not (out / "student_beats.pt").exists()  # nothing exported
    complete, _ = complete_checkpoints(out / "ray" / cfg.name)
    assert complete, "no good checkpoint before the divergence"
    step, folder = complete[-1]
    assert step < bad_step and step == (bad_step - 1) // cfg.train.checkpoint_every * cfg.train.checkpoint_every
    state = read_train_state(folder)
    assert all(torch.isfinite(v).all() for v in state["student"].values())  # the good checkpoint: finite
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["message"] == str(err.value)
    assert summary["steps"] == step and summary["student"] is None
    assert summary["worker_failures"] == 0  # reported, not raised: max_failures does not replay it
    shutil.rmtree(out / "ray", ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs mounted for the test (a real full file system); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("disk-full")
def test_disk_full_at_a_checkpoint_stops_cleanly_and_the_rerun_resumes(work, small_disk, reliability_figures):
    """The out folder on a small file system, filled (a ballast file) while the step-2 checkpoint is the newest
    complete one: the run stops before the step-4 checkpoint naming the folder and its free space; the step-2
    checkpoint stays the newest complete one; with the ballast gone the same run resumes from step 2 and
    finishes. (The run is stopped at step 2 to fill the disk: a ballast written while it runs races its steps.)"""
    from retain_asd.train.checkpoint import DiskFullError
    from retain_asd.train.launch import pretrain

    cfg = load_config("smoke", overrides=_overrides(work, "train.total_steps=4", "train.checkpoint_every=2"))
    out = small_disk / "run"
    run_dir = out / "ray" / cfg.name
    ballast = small_disk / "ballast"
    with pytest.warns(UserWarning, match="RANDOM"):
        assert pretrain(cfg, out, track=False, stop_at_step=2).step == 2
    free = shutil.disk_usage(small_disk).free
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - 256 * 1024)  # 256 KiB left: less than a checkpoint
    with pytest.raises(DiskFullError) as err:
        pretrain(cfg, out, track=False)
    message = str(err.value)
    assert message.startswith(f"{run_dir}: disk full: 0.2 MiB free, the step-4 checkpoint needs "), message
    assert "\n" not in message
    complete, incomplete = complete_checkpoints(run_dir)
    assert [s for s, _ in complete] == [2] and incomplete == []  # nothing half-written beside it

    ballast.unlink()  # space freed: the same run resumes from step 2
    started = time.monotonic()
    result = pretrain(cfg, out, track=False)
    resumed_s = time.monotonic() - started
    assert (result.step, result.summary["status"], result.summary["resumed_from_step"]) == (4, "completed", [2])
    assert result.summary["worker_failures"] == 0  # a clean stop, no retries
    # wall time added: the re-run (its start and the 2 steps done again), an upper bound
    reliability_figures(steps_lost=2, retries=0, bytes_lost=0, wall_added_s=resumed_s)


# ------------------------------------------------------------------------------------------------ MLflow server away
def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (its own SQLite store under `root`) on 127.0.0.1:`port`, once /health answers."""
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    _wait_for(up, 300, "mlflow server /health", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.reliability("mlflow-down")
def test_mlflow_server_down_from_mid_run_until_after_the_end(work, tmp_path, capsys, reliability_figures):
    """A real `mlflow server` killed once the run's first step is in it, and started again only after the run
    ended: the steps go on (later ones reach metrics.jsonl), the live logging keeps the values and retries
    (events.jsonl), `retain-asd pretrain` exits 0 naming the back-fill command; once the server is back that
    command logs every step's metrics, the artifacts and the run's end, and a second call logs nothing."""
    import mlflow

    from pipelines.cli import main
    from retain_asd.train.launch import read_metrics
    from retain_asd.train.recovery import read_events

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root, out, uri = tmp_path / "mlflow", tmp_path / "run", f"http://127.0.0.1:{port}"
    server = _mlflow_server(root, port)
    # 10 s clips: the 1 s clips' 12 steps can all finish before the server is down (seen once on 2 loaded cores)
    overrides = _overrides(work, "tracking.experiment=outage", "train.total_steps=12", "train.log_every=1",
                           "train.checkpoint_every=3", *_ten_second_clips(work), tracking_uri=uri)
    killed: dict = {}

    def kill_after_the_first_logged_step():
        client = mlflow.MlflowClient(uri)

        def first_step_logged():
            run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"] \
                if (out / "mlflow_run.json").is_file() else None
            try:
                return run_id and client.get_metric_history(run_id, "loss")
            except Exception:
                return None

        try:
            _wait_for(first_step_logged, 600, "step 1 in MLflow")
        except AssertionError:
            return
        _stop(server)
        killed["rows"] = len(read_metrics(out / "metrics.jsonl"))

    killer = threading.Thread(target=kill_after_the_first_logged_step, daemon=True)
    killer.start()
    try:
        code = main(["pretrain", "--preset", "smoke", "--out", str(out), *overrides])
        killer.join(timeout=5)
        console = capsys.readouterr().out
        assert code == 0, console
        assert killed and killed["rows"] < 12, killed  # the outage began before the last step
        steps = [row["step"] for row in read_metrics(out / "metrics.jsonl")]
        assert steps == list(range(1, 13))  # no step held up or lost
        assert f"MLflow was unreachable at the end; once it is back: retain-asd tracking backfill --out {out}" \
            in console
        outage = [e for e in read_events(out) if e["event"].startswith("mlflow_")]
        assert outage and outage[0]["event"] == "mlflow_unreachable"  # the live logging kept trying
        retries = max([1] + [e.get("retries", 0) for e in outage])

        # the live logging stopped with the fit, values left for the back-fill: no sender left retrying in the
        # controller's process, to deliver its batch once the server is back beside the back-fill's (each step
        # twice in a history)
        (end,) = [e for e in outage if e["event"] == "mlflow_live_logging_end"]
        assert end["unsent"] > 0

        server = _mlflow_server(root, port)  # back, after the run
        started = time.monotonic()
        assert main(["tracking", "backfill", "--out", str(out)]) == 0
        backfill_s = time.monotonic() - started
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        client = mlflow.MlflowClient(uri)
        for key in ("loss", "lr", "clips_per_s"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["student_beats"] == str(out / "student_beats.pt")
        assert {"config.yaml", "summary.json", "student_beats.pt"} <= {f.path for f in client.list_artifacts(run_id)}
        capsys.readouterr()
        assert main(["tracking", "backfill", "--out", str(out)]) == 0
        assert ": 0 metric values back-filled" in capsys.readouterr().out  # idempotent
        reliability_figures(steps_lost=0, retries=retries, wall_added_s=backfill_s, bytes_lost=0)
    finally:
        _stop(server)
