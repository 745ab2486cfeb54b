"""Where durable output goes: a local path or an object-store URI (``s3://bucket/prefix``), one resolver.

    fs, path = resolve("s3://bucket/corpus/machine")     # pyarrow S3FileSystem, "bucket/corpus/machine"
    fs, path = resolve("runs/data")                      # pyarrow LocalFileSystem, absolute path
    RunConfig(name=..., **ray_storage("s3://bucket/runs"))  # Ray Train / Tune storage_path + filesystem

Everything goes through pyarrow's filesystem layer (what Ray Train, Ray Data and Parquet use). The endpoint,
region and credentials come from the standard AWS environment variables, never from the config file:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO or moto),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``; ``AWS_MAX_ATTEMPTS``: attempts per request (default 10, with the SDK's backoff), for
pyarrow here and for boto3 (MLflow's artifact store; `retain_asd.runtime` sets ``AWS_RETRY_MODE=standard``
and this default). Without keys in the environment the AWS SDK's own chain applies on each node
(profile, instance role), which is what a cloud cluster uses.

Local paths stay the default; other schemes pyarrow knows (``gs://``, ``hdfs://``, ``file://``) go to
``pyarrow.fs.FileSystem.from_uri``.

The small file helpers below (``exists``, ``read_json``, ``write_bytes``, ``upload``, ...) take either: a local
path goes through ``fsio`` exactly as before (temp file + rename), a URI through pyarrow. An object store has
no rename, but a PUT is atomic per object (a reader sees the old object or the new one, never half), so a
writer of several objects writes its completion marker (a manifest, ``complete.json``) last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from retain_asd import fsio

log = logging.getLogger(__name__)

S3_SCHEMES = ("s3", "s3a")
OTHER_SCHEMES = ("gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # pyarrow's own (not tested here)


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (object stores, ``file://``); False for a plain local path."""
    return "://" in str(location)


def check_uri(uri: str) -> None:
    """ValueError naming `uri` unless it is ``scheme://bucket[/prefix]`` of a store pyarrow can open."""
    parsed = urlparse(uri)
    if not is_uri(uri) or not parsed.scheme:
        raise ValueError(f"{uri!r} is not a URI; expected s3://bucket/prefix (or '' for local storage)")
    if parsed.scheme in S3_SCHEMES:
        if not parsed.netloc:
            raise ValueError(f"{uri}: an S3 URI needs a bucket, e.g. s3://my-bucket/retain-asd")
        return
    if parsed.scheme not in OTHER_SCHEMES:
        raise ValueError(f"{uri}: unsupported scheme {parsed.scheme!r}; expected one of "
                         f"{list(S3_SCHEMES + OTHER_SCHEMES)}")


def as_location(location: str | os.PathLike) -> str | Path:
    """A URI stays a string (``Path`` would fold ``s3://`` into ``s3:/``); a local path becomes a Path."""
    return str(location) if is_uri(location) else Path(location)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


