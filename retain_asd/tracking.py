"""MLflow in one place: the only module that imports mlflow (tracking URI rules, experiments with an explicit
artifact location, runs (nested too), params, tags, metrics, artifacts).

Local default: an SQLite store at an *absolute* path (Ray Tune trials change directory, and a relative URI
would give each trial its own database). On a cluster: an ``mlflow server`` URI (``http://host:port``).
Artifacts of an SQLite store go beside its database (``<db folder>/mlartifacts/<experiment>``), never into
the working folder (MLflow's default ``./mlruns``). With ``data.storage`` set (``s3://bucket/prefix``) a new
experiment keeps its artifacts in the bucket, ``<storage>/mlartifacts/<experiment>``, through MLflow's own S3
artifact store (boto3), which reads the same AWS_* variables as `retain_asd.storage`: AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL (an S3-compatible server; MLflow's own MLFLOW_S3_ENDPOINT_URL wins when set), AWS_REGION,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. The run records themselves stay in the tracking store (the local
SQLite file, or a server). An experiment keeps the artifact location it was created with.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from retain_asd import fsio
from retain_asd.runtime import apply_env_defaults

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str, work_dir: str | os.PathLike, create: bool = True) -> str:
    """'' -> ``sqlite:///<abs work_dir>/mlflow.db`` (its folder made unless not `create`); a plain path to a
    ``.db`` file (``runs/demo/data/mlflow.db``) means that SQLite store; a relative sqlite path is made absolute;
    else as given."""
    if not uri:
        path = Path(work_dir).resolve() / "mlflow.db"
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri and Path(uri).suffix in SQLITE_SUFFIXES:
        return f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
STORE_FORMS = "PATH/mlflow.db, sqlite:///PATH/mlflow.db or http://HOST:PORT (an `mlflow server`)"


def require_store(uri: str) -> str:
    """For commands that only read: `uri` names a tracking store that exists, else a ValueError naming the
    accepted forms. Nothing is created (MLflow would make an empty SQLite file for a mistyped path)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ValueError(f"{path}: no MLflow store there (no run has logged to it); pass --tracking-uri with "
                             f"the mlflow.db of your runs, e.g. runs/demo/data/mlflow.db ({STORE_FORMS})")
        return uri
    if scheme in STORE_SCHEMES:
        return uri
    if not scheme or scheme == "file":
        raise ValueError(f"--tracking-uri {uri}: not an MLflow store this version serves (a folder is MLflow's old "
                         f"file store); give {STORE_FORMS}")
    raise ValueError(f"--tracking-uri {uri}: unknown store scheme {scheme!r}; give {STORE_FORMS}")


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists become strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def artifact_location(uri: str, experiment: str, storage: str = "") -> str | None:
    """Where an experiment of store `uri` keeps its artifacts: ``<storage>/mlartifacts/<experiment>`` when
    `storage` (data.storage) is a URI; else beside an SQLite database; None (the server's choice) for a
    server URI."""
    if storage:
        return f"{storage.rstrip('/')}/mlartifacts/{experiment}"
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


# MLflow 3 opens an experiment without a kind on its GenAI traces page; this kind opens it on its runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(uri: str, experiment: str, storage: str = "") -> str:
    """Create the experiment when missing (Tune trials need it to exist), with an explicit artifact location
    (`artifact_location`) and `EXPERIMENT_TAGS`; returns its id. An existing experiment gets the tags it lacks;
    one whose artifacts live elsewhere than `storage` asks for a warning: its runs keep logging artifacts there."""
    apply_env_defaults()
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found:
        for key, value in EXPERIMENT_TAGS.items():
            if found.tags.get(key) != value:
                mlflow.MlflowClient(uri).set_experiment_tag(found.experiment_id, key, value)
        wanted = artifact_location(uri, experiment, storage)
        if storage and found.artifact_location != wanted:
            import warnings

            warnings.warn(f"MLflow experiment {experiment!r} keeps its artifacts in {found.artifact_location}, not "
                          f"in data.storage ({wanted}); use a new tracking.experiment to log them to the bucket",
                          stacklevel=2)
        return found.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=artifact_location(uri, experiment, storage),
                                    tags=EXPERIMENT_TAGS)


