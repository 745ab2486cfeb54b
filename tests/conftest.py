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


@pytest.fixture(scope="session", autouse=True)
def python_temp_files_in_the_session_folder(tmp_path_factory):
    """Python's temporary files of this process (MLflow's sqlite init locks, torch.compile's cache, the folders of
    multiprocessing) go under the session's temp folder, not /tmp: tests write only there, and each session
    compiles from nothing. Ray keeps its own folder (/tmp/ray; a session removes its session folder)."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield Path(tempfile.tempdir)
    tempfile.tempdir = before


@pytest.fixture(scope="session", autouse=True)
def migrated_mlflow_schema(tmp_path_factory):
    """A new sqlite MLflow store runs MLflow's whole chain of schema migrations (seconds each time, and the tests
    make dozens of stores). Here the chain runs once, into an empty template database, and each new empty sqlite
    store of this process gets the template's bytes (sqlite's backup API) instead: the same tables and schema
    version MLflow's own migrations give. Stores with any table, other databases and child processes: unchanged."""
    import sqlite3
    import threading

    import mlflow.store.db.utils as db_utils

    migrate = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow_schema") / "migrated.db"
    lock = threading.Lock()

    def initialize_tables(engine):
        target = engine.url.database
        if engine.url.get_backend_name() != "sqlite" or not target or target == ":memory:" or \
                not db_utils._is_empty_database(engine):
            return migrate(engine)
        with lock:
            if not template.exists():
                import sqlalchemy

                scratch = template.with_suffix(".tmp")
                template_engine = sqlalchemy.create_engine(f"sqlite:///{scratch}")
                migrate(template_engine)
                template_engine.dispose()
                scratch.rename(template)
            src, dst = sqlite3.connect(template), sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_utils, "_initialize_tables", initialize_tables)
        yield template


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


# The longest modules, longest first (seconds on 2 busy cores: 340, 145, 135, 95, 70, 60, 55, 40). `make test` runs
# the suite on two pytest-xdist workers, a module at a time each. xdist hands the modules out by their number of
# tests, most first (its default, --loadscope-reorder); this order breaks its ties. Handing them out in this order
# instead (--no-loadscope-reorder) was measured and gained nothing: 815 s against 803 s, the long Ray modules then
# ran side by side and slowed each other (1587 s of test time against 1430 s).
LONG_MODULES = ("train/test_recovery.py", "tune/test_sweep.py", "test_multinode.py", "test_storage_e2e.py",
                "test_cluster.py", "train/test_launch.py", "train/test_student.py", "corpus/test_two_corpora.py")


def _module_rank(item) -> int:
    path = Path(str(item.fspath)).as_posix()
    return next((i for i, name in enumerate(LONG_MODULES) if path.endswith("/tests/" + name)), len(LONG_MODULES))


def pytest_collection_modifyitems(items):
    """The long modules first (`LONG_MODULES`; the order inside a module kept), and a test marked
    ``reliability("case")`` records its case in the JUnit XML (tests/reliability_table.py)."""
    items.sort(key=_module_rank)  # stable
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


