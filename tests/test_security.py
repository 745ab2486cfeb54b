"""Services expose nothing: cluster.yaml keeps the Ray dashboard / job API on loopback and MLflow behind a login
on the cluster's own interface; a local run leaves no Ray session folder (logs, spilled objects) behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _flag(command: str, name: str) -> str | None:
    m = re.search(rf"{name}[= ](\S+)", command)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.mark.reliability("cluster-exposure")
def test_ray_dashboard_and_job_api_on_loopback(cluster):
    (start,) = [c for c in cluster["head_start_ray_commands"] if "ray start --head" in c]
    assert _flag(start, "--dashboard-host") == "127.0.0.1"
    commands = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in commands + cluster["head_setup_commands"])


@pytest.mark.reliability("cluster-exposure")
def test_mlflow_server_only_for_the_cluster_with_a_login(cluster):
    head = cluster["provider"]["head_ip"]
    (server,) = [c for c in cluster["head_setup_commands"] if "mlflow server" in c]
    allowed = _flag(server, "--allowed-hosts").split(",")
    assert head in allowed and f"{head}:5000" in allowed  # jobs logging to http://<head>:5000 are not refused
    assert not any("*" in h for h in allowed)
    assert _flag(server, "--host") == head  # the cluster-internal interface, not 0.0.0.0
    assert _flag(server, "--app-name") == "basic-auth"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in server and "default_permission = NO_PERMISSIONS" in "".join(
        cluster["head_setup_commands"])


@pytest.mark.reliability("ray-spill-leftover")
def test_sessions_of_dead_drivers_are_removed_others_kept(tmp_path):
    from retain_asd.runtime import DRIVER_MARK, remove_dead_sessions

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    for name, pid in (("session_dead", dead), ("session_live", os.getpid()), ("session_other", None)):
        spill = tmp_path / name / "ray_spilled_objects"
        spill.mkdir(parents=True)
        (spill / "obj").write_bytes(b"x" * 4096)
        if pid is not None:
            (tmp_path / name / DRIVER_MARK).write_text(f"{pid}\n")
    removed = remove_dead_sessions(tmp_path)
    assert [(p.name, size >= 4096) for p, size in removed] == [("session_dead", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session_live", "session_other"]


@pytest.mark.slow
@pytest.mark.reliability("ray-spill-leftover")
def test_a_finished_local_run_removes_its_ray_session_folder(tmp_path):
    """A real embedded Ray in a fresh process: after the command its session folder is gone (ok run), or
    only its logs stay, with their size and the command that removes them (failed run)."""
    from retain_asd.runtime import DRIVER_MARK

    code = ("import sys\n"
            "from retain_asd import runtime\n"
            "ray = runtime.init_ray(num_cpus=1, quiet=True)\n"
            "print(runtime._session_dir())\n"
            "print(runtime.finish_local_ray(ok=sys.argv[1] == 'ok'))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for outcome in ("ok", "failed"):
        proc = subprocess.run([sys.executable, "-c", code, outcome], capture_output=True, text=True, timeout=180,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        session, note = proc.stdout.strip().splitlines()[-2:]
        if outcome == "ok":
            assert not Path(session).exists() and note.startswith("removed the Ray session folder of this run")
        else:
            assert Path(session).is_dir() and not list(Path(session).glob("ray_spilled_objects*"))
            assert note.startswith(f"Ray logs of this run: {session} (") and note.endswith(f"rm -rf {session}")
            assert not (Path(session) / DRIVER_MARK).exists()  # kept on purpose: no "killed run" at the next start
            subprocess.run(["rm", "-rf", session], check=True)


@pytest.mark.reliability("ray-worker-leftover")
def test_workers_that_outlive_their_cluster_are_killed_others_kept():
    """`runtime.reap_orphan_workers` kills the processes carrying the stopped raylet's pid in RAY_RAYLET_PID (as
    every Ray worker does) after the grace period; `reap_workers_of_dead_clusters` kills those whose raylet pid
    is no raylet any more (a killed driver's cluster). A process of a live raylet is left alone."""
    from retain_asd.runtime import reap_orphan_workers, reap_workers_of_dead_clusters

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "raylet"])  # 'raylet' in argv
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    ours = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": "999999991"})
    orphan = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": dead})
    live = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": str(raylet.pid)})
    procs = (raylet, ours, orphan, live)
    try:
        time.sleep(0.5)  # environments readable
        assert reap_orphan_workers(999999991, grace_s=0.5) == 1
        assert ours.wait(timeout=10) == -9  # SIGKILL
        assert reap_orphan_workers(999999991, grace_s=0.0) == 0 and reap_orphan_workers(None) == 0
        assert reap_workers_of_dead_clusters() >= 1  # the orphan (and any real one this machine had)
        assert orphan.wait(timeout=10) == -9
        assert live.poll() is None and raylet.poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
