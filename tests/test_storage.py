"""Object storage through `retain_asd.storage`, against a real S3-compatible server (moto's server mode) started
on 127.0.0.1 by the test: no mocks inside this process, the bytes go over HTTP into the server's bucket. Ray Train
checkpoints in the bucket, a kill and the resume from them are in tests/test_storage_e2e.py."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from retain_asd import storage

BUCKET = "retain-asd-test"  # created by the `s3_server` fixture (tests/conftest.py)


def _bucket_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_local_paths_stay_local_and_bad_uris_are_named(tmp_path, monkeypatch):
    fs, path = storage.resolve(tmp_path / "runs")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str((tmp_path / "runs").resolve())
    assert storage.ray_storage(tmp_path / "runs") == {"storage_path": str((tmp_path / "runs").resolve())}
    assert storage.join("s3://b/runs/", "x", "/y") == "s3://b/runs/x/y"
    assert storage.join(tmp_path, "x") == str(tmp_path / "x")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.resolve("s3:///runs")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        storage.resolve("nosuch://bucket/x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-key")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError, match="must be set together"):
        storage.resolve("s3://b/x")


def test_parquet_written_to_and_read_from_the_bucket(s3_env):
    fs, path = storage.resolve(f"s3://{BUCKET}/corpus/machine")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/corpus/machine"
    audio = np.random.default_rng(0).standard_normal((3, 160)).astype(np.float32)
    table = pa.table({"clip_id": ["a", "b", "c"],
                      "audio": pa.FixedSizeListArray.from_arrays(pa.array(audio.reshape(-1)), 160)})
    pq.write_table(table, f"{path}/shard-00000.parquet", filesystem=fs)
    assert _bucket_keys(s3_env, "corpus/") == ["corpus/machine/shard-00000.parquet"]
    back = pq.read_table(f"{path}/shard-00000.parquet", filesystem=fs)
    assert back.column("clip_id").to_pylist() == ["a", "b", "c"]
    np.testing.assert_array_equal(np.stack(back.column("audio").to_numpy(zero_copy_only=False)), audio)


def test_file_helpers_on_the_bucket_and_the_config_field(s3_env, tmp_path):
    from retain_asd.config import ConfigError, load_config

    base = f"s3://{BUCKET}/helpers"
    storage.write_json(storage.join(base, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(base, "a", "y.bin"), b"12345")
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"k": 1}
    assert storage.is_file(storage.join(base, "a", "x.json")) and not storage.is_file(storage.join(base, "a"))
    assert storage.list_names(storage.join(base, "a")) == ["x.json", "y.bin"]
    assert storage.file_sizes(base) == {"a/x.json": 9, "a/y.bin": 5}
    (tmp_path / "local.bin").write_bytes(b"abc")
    storage.upload(tmp_path / "local.bin", storage.join(base, "b.bin"))
    assert storage.download(storage.join(base, "b.bin"), tmp_path / "back.bin").read_bytes() == b"abc"
    storage.remove(storage.join(base, "a", "x.json"))
    assert storage.list_names(storage.join(base, "a")) == ["y.bin"]
    storage.remove(storage.join(base, "a"))
    objects = [k for k in _bucket_keys(s3_env, "helpers/") if not k.endswith("/")]  # pyarrow keeps "dir/" markers
    assert not storage.exists(storage.join(base, "a")) and objects == ["helpers/b.bin"]
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(storage.join(base, "missing.json"))
    assert load_config("smoke", overrides=[f"data.storage={base}"]).data.storage == base
    for bad, why in (("s3:///x", "needs a bucket"), ("runs/data", "not a URI"), ("ftp://host/x", "unsupported")):
        with pytest.raises(ConfigError, match=f"data.storage: .*{why}"):
            load_config("smoke", overrides=[f"data.storage={bad}"])


def test_embedding_cache_in_the_bucket_is_bit_exact_and_drops_a_torn_chunk(s3_env, caplog):
    from retain_asd.eval.embed import EmbeddingCache

    root, checkpoint = f"s3://{BUCKET}/cache/embeddings", "0" * 40
    emb = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    cache = EmbeddingCache(root, checkpoint, "genrep")
    assert cache.missing(["a", "b", "c"], [2]) == ["a", "b", "c"]
    cache.put(["a", "b", "c"], 2, emb)
    (chunk,) = [k for k in _bucket_keys(s3_env, "cache/") if k.endswith(".npz")]  # one object per chunk
    assert chunk.startswith(f"cache/embeddings/{'0' * 20}/genrep/layer_2/")

    fresh = EmbeddingCache(root, checkpoint, "genrep")  # a new process: the index comes from the bucket
    assert fresh.missing(["a", "b", "c"], [2]) == [] and fresh.missing(["c", "d"], [2, 3]) == ["c", "d"]
    np.testing.assert_array_equal(fresh.get(["c", "a"], 2), emb[[2, 0]])  # bit-exact float32

    torn = storage.join(root, "0" * 20, "genrep", "layer_2", "torn0000.npz")
    storage.write_bytes(torn, b"PK\x03\x04 torn chunk")
    with caplog.at_level(logging.WARNING, logger="retain_asd.eval.embed"):
        again = EmbeddingCache(root, checkpoint, "genrep")
        assert again.missing(["a", "d"], [2]) == ["d"]
    assert f"{torn}: cannot be read" in caplog.text and "computed again" in caplog.text
    assert not storage.exists(torn)  # dropped: its rows would be encoded and put again
    np.testing.assert_array_equal(again.get(["a", "b", "c"], 2), emb)


def test_the_s3_retry_policy_survives_pickling_to_workers(monkeypatch):
    """pyarrow drops `retry_strategy` when it pickles an S3FileSystem; Ray's workers must get the same attempts."""
    import pickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    fs = storage.s3_filesystem()
    again = pickle.loads(pickle.dumps(fs))
    assert isinstance(again, storage.RetryingS3FileSystem) and again._arguments == fs._arguments
    assert again._arguments[0] == 7 and again._arguments[1]["endpoint_override"] == "127.0.0.1:9"
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert storage.s3_filesystem()._arguments[0] == storage.S3_MAX_ATTEMPTS == 10
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS = '0': must be a whole number >= 1"):
        storage.s3_filesystem()


def test_retrying_reads_again_after_an_error_the_sdk_does_not_retry_but_never_a_missing_object(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream")
        return b"data"

    assert storage.retrying(flaky, "s3://b/k") == b"data" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(FileNotFoundError):
        storage.retrying(missing, "s3://b/k")
    assert len(calls) == 4  # not retried