class FlakyProxy:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of `upstream` (the S3 server): in a fault window (the
    next n requests, `faults(n, rate)`) it answers a share `rate` of them, drawn from a seeded generator, with 503
    SlowDown (S3's throttling error) or by resetting the connection (TCP RST after reading the request), half
    each; every other request goes through unchanged. `injected` counts the faults, `requests` everything."""

    SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
                b"request rate.</Message></Error>")

    def __init__(self, upstream: str, seed: int = 0):
        import http.server
        import random
        import threading
        from collections import Counter
        from urllib.parse import urlparse

        self.upstream = urlparse(upstream)
        self.random, self.lock = random.Random(seed), threading.Lock()
        self.rate, self.left = 0.0, 0
        self.injected, self.requests = Counter(), 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect

            def log_message(self, *args):
                pass

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                        if size == 0:
                            return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _any(self):
                import http.client
                import socket
                import struct

                body = self._body()
                fault = proxy._draw()
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(proxy.SLOWDOWN)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "expect", "content-length")}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def faults(self, requests: int, rate: float = 0.3) -> None:
        """Open a fault window over the next `requests` requests."""
        with self.lock:
            self.rate, self.left = rate, requests

    def _draw(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.left <= 0:
                return None
            self.left -= 1
            if self.random.random() >= self.rate:
                return None
            fault = self.random.choice(("slowdown", "reset"))
            self.injected[fault] += 1
            return fault

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3_env(s3_env, monkeypatch):
    """`s3_env` with the endpoint behind a `FlakyProxy` (no faults until the test opens a window); yields it."""
    proxy = FlakyProxy(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        yield proxy
    finally:
        proxy.close()


# ---------------------------------------------------------------------------------------------------- DCASE trees
def _excerpts(path: Path, clip_s: float) -> list:
    """Consecutive `clip_s` excerpts of a real recording (16 kHz)."""
    import soundfile as sf

    x, rate = sf.read(path, dtype="float32")
    n = int(clip_s * rate)
    return [x[i:i + n] for i in range(0, len(x) - n + 1, n)]


def write_dcase_tree(root: Path, year: int, *, clip_s: float = 1.0, machines: tuple[str, ...] | None = None,
                     eval_machines: tuple[str, ...] = ()) -> dict[str, Path]:
    """A DCASE `year` tree (2023, 2025 or 2026 layout) from the real DCASE 2020 clips of ../shared/data, renamed
    into that year's convention: per machine 6 source + 2 target train normals, and per domain 2 normal + 1
    anomalous test clips, each a `clip_s` excerpt of a real recording (attributes invented for the test).

    2025 adds a `supplemental/` clip. 2026 files are stereo, made from pairs of clips: channel 0 (near mic) the
    machine excerpt, channel 1 (far mic) 0.3 x that excerpt + a real noise excerpt (Speech Commands). Eval
    machines (`eval_machines`, under eval_data/raw/) get the additional training set in train/ and anonymised
    tests `section_00_NNNN.wav`, with the evaluator's ground truth (2023+ layout: ground_truth_data/,
    ground_truth_domain/, ground_truth_attributes/) under <root>/ground_truth. Returns {"root", "ground_truth"}.
    """
    import numpy as np
    import soundfile as sf

    machine_dir = SHARED_DATA / "machine"
    normals = [e for p in sorted((machine_dir / "dcase2020t2_dev_id00" / "train").glob("*.wav"))[:4]
               for e in _excerpts(p, clip_s)]
    anomalies = (_excerpts(machine_dir / "dcase2020t2_dev_id00" / "test" / "anomaly_id_00_00000000.wav", clip_s)
                 + _excerpts(machine_dir / "dcase2020t2_dev_id01_toycar" / "anomaly_id_01_00000000.wav", clip_s))
    noise = _excerpts(SHARED_DATA / "noise" / "running_tap.wav", clip_s)
    machines = machines or {2023: ("fan", "ToyCar"), 2025: ("fan", "bearing"), 2026: ("ToyCarEmu", "fan")}[year]
    attrs = {"fan": "m-n_W", "ToyCar": "car_A1_spd_28V_mic_1", "bearing": "noAttribute", "ToyCarEmu": "noAttribute",
             "ToyDrone": "noAttribute"}
    counter = iter(range(10_000))

    def audio(clip, k: int):
        if year != 2026:
            return clip
        far = 0.3 * clip + 0.5 * noise[k % len(noise)] / max(1e-6, float(np.abs(noise[k % len(noise)]).max()))
        stereo = np.stack([clip, far], axis=1)
        return stereo / max(1.0, float(np.abs(stereo).max()))

    truth: dict[str, list[tuple[str, int, int, str]]] = {}
    for i, machine in enumerate((*machines, *eval_machines)):
        evaluation = machine in eval_machines
        base = root / ("eval_data" if evaluation else "dev_data") / "raw" / machine
        (base / "train").mkdir(parents=True, exist_ok=True)
        (base / "test").mkdir(parents=True, exist_ok=True)
        attr = attrs.get(machine, "noAttribute")
        rows = []
        for j, domain in enumerate(["source"] * 6 + ["target"] * 2):
            k = next(counter)
            sf.write(base / "train" / f"section_00_{domain}_train_normal_{j:04d}_{attr}.wav",
                     audio(normals[k % len(normals)], k), 16000)
        tests = [(d, label) for d in ("source", "target") for label in ("normal", "normal", "anomaly")]
        for j, (domain, label) in enumerate(tests):
            k = next(counter)
            clip = anomalies[(2 * i + j) % len(anomalies)] if label == "anomaly" else normals[k % len(normals)]
            full = f"section_00_{domain}_test_{label}_{j:04d}_{attr}.wav"
            name = f"section_00_{j:04d}.wav" if evaluation else full
            sf.write(base / "test" / name, audio(clip, k), 16000)
            rows.append((name, int(label == "anomaly"), int(domain == "target"), full))
        truth[machine] = rows
        if year == 2025 and not evaluation:
            (base / "supplemental").mkdir(exist_ok=True)
            sf.write(base / "supplemental" / f"section_00_source_supplemental_normal_0000_{attr}.wav",
                     audio(normals[0], 0), 16000)
    gt = root / "ground_truth"
    for machine in eval_machines:
        name = f"ground_truth_{machine}_section_00_test.csv"
        for sub, column in (("ground_truth_data", 1), ("ground_truth_domain", 2)):
            (gt / sub).mkdir(parents=True, exist_ok=True)
            (gt / sub / name).write_text("".join(f"{r[0]},{r[column]}\n" for r in truth[machine]))
        (gt / "ground_truth_attributes").mkdir(parents=True, exist_ok=True)
        (gt / "ground_truth_attributes" / name).write_text(
            "".join(f"{r[0]},{r[3].removesuffix('.wav')}\n" for r in truth[machine]))
    return {"root": root, "ground_truth": gt}


@pytest.fixture(scope="session")
def dcase_tree(shared_data):
    """`write_dcase_tree` (skips without ../shared/data)."""
    return write_dcase_tree