def runs_page(uri: str, experiment: str, base_url: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs table in `mlflow ui` (MLflow 3 opens an experiment in its GenAI
    workflow unless the address asks for the model-training one)."""
    import mlflow

    found = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found in {uri}")
    return f"{base_url.rstrip('/')}/#/experiments/{found.experiment_id}?workflowType=machine_learning"


@contextlib.contextmanager
def mlflow_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None, run_id: str | None = None,
               nested: bool = False, storage: str = "", parent_run_id: str | None = None) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run and make it active inside the block.

    ``nested``: a child of the run active around it (e.g. one evaluation inside a sweep trial's run).
    ``parent_run_id``: a child of that run instead (it need not be active in this process).
    ``storage``: data.storage, where a new experiment keeps its artifacts (`artifact_location`).
    """
    import mlflow

    ensure_experiment(uri, experiment, storage)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=dict(tags or {}),
                          nested=nested or parent_run_id is not None,
                          parent_run_id=None if run_id else parent_run_id) as run:
        if params:
            mlflow.log_params(flatten(params))
        try:
            yield run
        except BaseException:
            _end_run(uri, "FAILED")
            raise
        _end_run(uri, "FINISHED")


def _end_run(uri: str, status: str) -> None:
    """End the active run; a store that is down leaves it RUNNING there with a warning instead of failing the
    work that was done (the run is off this process's stack either way)."""
    import mlflow

    try:
        with quick_failures():
            mlflow.end_run(status)
    except Exception as err:
        log.warning("MLflow at %s: run not marked %s (%s)", uri, status, short_error(err))


def _clean(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k.replace("=", "_").replace(" ", "_"): float(v) for k, v in metrics.items()}


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log to the active run; MLflow metric keys may not contain '=' or spaces, so those are replaced."""
    import mlflow

    mlflow.log_metrics(_clean(metrics), step=step)


def log_metrics_to(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log to a run by id from any process (e.g. the Ray Train controller, as each report arrives), stamped now."""
    import time

    import mlflow
    from mlflow.entities import Metric

    apply_env_defaults()
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step or 0) for k, v in _clean(metrics).items()]
    mlflow.MlflowClient(uri).log_batch(run_id, metrics=batch, synchronous=True)


def active_run_id() -> str | None:
    """The id of the run active in this process (a sweep trial's run), else None."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def run_name(kind: str, preset: str, seed: Any) -> str:
    """The one naming rule: ``<kind>-<preset, row or trial>-seed<seed>`` (kind: point, pretrain, evaluate)."""
    return f"{kind}-{preset}-seed{seed}"


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (values become strings)."""
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifacts(directory: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Copy a folder's files into the active run's artifacts (location: `artifact_location`)."""
    import mlflow

    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


def delete_runs(uri: str, experiment: str, tags: Mapping[str, str]) -> int:
    """Delete the runs of `experiment` carrying all `tags` (e.g. a summary run about to be replaced); returns
    how many. A missing experiment has none."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        return 0
    where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=where, output_format="list")
    for run in runs:
        mlflow.delete_run(run.info.run_id)
    return len(runs)


def compare_runs(uri: str, experiment: str, metrics: list[str]) -> list[dict[str, Any]]:
    """Runs of an experiment side by side: name, objective and the requested metrics (for ablation tables)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    rows = []
    for _, r in frame.iterrows():
        row = {"run_name": r.get("tags.mlflow.runName"), "run_id": r["run_id"]}
        row.update({m: r.get(f"metrics.{m}") for m in metrics})
        rows.append(row)
    return rows


def experiment_runs(uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Every run of an experiment (``mlflow.search_runs``, optionally filtered with MLflow's filter syntax, e.g.
    ``"tags.preset LIKE 'tagging%'"``) as plain dicts: run_id, run_name, status, tags, params, metrics (the
    latest value of each). A missing store (`require_store`) or experiment is a ValueError naming what exists."""
    import math

    import mlflow

    mlflow.set_tracking_uri(require_store(uri))  # reading never creates a store
    if mlflow.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise ValueError(f"MLflow experiment {experiment!r} not found in {uri}; it has: "
                         f"{', '.join(names) or 'no experiments'} (pass --experiment NAME, and --tracking-uri or "
                         "the config whose data.work_dir holds the store)")
    try:
        frame = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string or "",
                                   output_format="pandas")
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"--runs {filter_string!r}: {err.message}") from None
    out = []
    for _, r in frame.iterrows():
        def section(prefix: str, row=r) -> dict[str, Any]:
            return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and v is not None
                    and not (isinstance(v, float) and math.isnan(v))}

        tags = section("tags.")
        out.append({"run_id": r["run_id"], "run_name": tags.get("mlflow.runName", ""), "status": r["status"],
                    "tags": tags, "params": section("params."),
                    "metrics": {k: float(v) for k, v in section("metrics.").items()}})
    return out


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Copy one file into the active run's artifacts."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


