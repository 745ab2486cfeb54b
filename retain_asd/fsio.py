"""Files the system reads back: written atomically, read with errors that name the file and the fix.

Every writer goes through ``atomic_write`` (or a helper on top of it): the bytes go to a hidden temp file in the
same folder (``.<name>.tmp-<pid>-<rand>``), are fsync'ed, and replace the final name with ``os.replace``, so a
reader sees the old file or the new one, never half of one, even when the writer is SIGKILLed. The final file
gets the user's normal umask permissions (``mkstemp`` would leave 0600, unreadable by colleagues on shared
storage). Readers skip hidden temp names (``is_temp``), and ``remove_stale_temps`` deletes the temp files and
folders that a killed run left behind, at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

# `.name.tmp-<pid>-<rand>` (files and folders being written) and `.name.old-<pid>-<rand>` (folders swapped out).
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+(?:\..*)?$")
_LEGACY_TEMP = re.compile(r"^\..+\.(?:tmp|old)(?:-[0-9a-f]+)?(?:\..*)?$")  # names of older versions (no pid)
LEGACY_MAX_AGE_S = 3600.0


class CorruptFileError(ValueError):
    """A file the system wrote earlier cannot be parsed (typically torn by a killed writer)."""

    def __init__(self, path: str | os.PathLike, why: str, fix: str | None = None):
        self.path = Path(path)
        fix = fix or "delete it (or re-run with --force) so that it is written again"
        super().__init__(f"{path}: cannot be read ({why}); it may have been cut short by a killed run: {fix}")


# ---------------------------------------------------------------------------------------------------- names
def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """The hidden sibling ``.<name>.<kind>-<pid>-<rand>`` of ``path`` (the pid lets a later start tell
    a dead writer's leftover from a live writer's file)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def is_temp(path: str | os.PathLike) -> bool:
    """True for a hidden temp file or folder of an atomic write: readers skip these."""
    name = Path(path).name
    return bool(_TEMP.match(name) or _LEGACY_TEMP.match(name))


def visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without hidden files (temp files of writers in progress or killed), sorted."""
    return sorted(p for p in paths if not p.name.startswith("."))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete temp files/folders in ``folder`` (and below it, with ``recursive``) whose writer is gone;
    returns what was removed.

    A name with a pid is stale when no process with that pid runs on this host; a name of an older version
    (no pid) when it is older than an hour. A live writer's temp file is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if recursive:
        removed = []
        for root, dirs, _ in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # never inside a temp folder
            removed += remove_stale_temps(root)
        return removed
    removed = []
    now = time.time()
    for entry in folder.iterdir():
        m, stale = _TEMP.match(entry.name), False
        if m:
            stale = not _pid_alive(int(m["pid"]))
        elif _LEGACY_TEMP.match(entry.name):
            with contextlib.suppress(OSError):
                stale = now - entry.lstat().st_mtime > LEGACY_MAX_AGE_S
        else:
            continue
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------------- writers
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / fsync'ed
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, newline: str | None = None,
                 encoding: str | None = "utf-8") -> Iterator[TextIO | BinaryIO]:
    """``with atomic_write(p) as f: f.write(...)``: temp file + fsync + ``os.replace``; on an error the
    temp file is removed and ``p`` is untouched. ``mode`` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r}, expected 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline, "encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = None) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """matplotlib ``fig.savefig`` through a temp file (the format comes from the final suffix)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path


