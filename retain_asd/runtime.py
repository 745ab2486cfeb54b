"""Process set-up shared by every entry point: the Ray / MLflow environment and a local Ray start.

The environment defaults below are needed on a single machine without internet: Ray 2.60 turns token auth
on (job submission then fails), tries to upload usage stats, and without single-node mode binds to a
public interface; MLflow sends telemetry. They are *defaults*: a value already set wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_DEDUP_LOGS": "1",
    # an object store answering errors for a while (503 SlowDown, resets): boto3 (MLflow's S3 artifacts) retries
    # like pyarrow does (retain_asd.storage.S3_MAX_ATTEMPTS), with the standard mode's backoff
    "AWS_RETRY_MODE": "standard",
    "AWS_MAX_ATTEMPTS": "10",
}

# The embedded Ray's object store (Ray's default takes 30% of RAM): 2 GiB, or a quarter of RAM on a small
# machine. The training stream's blocks are 40-80 MB; with 512 MiB, Ray spilled them to disk and the stream
# ran at 2.4-4.0 ms of CPU per 10 s clip instead of 1.9 (benchmarks/stream.py, 2 cores).
LOCAL_OBJECT_STORE_BYTES = min(2 * 1024**3, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)

# Ray Train settings for the embedded Ray (one machine, a few workers); a value in the environment wins, and a
# cluster (`ray job submit`, $RAY_ADDRESS) keeps Ray's defaults.
# - The controller polls its workers every 2 s by default, and a worker's report waits until the previous one is
#   collected (a result queue of one): a smoke run reporting every step ran one step per 2 s, and every fit
#   spent up to 2 s noticing its start, its end or a dead worker. 0.2 s: a 6-step smoke fit 31 -> 24 s (first
#   in a process) and 24 -> 16.5 s (later ones), 2 idle cores; the polls are two actor calls each.
# - The preemption watcher (an actor per fit) polls Ray for nodes being drained, which one machine never has.
LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def apply_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def apply_local_ray_train_env(environ=os.environ) -> None:
    """`LOCAL_RAY_TRAIN_ENV` where not set (Ray Train reads them when a fit starts its controller)."""
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        environ.setdefault(key, value)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: `taskset`, a container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


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
        apply_local_ray_train_env()
        ray.init(
            address="local",  # always a fresh embedded cluster, never a stale `ray start` one
            num_cpus=num_cpus or usable_cpus(),
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
    reap_workers_of_dead_clusters()
    removed = remove_dead_sessions(session.parent, keep=session)
    if removed:
        mb = sum(size for _, size in removed) / 1024**2
        log.warning("removed %d Ray session folder(s) of killed runs under %s (%.0f MB)", len(removed),
                    session.parent, mb)


def _raylet_pid() -> int | None:
    """The pid of the raylet of the local Ray this process started (None if unknown)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray has no public accessor for it
    try:
        return int(node.all_processes["raylet"][0].process.pid)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None


def _ray_workers() -> dict[int, int]:
    """{pid: its raylet's pid} of the Ray worker processes on this machine (RAY_RAYLET_PID in their environment,
    as every Ray worker has); empty without /proc."""
    found = {}
    if not Path("/proc").is_dir():
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        for item in environ:
            if item.startswith(b"RAY_RAYLET_PID="):
                with contextlib.suppress(ValueError):
                    found[int(entry.name)] = int(item.split(b"=", 1)[1])
                break
    return found


def _is_raylet(pid: int) -> bool:
    try:
        return b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pids: list[int], why: str) -> int:
    import signal

    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        log.warning("killed %d Ray worker process(es) %s: %s", len(pids), why, pids)
    return len(pids)