# ---------------------------------------------------------------------------------------------------- run pointers
RUN_POINTER = "mlflow_run.json"  # {"run_id", "tracking_uri", "experiment", ...}: the run an out folder logs to


def read_run_pointer(out_dir: str | os.PathLike, name: str = RUN_POINTER) -> dict:
    """The MLflow run of an out folder (``<out>/mlflow_run.json``; a pre-training's, read by evaluate), {} when it
    was not tracked."""
    path = Path(out_dir) / name
    if not path.is_file():
        return {}
    state = fsio.read_json(path, fix="delete it; the next run then logs to a new MLflow run")
    if not isinstance(state, dict):
        raise fsio.CorruptFileError(f"{path}: not a JSON object; delete it; the next run then logs to a new "
                                    "MLflow run")
    return state


def live_run_id(uri: str, run_id: str | None) -> str | None:
    """``run_id`` when that run exists and is not deleted in the store (so it can be resumed), else None."""
    if not run_id:
        return None
    import mlflow

    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of each metric of a run."""
    import mlflow

    return dict(mlflow.MlflowClient(uri).get_run(run_id).data.metrics)


def child_runs(uri: str, experiment: str, parent_run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The runs of `experiment` nested under `parent_run_id` (``kind``: only those tagged so), as `experiment_runs`."""
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and tags.kind = '{kind}'" if kind else "")
    return experiment_runs(uri, experiment, where)


def delete_run(uri: str, run_id: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).delete_run(run_id)



# ---------------------------------------------------------------------------------------------------- model registry
REGISTRY_PREFIX = "retain-asd-"  # registered models are named retain-asd-<tracking.experiment>
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")
MODEL_URI_FORMS = "models:/NAME/VERSION or models:/NAME@ALIAS"
CHECKPOINT_SHA = "checkpoint_sha256"  # a version's tag: the registered file's bytes, checked after each download


class RegisteredStudent(NamedTuple):
    """One version of a registered model: ``uri`` (``models:/<name>/<version>``) is what evaluate and score take."""

    name: str
    version: int
    source: str  # the student checkpoint among its run's artifacts
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_model_name(experiment: str) -> str:
    """The registered model of an experiment's students: ``retain-asd-<experiment>``."""
    return f"{REGISTRY_PREFIX}{experiment}"


