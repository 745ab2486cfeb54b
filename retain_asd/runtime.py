"""Process set-up shared by every entry point: the Ray / MLflow environment and a local Ray start.

The environment defaults below are needed on a single machine without internet: Ray 2.60 turns token auth
on (job submission then fails), tries to upload usage stats, and without single-node mode binds to a
public interface; MLflow sends telemetry. They are *defaults*: a value already set wins.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_DEDUP_LOGS": "1",
}

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # Ray's default takes 30% of RAM


def apply_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False):
    """Join ``address`` (or $RAY_ADDRESS, e.g. inside ``ray job submit``) or start an embedded local Ray.

    Idempotent: returns at once when Ray is already initialised in this process.
    """
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(
            address="local",  # always a fresh embedded cluster, never a stale `ray start` one
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=not quiet,
            logging_level=logging.WARNING,
        )
        _mark_local_session()
    return ray


# ---------------------------------------------------------------------------------------------------- clean-up
# An embedded Ray leaves its session folder (logs, and spilled objects: hundreds of MB) under the Ray temp
# folder. A finished run removes its own (finish_local_ray); a killed driver cannot, so each local start marks
# its session with the driver's pid and removes the marked sessions whose driver is gone. Sessions without
# the mark (other users' clusters, `ray start`) are never touched.
DRIVER_MARK = "retain_asd_driver.pid"
_local_session: Path | None = None


def _session_dir() -> Path | None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray has no public accessor for it
    return Path(node.get_session_dir_path()) if node is not None else None


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_sessions(temp_root: Path, keep: Path | None = None) -> list[tuple[Path, int]]:
    """Remove session folders marked by a retain-asd driver that no longer runs; returns (folder, bytes)."""
    removed = []
    for session in sorted(temp_root.glob("session_*")):
        mark = session / DRIVER_MARK
        if session == keep or session.is_symlink() or not mark.is_file():
            continue
        try:
            pid = int(mark.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            size = folder_bytes(session)
            shutil.rmtree(session, ignore_errors=True)
            removed.append((session, size))
    return removed


def _mark_local_session() -> None:
    global _local_session
    session = _session_dir()
    if session is None:
        return
    _local_session = session
    try:
        (session / DRIVER_MARK).write_text(f"{os.getpid()}\n")
    except OSError:
        return
    removed = remove_dead_sessions(session.parent, keep=session)
    if removed:
        mb = sum(size for _, size in removed) / 1024**2
        log.warning("removed %d Ray session folder(s) of killed runs under %s (%.0f MB)", len(removed),
                    session.parent, mb)


def finish_local_ray(ok: bool) -> str | None:
    """Stop the embedded Ray this process started and clean its session folder; returns a line to print.

    ``ok``: the whole folder goes. Otherwise the spilled objects go and the logs stay for a post-mortem; the
    line gives their size and the command that removes them. None when this process started no local Ray.
    """
    global _local_session
    session, _local_session = _local_session, None
    if session is None:
        return None
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if not session.is_dir():
        return None
    if ok:
        size = folder_bytes(session)
        shutil.rmtree(session, ignore_errors=True)
        return f"removed the Ray session folder of this run ({size / 1024**2:.1f} MB: logs, spilled objects)"
    for spill in session.glob("ray_spilled_objects*"):
        shutil.rmtree(spill, ignore_errors=True)
    size = folder_bytes(session)
    return (f"Ray logs of this run: {session} ({size / 1024**2:.1f} MB); remove them with: rm -rf {session}")


def set_data_progress(enabled: bool) -> None:
    """Turn Ray Data progress bars on (CLI) or off (tests, benchmarks)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.enable_operator_progress_bars = enabled
    ctx.print_on_execution_start = enabled