def reap_orphan_workers(raylet_pid: int | None, grace_s: float = 2.0) -> int:
    """Kill the worker processes of a stopped local Ray that outlived it; returns how many.

    Workers carry their raylet's pid in RAY_RAYLET_PID. After `ray.shutdown()` they exit by themselves, but a
    Train controller caught in its own teardown was once left behind at the end of the test suite, asleep and
    reparented to init. Linux only (/proc); a no-op elsewhere or without a pid.
    """
    import time

    if raylet_pid is None:
        return 0
    deadline = time.monotonic() + grace_s
    while (left := [p for p, r in _ray_workers().items() if r == raylet_pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _kill(left, "that outlived their cluster")


def reap_workers_of_dead_clusters() -> int:
    """Kill the Ray worker processes on this machine whose raylet is gone (a killed driver's cluster); returns
    how many. Such a worker does no more useful work, but a Train controller among them can still write its run
    snapshot into a run folder that a re-run is cleaning (seen after SIGKILL of a driver: the re-run then
    failed on a snapshot naming a checkpoint it had just removed). Workers of a live raylet are left alone."""
    return _kill([p for p, r in _ray_workers().items() if not _is_raylet(r)], "whose raylet is gone")


def finish_local_ray(ok: bool) -> str | None:
    """Stop the embedded Ray this process started and clean its session folder; returns a line to print.

    ``ok``: the whole folder goes. Otherwise the spilled objects go and the logs stay for a post-mortem; the
    line gives their size and the command that removes them, and the folder loses its driver mark (it is no
    killed run's leftover for the next start to remove). None when this process started no local Ray.
    """
    global _local_session
    session, _local_session = _local_session, None
    if session is None:
        return None
    import ray

    if ray.is_initialized():
        raylet = _raylet_pid()
        ray.shutdown()
        reap_orphan_workers(raylet)
    if not session.is_dir():
        return None
    if ok:
        size = folder_bytes(session)
        shutil.rmtree(session, ignore_errors=True)
        return f"removed the Ray session folder of this run ({size / 1024**2:.1f} MB: logs, spilled objects)"
    for spill in session.glob("ray_spilled_objects*"):
        shutil.rmtree(spill, ignore_errors=True)
    # Kept on purpose, and the line below says so: the next start must not take it for a killed run's folder.
    (session / DRIVER_MARK).unlink(missing_ok=True)
    size = folder_bytes(session)
    return (f"Ray logs of this run: {session} ({size / 1024**2:.1f} MB); remove them with: rm -rf {session}")


# ---------------------------------------------------------------------------------------------------- console
class Console:
    """The people's console of a command: lines and progress bars on the terminal, everything else (Ray's and
    MLflow's logs, library warnings, third-party prints) in a log file.

    Inside `quiet_console(log_path)`: file descriptors 1 and 2 (and sys.stdout / sys.stderr, Python logging,
    warnings) go to the log file, so output of Ray's C++ core and of child processes lands there too;
    `Console.say` and `Console.progress` write to the terminal the command started with.
    """

    def __init__(self, stream, log_path: Path | None = None):
        self.stream = stream
        self.log_path = log_path
        self.lines = 0

    def say(self, text: str = "") -> None:
        for line in str(text).splitlines() or [""]:
            self.stream.write(line + "\n")
            self.lines += 1
        self.stream.flush()
        if self.log_path is not None:  # the log keeps the console lines too, in order
            print(text, file=sys.stdout, flush=True)

    def progress(self, total: int, desc: str):
        """A tqdm bar on the terminal (one line when it closes), or a no-op bar when not a terminal."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True,
                    disable=not isatty(self.stream))


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def quiet_console(log_path: str | os.PathLike | None, verbose: bool = False):
    """Yield a `Console`. Quiet (default): all other output goes to `log_path` (appended), Python loggers at
    INFO, warnings too; `verbose` or no `log_path`: nothing is redirected (the console is sys.stdout)."""
    if verbose or log_path is None:
        yield Console(sys.stdout)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    log_file = open(log_path, "a", buffering=1)
    old_streams = sys.stdout, sys.stderr
    console = Console(terminal, log_path)
    root = logging.getLogger()
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        sys.stdout = sys.stderr = log_file
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        yield console  # warnings print to sys.stderr: the log too
    finally:
        console.stream, console.log_path = old_streams[0], None  # still usable after the block
        root.handlers, root.level = old_handlers, old_level
        sys.stdout, sys.stderr = old_streams
        log_file.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err):
            os.close(fd)
        terminal.close()
        log_file.close()


def limit_torch_threads(default: int = 1) -> int:
    """Torch intra-op threads of this process: $RETAIN_ASD_TORCH_THREADS, else `default` (1).

    On a small shared machine more threads are much slower, not faster: measured on the 2-core machine under
    load, embedding 1 s clips with the stand-in encoder ran at 19-68 clips/s with 1 thread and 1.8 clips/s with
    2 (threads spin-waiting for cores other processes hold). Ray Train workers get OMP_NUM_THREADS from Ray."""
    import torch

    threads = int(os.environ.get("RETAIN_ASD_TORCH_THREADS", default))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # Ray workers started after this inherit it
    return threads


def set_data_progress(enabled: bool) -> None:
    """Turn Ray Data progress bars on (CLI) or off (tests, benchmarks)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.enable_operator_progress_bars = enabled
    ctx.print_on_execution_start = enabled