def is_model_uri(spec: str | os.PathLike) -> bool:
    """True for a registry address (``models:/...``), whatever its form (`resolve_model_uri` checks it)."""
    return str(spec).startswith("models:/")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_student(uri: str, experiment: str, run_id: str, student: str | os.PathLike, *,
                     tags: Mapping[str, Any] | None = None, alias: str | None = None) -> RegisteredStudent:
    """A new version of the registered model ``retain-asd-<experiment>`` (created when missing) whose source is
    the student checkpoint among the artifacts of run `run_id` (pre-training logs it there as student_beats.pt;
    uploaded now when the run lacks it, e.g. the store was down at the end of the run). `tags` (values become
    strings; a sweep's: ``preset``, ``choices``, ``val/hmean_low``, ``trial_id``) go on the version, with
    `CHECKPOINT_SHA`; `alias` (e.g. ``best``) then points at it.

    MLflow 3 registers any artifact URI as a version's source (no MLmodel needed); its own ``models:/`` download
    finds no files under a single-file source, so `resolve_model_uri` downloads the source itself.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    apply_env_defaults()
    student = Path(student)
    if not student.is_file():
        raise FileNotFoundError(f"{student}: student checkpoint not found; register the student_beats.pt of a "
                                "finished `retain-asd pretrain`")
    client = mlflow.MlflowClient(uri)
    source = _logged_student(client, run_id, student)
    name = registered_model_name(experiment)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"students of the MLflow experiment {experiment!r}")
    version_tags = {k: str(v) for k, v in (tags or {}).items()} | {CHECKPOINT_SHA: file_sha256(student)}
    version = client.create_model_version(name, source, run_id=run_id, tags=version_tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredStudent(name, int(version.version), source, run_id)


def _logged_student(client, run_id: str, student: Path) -> str:
    """The artifact URI of `student` among run `run_id`'s top-level artifacts, uploaded first when it is not
    there (a file of the same name and size counts as logged: pre-training logs the student it exports)."""
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id)}
    if logged.get(student.name) != student.stat().st_size:
        client.log_artifact(run_id, str(student))
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{student.name}"


def resolve_model_uri(model_uri: str, uri: str, cache_dir: str | os.PathLike) -> Path:
    """The local student checkpoint of a registered version, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``,
    in store `uri` (tracking.tracking_uri; its registry).

    Downloaded into ``<cache_dir>/<NAME>/<VERSION>/`` with the config.yaml its run logged beside it and the run as
    its `RUN_POINTER` (so the evaluation names the trial and links its pre-training run); a cached copy whose bytes
    match the version's `CHECKPOINT_SHA` is reused. A malformed URI, a store that does not exist, an unknown
    model, version or alias are ValueErrors naming what exists; a source gone from the artifact store is a
    FileNotFoundError.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    apply_env_defaults()
    parsed = MODEL_URI.match(model_uri)
    if not parsed or (parsed["version"] and not parsed["version"].isdigit()):
        raise ValueError(f"{model_uri}: not a registered model version; give {MODEL_URI_FORMS}, e.g. "
                         f"models:/{REGISTRY_PREFIX}<experiment>/1 or models:/{REGISTRY_PREFIX}<experiment>@best")
    _require_registry(model_uri, uri)
    client = mlflow.MlflowClient(uri)
    name = parsed["name"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"{model_uri}: no registered model {name!r} in {uri}; it has: "
                         f"{', '.join(names) or 'none (a sweep registers its best student)'}") from None
    version = _model_version(client, model_uri, name, parsed["version"], parsed["alias"])
    source = client.get_model_version_download_uri(name, version.version)
    folder = Path(cache_dir).resolve() / name / str(version.version)
    target = folder / source.rstrip("/").rpartition("/")[2]
    wanted = version.tags.get(CHECKPOINT_SHA)
    if not (wanted and target.is_file() and file_sha256(target) == wanted):
        _download_version(model_uri, uri, version, source, folder)
    if wanted and file_sha256(target) != wanted:
        raise ValueError(f"{model_uri}: {source} has changed since it was registered (sha256 {wanted[:12]}...); "
                         "register the student again for a version of the current file")
    return target


