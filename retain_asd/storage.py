"""Where durable output goes: a local path or an object-store URI (``s3://bucket/prefix``), one resolver.

    fs, path = resolve("s3://bucket/corpus/machine")     # pyarrow S3FileSystem, "bucket/corpus/machine"
    fs, path = resolve("runs/data")                      # pyarrow LocalFileSystem, absolute path
    RunConfig(name=..., **ray_storage("s3://bucket/runs"))  # Ray Train / Tune storage_path + filesystem

Everything goes through pyarrow's filesystem layer (what Ray Train, Ray Data and Parquet use). The endpoint,
region and credentials come from the standard AWS environment variables, never from the config file:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO or moto),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``. Without keys in the environment the AWS SDK's own chain applies on each node
(profile, instance role), which is what a cloud cluster uses.

Local paths stay the default; other schemes pyarrow knows (``gs://``, ``hdfs://``, ``file://``) go to
``pyarrow.fs.FileSystem.from_uri``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (object stores, ``file://``); False for a plain local path."""
    return "://" in str(location)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem configured from the AWS_* environment variables only (see the module docstring).

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
    return pafs.S3FileSystem(**kwargs)


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


def ray_storage(location: str | os.PathLike) -> dict:
    """``storage_path`` / ``storage_filesystem`` kwargs for Ray Train's and Tune's RunConfig.

    A local path stays a plain absolute path (Ray's own local handling); a URI gets the resolved filesystem,
    so Ray uses the endpoint and keys of this process's environment on every node.
    """
    if not is_uri(location):
        return {"storage_path": str(Path(location).expanduser().resolve())}
    fs, path = resolve(location)
    return {"storage_path": path, "storage_filesystem": fs}
