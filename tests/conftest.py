"""Shared fixtures: one local Ray for the whole session, paths to the real audio in ../shared/data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from retain_asd.runtime import apply_env_defaults

apply_env_defaults()
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real DCASE clips, real noise, real evaluator CSVs); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not found (expected beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster, started once per test session (about 3 s) and shared by every test."""
    from retain_asd.runtime import finish_local_ray, init_ray, set_data_progress

    ray = init_ray(num_cpus=2, quiet=True)
    set_data_progress(False)
    yield ray
    finish_local_ray(ok=True)  # stops it, kills a worker that outlived it, removes its session folder
    ray.shutdown()  # a no-op unless a test started another Ray in between


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, ray_local) -> Path:
    """A small ingested synthetic corpus shared by the eval tests: ``<root>/synth`` (DCASE tree + noise) and
    ``<root>/corpus`` (shards). 2 machines x (12 + 4 train, 16 test) clips of 2 s; 2 x 2 noises of 20 s."""
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings
    from retain_asd.corpus.synth import write_synthetic_corpus

    root = tmp_path_factory.mktemp("small_corpus")
    s = write_synthetic_corpus(root / "synth", machines=("fan", "pump"), train_source_per_attr=2,
                               train_target_per_attr=2, test_per_domain=4, clip_s=2.0,
                               noise_clips_per_category=2, noise_clip_s=20.0)
    ingest(s.machine_root, s.noise_root, root / "corpus", settings=DecodeSettings(clip_s=2.0))
    return root


@pytest.fixture(scope="session")
def small_worlds(tmp_path_factory) -> list[str]:
    """The two synthetic worlds of the paper's protocol, small (10 s clips): the pre-training world (fan; noise
    pink_hum, bursts) and the evaluation world (bearing; stationary hvac for Factory A, non-stationary
    hammering for Factory B). Returns the config overrides that point data.* and eval.* at them."""
    from retain_asd.corpus.synth import write_eval_world, write_pretrain_world

    root = tmp_path_factory.mktemp("small_worlds")
    pre = write_pretrain_world(root / "pretrain", machines=("fan",), noise_categories=("pink_hum", "bursts"),
                               train_source_per_attr=2, train_target_per_attr=2, test_per_domain=2,
                               noise_clips_per_category=2, noise_clip_s=20.0)
    ev = write_eval_world(root / "eval", machines=("bearing",), noise_categories=("hvac", "hammering"),
                          train_source_per_attr=2, train_target_per_attr=2, test_per_domain=4,
                          noise_clips_per_category=2, noise_clip_s=60.0)
    return [f"data.machine_root={pre.machine_root}", f"data.noise_root={pre.noise_root}",
            f"eval.machine_root={ev.machine_root}", f"eval.noise_root={ev.noise_root}"]


@pytest.fixture(scope="session")
def small_pretrain_root(tmp_path_factory) -> list[str]:
    """A tiny pre-training corpus disjoint from `small_corpus` (gearbox, other noise recordings), 2 s clips:
    the overrides data.machine_root / data.noise_root that pass the leakage guard against it."""
    from retain_asd.corpus.synth import write_synthetic_corpus

    s = write_synthetic_corpus(tmp_path_factory.mktemp("small_pretrain") / "synth", seed=1, machines=("gearbox",),
                               train_source_per_attr=1, train_target_per_attr=1, test_per_domain=1, clip_s=2.0,
                               noise_categories=("brown_fan",), noise_clips_per_category=1, noise_clip_s=4.0)
    return [f"data.machine_root={s.machine_root}", f"data.noise_root={s.noise_root}"]


def pytest_collection_modifyitems(items):
    """A test marked ``reliability("case")`` records its case in the JUnit XML (tests/reliability_table.py)."""
    for item in items:
        for marker in item.iter_markers("reliability"):
            item.user_properties.append(("reliability_case", marker.args[0]))


@pytest.fixture
def reliability_figures(request):
    """``reliability_figures(steps_lost=0, retries=3, wall_added_s=1.2, bytes_lost=0, case=None)``: the measured
    cost of a fault, recorded in the JUnit XML for its row of docs/reliability.md (`case`: needed only when the
    test shows several cases)."""
    import json

    def record(case: str | None = None, **figures: float) -> None:
        cases = [m.args[0] for m in request.node.iter_markers("reliability")]
        if case is None:
            assert len(cases) == 1, f"name the case, one of {cases}"
            case = cases[0]
        assert case in cases, f"{case!r} is not a reliability case of this test ({cases})"
        request.node.user_properties.append(("reliability_figures", json.dumps({"case": case, **figures})))

    return record


# ---------------------------------------------------------------------------------------------------- object storage
S3_BUCKET = "retain-asd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's server mode, from this venv) on 127.0.0.1 with one bucket,
    `S3_BUCKET`; yields its endpoint URL. No mocks inside the test process: the bytes go over HTTP."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.3)
        _s3_client(endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS_* variables pointing at the local server (what a user exports for MinIO or moto)."""
    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    return s3_server


@pytest.fixture
def bucket_keys(s3_server):
    """``bucket_keys(prefix)``: the sorted object keys under a prefix of `S3_BUCKET`, listed with boto3."""
    def keys(prefix: str) -> list[str]:
        pages = _s3_client(s3_server).get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    return keys