def commit_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make a folder written under a temp name (``temp_path(final)``) visible as ``final``, by renames only:
    a reader sees the old folder or the new one."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        trash = temp_path(final, "old")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single ``write`` on an O_APPEND descriptor, then fsync.

    A kill can still cut the last line short; ``read_jsonl`` drops such a torn *last* line, and this function
    first cuts it off (the step it held is reported again after the resume), so a torn line never stays in
    the middle of the file. One writer per file (the Ray Train controller for metrics.jsonl).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(max(0, size - 65536))
                tail = f.read()
            if not tail.endswith(b"\n"):  # a torn last line: keep everything up to its start
                cut = tail.rfind(b"\n")
                os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size))
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- readers
def read_json(path: str | os.PathLike, fix: str | None = None) -> Any:
    """JSON of a file this system wrote; an empty or torn file is a CorruptFileError naming it and ``fix``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise CorruptFileError(path, "empty file", fix)
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise CorruptFileError(path, f"not UTF-8 text: {err.reason}", fix) from None
    except json.JSONDecodeError as err:
        raise CorruptFileError(path, f"invalid JSON at line {err.lineno}: {err.msg}", fix) from None


def read_jsonl(path: str | os.PathLike, fix: str | None = None) -> list[dict]:
    """Rows of a JSON-lines file. A torn *last* line (no newline at the end: a writer killed mid-line) is
    dropped; a bad line before it is a CorruptFileError naming the file and the line."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) and not complete:  # the torn tail of a killed append
                break
            raise CorruptFileError(path, f"line {i} is not a JSON object ({err})", fix) from None
        rows.append(row)
    return rows


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why loading the torch file at ``path`` could need far more memory than its size, or None; read from the zip
    directory only, before anything is loaded.

    ``torch.save`` writes a zip whose records are stored as they are, so loading needs about the file's size. A
    compressed record (torch loads one: a 1 MB file can inflate to gigabytes), records that claim more bytes than
    the file holds, or the legacy pre-1.6 format (it allocates each tensor at the size its header claims, before
    reading it) are refused."""
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a pickle: torch's legacy format
            return ("saved in torch's legacy format (before torch 1.6), which allocates tensors at the sizes it "
                    "claims before reading them; save it again with a current torch.save")
        return None  # not a zip nor a pickle: torch.load fails on it with its own error
    claimed = sum(r.file_size for r in records)
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        return (f"holds compressed records ({packed[0]}{', ...' if len(packed) > 1 else ''}) that unpack to "
                f"{claimed / 2**20:.0f} MiB from a {size / 2**20:.1f} MiB file; torch.save never compresses, so "
                "this is not a file it wrote")
    if claimed > size or any(r.header_offset + r.compress_size > size for r in records):
        return f"its records claim {claimed} bytes, more than the file's {size}: it was cut short or forged"
    return None


def load_torch(path: str | os.PathLike, fix: str | None = None, **kwargs) -> Any:
    """``torch.load(weights_only=True)`` whose failure on a torn or foreign file names the file; a file that would
    need far more memory than its size is refused before loading (`torch_file_problem`)."""
    import torch

    path = Path(path)
    kwargs.setdefault("map_location", "cpu")
    problem = torch_file_problem(path) if path.is_file() else None
    if problem:
        raise CorruptFileError(path, problem, fix)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as err:  # zip / unpickling errors of a truncated file; pickle payloads refused
        first = str(err).splitlines()[0] if str(err) else ""
        raise CorruptFileError(path, f"{type(err).__name__}: {first}", fix) from None


# ---------------------------------------------------------------------------------------------------- run lock
RUN_LOCK = "run.lock"  # {"pid", "host", "started", "command"} of the run that owns an output folder


class RunLockedError(ValueError):
    """Another live run owns the output folder (its lock names it)."""


def _host() -> str:
    import socket

    return socket.gethostname()


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, Linux /proc), None when unknown: tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holder_alive(holder: dict) -> bool:
    """The lock's process still runs on this host (not a later process that got the same pid)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    started, since = _process_started(pid), holder.get("started_unix")
    return started is None or not isinstance(since, int | float) or started <= since + 2.0


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


_held: dict[Path, int] = {}  # locks this process holds: path -> depth (run_lock is re-entrant)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str = "") -> Iterator[dict | None]:
    """Own ``folder`` for one run: ``<folder>/run.lock`` names this process (pid, host, start time, command).

    A second run on the same folder raises `RunLockedError` naming the first; a lock left by a dead process on
    this host is taken over with a logged warning (yields the stale holder's record then, else None). A lock of another
    host is never taken over (its process cannot be checked from here). Re-entrant within one process.
    The lock file is linked into place whole (``os.link``), so a reader never sees half of it.
    """
    import datetime
    import logging

    folder = Path(folder).resolve()
    created = not folder.exists()  # removed again at the end when the run left nothing in it
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK
    if path in _held:
        _held[path] += 1
        try:
            yield None
        finally:
            _held[path] -= 1
        return
    now = time.time()
    mine = {"pid": os.getpid(), "host": _host(), "command": command, "started_unix": now,
            "started": datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
    tmp = temp_path(path)
    write_json(tmp, mine)
    stale = None
    try:
        for _ in range(5):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            try:
                holder = json.loads(path.read_text())
                if not isinstance(holder, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                continue  # released (or taken over) just now: try again
            except ValueError:
                holder = {}
            if holder and (holder.get("host") != mine["host"] or _holder_alive(holder)):
                where = "" if holder.get("host") == mine["host"] else \
                    " (another host: whether it still runs cannot be checked from here)"
                raise RunLockedError(f"{folder}: another run uses this output folder: {describe_holder(holder)}"
                                     f"{where}. Wait for it to end or use another --out; if that run is gone, "
                                     f"delete {path}")
            trash = temp_path(path, "old")
            try:
                os.rename(path, trash)  # one taker wins; the others find the name gone and try again
            except FileNotFoundError:
                continue
            trash.unlink(missing_ok=True)
            stale = holder
            message = (f"{folder}: took over the lock of a run that is no longer running "
                       f"({describe_holder(holder) if holder else 'unreadable lock file'})")
            logging.getLogger(__name__).warning(message)
        else:
            raise RunLockedError(f"{folder}: could not take {path} (other runs keep taking it); try again")
    finally:
        tmp.unlink(missing_ok=True)
    _held[path] = 1
    try:
        yield stale
    finally:
        del _held[path]
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