def _require_registry(model_uri: str, uri: str) -> None:
    """A registry address needs a store that exists: an SQLite file that is missing is named with the settings
    that choose it (MLflow would create an empty one)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ValueError(f"{model_uri}: no MLflow store at {uri[len('sqlite:///'):]}; the model registry is the "
                         "tracking store: set tracking.tracking_uri=PATH/mlflow.db (or data.work_dir=DIR, the one of "
                         "the sweep that registered the model: its store is DIR/mlflow.db)")


def _model_version(client, model_uri: str, name: str, version: str | None, alias: str | None):
    """The ModelVersion a URI names; an unknown version or alias is a ValueError listing the existing ones."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException:
        model = client.get_registered_model(name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        aliases = ", ".join(f"@{a}" for a in sorted(model.aliases)) or "none"
        what = f"version {version}" if version else f"alias @{alias}"
        raise ValueError(f"{model_uri}: registered model {name!r} has no {what}; its versions: "
                         f"{', '.join(map(str, versions)) or 'none'}; its aliases: {aliases}") from None


def _download_version(model_uri: str, uri: str, version, source: str, folder: Path) -> None:
    """The version's checkpoint (+ its run's config.yaml, when logged) and the run pointer, into `folder`
    (a temp folder made visible by a rename: a reader never sees half a checkpoint)."""
    import mlflow

    tmp = fsio.temp_path(folder)
    tmp.mkdir(parents=True)
    try:
        with environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                               tracking_uri=uri))
            except Exception as err:  # the store's own "not found" (a local one returns the empty folder instead)
                got, why = tmp, f" ({short_error(err)})"
            else:
                why = ""
            if not got.is_file():
                raise FileNotFoundError(f"{model_uri}: its checkpoint {source} is not in the artifact store{why} (run "
                                        f"{version.run_id}); register the student again from its pre-training "
                                        "out folder")
            config = f"{source.rstrip('/').rpartition('/')[0]}/config.yaml"
            with contextlib.suppress(Exception):  # a student logged without its config: named after the model
                mlflow.artifacts.download_artifacts(artifact_uri=config, dst_path=str(tmp), tracking_uri=uri)
        fsio.write_json(tmp / RUN_POINTER, {"run_id": version.run_id or "", "tracking_uri": uri,
                                            "model_uri": f"models:/{version.name}/{version.version}"})
        fsio.commit_folder(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------ a store that goes away
QUICK_FAILURE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
CALL_IN_FLIGHT_S = 30.0  # how long `MetricsBuffer.close` waits for a call in flight (HTTP timeout 10 s, + margin)


_QUICK = {"lock": threading.Lock(), "depth": 0, "saved": {}}


@contextlib.contextmanager
def quick_failures() -> Iterator[None]:
    """MLflow's HTTP client without its own retries inside the block (by default 7 with doubling backoff: minutes
    per call while a server is down), so a call to a store that is away fails at once and the caller decides
    (`MetricsBuffer` retries later, the end of a run warns). Process-wide while any thread is inside a block: the
    settings are restored when the last one leaves (a thread leaving first would otherwise give another thread's
    call in flight MLflow's minutes of retries)."""
    with _QUICK["lock"]:
        if _QUICK["depth"] == 0:
            _QUICK["saved"] = _set_environ(QUICK_FAILURE_ENV)
        _QUICK["depth"] += 1
    try:
        yield
    finally:
        with _QUICK["lock"]:
            _QUICK["depth"] -= 1
            if _QUICK["depth"] == 0:
                _set_environ(_QUICK["saved"])


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """These environment variables set inside the block and restored after it."""
    saved = _set_environ(values)
    try:
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Mapping[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) these environment variables; returns their previous values, in the same form."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return saved


def short_error(err: BaseException) -> str:
    """The first line of an error, at most 200 characters (MLflow's carry the whole HTTP story)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def step_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The metric values of one report (a ``metrics.jsonl`` row): its numbers other than the step, keys cleaned."""
    return _clean({k: v for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)})


BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MetricsBuffer:
    """Metric values for one run, sent from a background thread: `add` never waits for the store.

    A batch that fails (the server down, restarting or overloaded) stays at the head of the buffer and is sent
    again after a backoff that doubles from `backoff_s` to `max_backoff_s`, so values arrive in order and none is
    lost while the process lives. Beyond `max_pending` waiting values the oldest go, counted in `dropped`
    (metrics.jsonl still holds them: `backfill`). `send(batch)` logs a list of ``mlflow.entities.Metric``;
    `on_event(name, **fields)` hears "unreachable" at the first failure of an outage, "still_unreachable" after
    2, 4, 8, ... retries, and "back" (with the retries and seconds it took) at the first success after it.
    """

    def __init__(self, send, *, backoff_s: float = 0.5, max_backoff_s: float = 15.0, max_pending: int = 100_000,
                 on_event=None, name: str = "mlflow-metrics"):
        self._send, self._on_event, self.name = send, on_event or (lambda name, **fields: None), name
        self.backoff_s, self.max_backoff_s, self.max_pending = backoff_s, max_backoff_s, max_pending
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # set by close()
        self.sent = self.retries = self.dropped = 0

    def add(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        with self._cond:
            self._pending.extend(Metric(k, v, stamp, int(step)) for k, v in _clean(metrics).items())
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout_s: float) -> int:
        """Send what is waiting, retrying for at most `timeout_s`; the number of values left unsent. Once it
        returns the buffer sends nothing more: it waits for a call in flight (bounded by the HTTP timeout of
        `quick_failures`), so a back-fill that follows cannot race a late batch and log a step twice."""
        with self._cond:
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s + CALL_IN_FLIGHT_S)
            if thread.is_alive():
                log.warning("MLflow: a metrics call still in flight %.0f s after the end of the run's logging",
                            timeout_s + CALL_IN_FLIGHT_S)
        return self.pending

    def _run(self) -> None:
        delay, failures, failing_since = self.backoff_s, 0, 0.0
        while True:
            with self._cond:
                while not self._pending and self._deadline is None:
                    self._cond.wait()
                if not self._pending:
                    return  # closed, all sent
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return  # closed and out of time: nothing more goes out (the caller back-fills what is left)
                batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                self._send(batch)
            except Exception as err:  # the store is away: keep the batch, wait, try again
                if failures == 0:
                    failing_since = time.monotonic()
                    self._on_event("unreachable", error=short_error(err), pending=self.pending)
                failures += 1
                self.retries += 1
                if failures >= 2 and failures & (failures - 1) == 0:  # 2, 4, 8, ... retries: sparser as it lasts
                    self._on_event("still_unreachable", retries=failures, pending=self.pending)
                with self._cond:
                    wait = delay
                    if self._deadline is not None:
                        wait = min(wait, self._deadline - time.monotonic())
                        if wait <= 0:
                            return  # closing and out of time: the caller counts what is left
                    self._cond.wait(wait)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            with self._cond:
                for metric in batch:  # unless dropped meanwhile (the buffer overflowed during the send)
                    if self._pending and self._pending[0] is metric:
                        self._pending.popleft()
                self.sent += len(batch)
            if failures:
                self._on_event("back", retries=failures, waited_s=round(time.monotonic() - failing_since, 1))
            delay, failures = self.backoff_s, 0