S3_MAX_ATTEMPTS = 10  # attempts per request (AWS_MAX_ATTEMPTS overrides): a bucket answering errors for a while


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the AWS SDK's standard retry policy at `max_attempts` attempts per request
    (503 SlowDown, throttling, 5xx, connection resets and timeouts are retried with a jittered backoff that
    doubles, each wait capped at 20 s by the SDK, so a request gives up after a bounded time), kept when the
    filesystem is pickled to Ray's workers: pyarrow's own pickling drops `retry_strategy` (they would get its
    default of 3 attempts)."""

    def __init__(self, max_attempts: int = S3_MAX_ATTEMPTS, **kwargs):
        self._arguments = (max_attempts, kwargs)
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)

    def __reduce__(self):
        return _rebuild_s3, self._arguments


def _rebuild_s3(max_attempts: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **kwargs)


def s3_max_attempts() -> int:
    """Attempts per S3 request: AWS_MAX_ATTEMPTS (the AWS SDKs' own variable; boto3 reads it too), else 10."""
    text = _env("AWS_MAX_ATTEMPTS")
    try:
        value = int(text) if text else S3_MAX_ATTEMPTS
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS = {text!r}: must be a whole number >= 1 (attempts per S3 request)")
    return value


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem configured from the AWS_* environment variables only (see the module docstring), retrying
    each request up to `s3_max_attempts` times (`RetryingS3FileSystem`).

    Keys found in the environment are passed explicitly, so the filesystem keeps them when Ray pickles it to
    workers whose environment lacks them; without keys each process uses the SDK's default chain.
    """
    kwargs: dict = {}
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=_env("AWS_SESSION_TOKEN"))
    elif key or secret:
        raise ValueError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither, to use "
                         "the AWS SDK's default chain: profile, instance role)")
    return RetryingS3FileSystem(s3_max_attempts(), **kwargs)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; ``s3://b/k`` -> (S3FileSystem, "b/k")."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    parsed = urlparse(text)
    if parsed.scheme in S3_SCHEMES:
        if not parsed.netloc:
            raise ValueError(f"{text}: an S3 URI needs a bucket, e.g. s3://my-bucket/runs")
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except ValueError as err:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{text}: unsupported storage URI ({err}); use a local path or s3://bucket/prefix") \
            from None


def join(location: str | os.PathLike, *parts: str) -> str:
    """Append path parts to a local path or a URI (``join("s3://b/runs", "x")`` = ``"s3://b/runs/x"``)."""
    text = str(location)
    if is_uri(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(text, *parts))


def to_location(path: str, like: str | os.PathLike) -> str:
    """A path inside the filesystem of URI `like` (``bucket/key``, what Ray Train reports) as a URI of the same
    scheme; with a local `like`, the path as it is."""
    if not is_uri(like):
        return path
    return f"{urlparse(str(like)).scheme}://{path.lstrip('/')}"


def ray_storage(location: str | os.PathLike) -> dict:
    """``storage_path`` / ``storage_filesystem`` kwargs for Ray Train's and Tune's RunConfig.

    A local path stays a plain absolute path (Ray's own local handling); a URI gets the resolved filesystem,
    so Ray uses the endpoint and keys of this process's environment on every node.
    """
    if not is_uri(location):
        return {"storage_path": str(Path(location).expanduser().resolve())}
    fs, path = resolve(location)
    return {"storage_path": path, "storage_filesystem": fs}


# ---------------------------------------------------------------------------------------------------- files
RETRY_WAIT_S = 60.0  # the most a whole-object read or write waits out a bucket's errors before it fails


def retrying(call, what: str):
    """`call()`, again after an error the SDK does not retry itself (a connection reset while a response body is
    read: "Failed to flush response stream"), with a backoff doubling 0.2 -> 5 s, for at most `RETRY_WAIT_S`
    seconds; a missing object is no error to retry. The whole object is read or written again."""
    delay, deadline = 0.2, time.monotonic() + RETRY_WAIT_S
    while True:
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.1f s", what, " ".join(str(err).split())[:200], delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    return _info(location).type == pafs.FileType.File


def list_names(location: str | os.PathLike) -> list[str]:
    """The sorted names directly inside a folder (or prefix); [] when there is none."""
    if not is_uri(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def file_sizes(location: str | os.PathLike) -> dict[str, int]:
    """{relative path: bytes} of every file below a folder (or prefix)."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {info.path[len(path):].lstrip("/"): info.size for info in infos if info.type == pafs.FileType.File}


def remove(location: str | os.PathLike) -> None:
    """Delete a file or a folder (prefix) and everything below it; nothing when it does not exist."""
    if not is_uri(location):
        path = Path(location)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = resolve(location)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return retrying(read, str(location))
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such object") from None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Atomically: a local file through ``fsio`` (temp + rename); an object in one PUT."""
    if not is_uri(location):
        fsio.write_bytes(location, data)
        return
    fs, path = resolve(location)

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retrying(write, str(location))


def read_json(location: str | os.PathLike, fix: str | None = None) -> Any:
    """JSON this system wrote (``fsio.read_json`` for a local path); an unparsable object names its URI."""
    if not is_uri(location):
        return fsio.read_json(location, fix)
    try:
        return json.loads(read_bytes(location).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fsio.CorruptFileError(location, f"invalid JSON ({err})", fix) from None


def write_json(location: str | os.PathLike, value: Any, indent: int | None = None) -> None:
    write_bytes(location, (json.dumps(value, indent=indent) + "\n").encode())


def upload(local_path: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a local file to `location` (an object: one atomic PUT; a local path: temp file + rename)."""
    if not is_uri(location):
        with open(local_path, "rb") as src, fsio.atomic_write(location, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    fs, path = resolve(location)

    def put() -> None:
        with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    retrying(put, str(location))


def download(location: str | os.PathLike, local_path: str | os.PathLike) -> Path:
    """Copy `location` to a local file, atomically (a killed download leaves only a hidden temp file)."""
    fs, path = resolve(location)

    def get() -> None:
        with fs.open_input_stream(path) as src, fsio.atomic_write(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    try:
        retrying(get, str(location))
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such object") from None
    return Path(local_path)