_BUFFERS: dict[tuple[str, str], MetricsBuffer] = {}


def metrics_buffer(uri: str, run_id: str, on_event=None) -> MetricsBuffer:
    """This process's `MetricsBuffer` for a run (one per run, made at the first call), sending with
    `quick_failures`: MLflow's own retries would hold the buffer for minutes per call. A batch sent again after a
    failure leaves out the values the store already has (by name and step): the failed call may have been
    stored before the connection broke, and a metric's history would show a step twice."""
    key = (uri, run_id)
    if key not in _BUFFERS:
        import mlflow

        apply_env_defaults()
        client = mlflow.MlflowClient(uri)
        last = {"failed": False}

        def send(batch: list) -> None:
            with quick_failures():
                if last["failed"]:  # the failed call may have reached the store first: send only what it lacks
                    batch = missing_metrics(client, run_id, batch)
                last["failed"] = True
                if batch:
                    client.log_batch(run_id, metrics=batch, synchronous=True)
                last["failed"] = False

        _BUFFERS[key] = MetricsBuffer(send, on_event=on_event, name=f"mlflow-metrics-{run_id}")
    return _BUFFERS[key]


def close_metrics_buffer(uri: str, run_id: str, timeout_s: float = 5.0) -> int:
    """The end of a run's live logging: its buffer (if this process made one) sends what is waiting for at most
    `timeout_s` and stops; the number of values it left (metrics.jsonl holds them: `backfill`)."""
    buffer = _BUFFERS.pop((uri, run_id), None)
    return 0 if buffer is None else buffer.close(timeout_s)


def missing_metrics(client, run_id: str, metrics: list) -> list:
    """The `metrics` (``mlflow.entities.Metric``) whose name and step the run does not have yet, in order."""
    have = {(key, m.step) for key in dict.fromkeys(m.key for m in metrics)
            for m in client.get_metric_history(run_id, key)}
    return [m for m in metrics if (m.key, m.step) not in have]


def backfill(uri: str, run_id: str, rows: list[Mapping[str, Any]]) -> int:
    """Log the values of `rows` (``metrics.jsonl``: {"step": N, name: value, ...}) that the run does not have yet
    (by name and step), stamped now; returns how many. A second call logs none."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    wanted: dict[str, dict[int, float]] = {}
    for row in rows:
        if "step" in row:
            for key, value in step_metrics(row).items():
                wanted.setdefault(key, {})[int(row["step"])] = value
    now = int(time.time() * 1000)
    missing = missing_metrics(client, run_id, [Metric(key, value, now, step) for key, by_step in wanted.items()
                                               for step, value in sorted(by_step.items())])
    for i in range(0, len(missing), BATCH):
        client.log_batch(run_id, metrics=missing[i:i + BATCH], synchronous=True)
    return len(missing)
