"""Builders that turn a Config into a Ray Train run: loop config, TorchTrainer, and `pretrain` end to end.

    pretrain(cfg, out_dir)                           <out>/config.yaml        resolved config
      -> init checkpoint (model.checkpoint, or the   <work>/foundation/       stand-in encoder, cached
         stand-in foundation encoder, or a seeded    <out>/init_beats_*.pt    only for random init
         random one for smoke runs)
      -> stream (Ray Data) + TorchTrainer.fit()      <out>/ray/<name>/...     Ray Train checkpoints
      -> student exported in official BEATs format   <out>/student_beats.pt
      -> MLflow run (params, live metrics, config,   <out>/metrics.jsonl      every report, rank 0
         summary and student as artifacts)         <out>/mlflow_run.json    its run id (read by evaluate)
      -> run summary                                 <out>/summary.json       steps, restarts, resumes, loss

With data.storage = s3://bucket/prefix the Ray Train checkpoints go to the bucket instead of <out>/ray/, under
``<data.storage>/runs/<out folder name>/<name>/`` (the run's key: the same --out name resumes from the bucket, on
any machine), and the exported student, config.yaml, summary.json and mlflow_run.json are copied there too;
<out> then holds only scratch (logs, metrics.jsonl, events.jsonl, the local copies).

A lost worker (or node) restarts the worker group from the latest checkpoint (`train.max_failures`, default 3),
on the nodes that remain or that the autoscaler brings, waiting at most `train.resource_wait_s` (default 600 s)
for them; summary.json counts the restarts and the steps done again.
Re-running `pretrain` with the same config and out dir resumes from the newest *complete* checkpoint on disk
(`train/recovery.py`: marker written last; incomplete and orphaned folders are removed). A non-finite loss or
gradient norm stops the run before the optimiser applies it (`train/guard.py`): `DivergenceError`, nothing
exported. Ray must be initialised by the caller (`retain_asd.runtime.init_ray`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retain_asd import config as config_mod
from retain_asd import fsio, storage
from retain_asd.config import Config, ConfigError
from retain_asd.corpus.labels import LabelVocab
from retain_asd.models.beats import (
    BEATs,
    BEATsConfig,
    beats_base,
    beats_tiny,
    load_beats,
    save_beats,
    write_random_checkpoint,
)
from retain_asd.tracking import RUN_POINTER, read_run_pointer
from retain_asd.train import objectives, recovery
from retain_asd.train.checkpoint import TRAIN_STATE, complete_checkpoints, read_train_state
from retain_asd.train.guard import DivergenceError
from retain_asd.train.loop_config import LoopConfig, snr_sampler_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    out_dir: Path
    student_path: Path  # official BEATs layout: load_beats(student_path)
    config_path: Path  # the resolved config, load_config(path=config_path)
    step: int  # optimiser steps done (0 for "frozen")
    completed: bool  # step == train.total_steps (False after stop_at_step)
    checkpoint_path: str | None  # latest Ray Train checkpoint directory
    metrics: list[dict] = field(default_factory=list)  # every report of this out dir, by step
    mlflow_run_id: str | None = None
    summary: dict = field(default_factory=dict)  # what <out>/summary.json holds
    student_uri: str | None = None  # the student's copy in data.storage (None: local only)
    mlflow_pending: bool = False  # the store was down at the end: `retain-asd tracking backfill --out` finishes it


# ---------------------------------------------------------------------------------------- storage
def checkpoint_root(cfg: Config, out_dir: str | os.PathLike) -> Path | str:
    """Ray Train's storage path (the run folder is ``<root>/<name>``): <out>/ray, or
    ``<data.storage>/runs/<out folder name>`` (the out folder's name is the run's key in the bucket)."""
    if cfg.data.storage:
        return storage.join(cfg.data.storage, "runs", Path(out_dir).resolve().name)
    return Path(out_dir).resolve() / "ray"


def run_location(cfg: Config, out_dir: str | os.PathLike) -> str | None:
    """The run's folder in data.storage, ``<checkpoint_root>/<name>``: its Ray Train checkpoints, and the exported
    student beside them; None when data.storage is empty (everything stays in <out>)."""
    return storage.join(checkpoint_root(cfg, out_dir), cfg.name) if cfg.data.storage else None


DURABLE_FILES = ("config.yaml", "summary.json", "mlflow_run.json", "student_beats.pt")  # the student last


def _upload_outputs(cfg: Config, out_dir: Path) -> str | None:
    """Copy the exported student and the files that describe it into data.storage; the student's URI."""
    location = run_location(cfg, out_dir)
    if location is None:
        return None
    for name in DURABLE_FILES:  # one PUT each; whoever finds the student finds its config beside it
        if (out_dir / name).is_file():
            storage.upload(out_dir / name, storage.join(location, name))
    return storage.join(location, "student_beats.pt")


# ---------------------------------------------------------------------------------------- model init
def foundation_cache_dir(cfg: Config) -> Path:
    """Where the stand-in foundation encoders are cached: <data.work_dir>/foundation (`retain-asd foundation`)."""
    return Path(cfg.data.work_dir).expanduser().resolve() / "foundation"


def initial_encoder(cfg: Config, *, progress: bool | None = None) -> Path:
    """The encoder every run of `cfg` starts from and the `frozen` row evaluates, with no random init.

    `model.checkpoint` when given (it must exist); else (model.init = "foundation") the stand-in foundation
    encoder of the `foundation` section, trained once and cached (retain_asd/train/foundation.py). A random
    init (model.init = "random") is not an initial encoder: None is never returned, a ValueError is raised.
    """
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.checkpoint = {cfg.model.checkpoint!r}: file not found ({path}). Download an official "
                "BEATs checkpoint (e.g. BEATs_iter3.pt) and pass its path, or set model.checkpoint='' for the "
                "stand-in foundation encoder")
        return path
    if not config_mod.uses_foundation(cfg):
        raise ValueError(f"model.init = {cfg.model.init!r} with model.checkpoint '': no initial encoder to load")
    from retain_asd.train.foundation import foundation_encoder

    return foundation_encoder(cfg.foundation, foundation_cache_dir(cfg), progress=progress)


def resolve_init_checkpoint(cfg: Config, out_dir: Path) -> Path:
    """The BEATs checkpoint student and teacher start from (the teacher is re-made from it on resume).

    `model.checkpoint` must exist; "" means the stand-in foundation encoder (`initial_encoder`, the default
    model.init = "foundation"), or with model.init = "random" a seeded random init written once to
    <out>/init_beats_<size>_seed<train.seed>.pt (so a resumed run re-makes the same teacher; smoke tests only).
    """
    if cfg.model.family != "beats":
        raise ValueError(f"model.family = {cfg.model.family!r}: pre-training is BEATs-only; EAT / SSLAM are "
                         "frozen baselines (use them with `retain-asd evaluate` / `score`)")
    if cfg.model.checkpoint or cfg.model.init == "foundation":
        return initial_encoder(cfg)
    path = out_dir / f"init_beats_{cfg.model.size}_seed{cfg.train.seed}.pt"
    message = (f"model.checkpoint is empty and model.init = 'random': student and teacher start from a RANDOM "
               f"{cfg.model.size} BEATs ({path}). Only meaningful for smoke runs; use model.init=foundation or "
               "set model.checkpoint to BEATs_iter3.pt for real runs")
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    if not path.is_file():  # written once, so a resumed run's teacher is the same random network
        write_random_checkpoint(path, beats_tiny() if cfg.model.size == "tiny" else beats_base(),
                                seed=cfg.train.seed)
    return path


def _num_layers(checkpoint: Path) -> int:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return BEATsConfig.from_dict(ckpt["cfg"]).encoder_layers


# ---------------------------------------------------------------------------------------- loop config
def loop_config_from(cfg: Config, labels_path: str | os.PathLike, init_checkpoint: str | os.PathLike,
                     stop_at_step: int | None = None) -> LoopConfig:
    """The frozen `LoopConfig` `train_fn_per_worker` reads (config sections + what the driver resolves); checked
    here, on the driver."""
    o, t, m = cfg.objective, cfg.train, cfg.model
    vocab = LabelVocab.from_json(labels_path)
    layers = _num_layers(Path(init_checkpoint))
    try:
        align_layer = objectives.resolve_align_layer(o.align_layer, layers)
    except ValueError as err:
        raise ConfigError(f"objective.align_layer: {err}") from None
    if stop_at_step is not None and not 1 <= stop_at_step <= t.total_steps:
        raise ValueError(f"stop_at_step = {stop_at_step}: must be in 1..train.total_steps ({t.total_steps})")
    return LoopConfig(model=m, objective=o, mixing=cfg.mixing, train=t,
                      init_checkpoint=str(Path(init_checkpoint).resolve()), num_classes=vocab.num_classes,
                      num_machine_classes=vocab.num_machine, align_layer=align_layer,
                      batch_size_per_worker=t.batch_size // t.num_workers, stop_at_step=stop_at_step)


# ---------------------------------------------------------------------------------------- data
def train_stream_from(cfg: Config, corpus, num_clips: int | None = None) -> Any:
    """The Ray Data mixing stream as a `stream.StreamPlan` (dataset + state), with enough epochs for
    `num_clips` clips (default total_steps x grad_accum x batch_size; `retain-asd inspect-stream` asks less)."""
    from retain_asd import stream
    from retain_asd.corpus.shards import read_table

    t = cfg.train
    splits = read_table(corpus.machine.root, columns=["path", "split"]).column("split").to_pylist()
    num_train = sum(s == "train" for s in splits)
    if num_train == 0:
        raise ValueError(f"{corpus.machine.root}: no clips with split 'train' to pre-train on")
    if num_clips is None:
        num_epochs = stream.epochs_for_steps(t.total_steps, t.batch_size, t.grad_accum, num_train)
    else:
        num_epochs = stream.epochs_for_steps(num_clips, 1, 1, num_train)
    return stream.build_train_stream(corpus.machine.root, corpus.noise.root, corpus.labels_path,
                                     snr_sampler=snr_sampler_args(cfg.mixing), seed=cfg.mixing.seed,
                                     num_epochs=num_epochs, class_weighted=t.class_weighted, level=cfg.mixing.level)


# ---------------------------------------------------------------------------------------- trainer
def _metrics_log_callbacks(path: Path, uri: str | None = None, run_id: str | None = None) -> list:
    """Ray Train callbacks for rank 0's metrics of every report, as it arrives: appended to a JSONL file and,
    with ``run_id``, handed to that MLflow run's `tracking.MetricsBuffer` (step, losses, lr, clips/s; stamped
    with the report's time), which sends them from a background thread: the store being down never holds up a
    step; the values wait and go when it is back (the outage and the return are events in events.jsonl), and
    the end of the run back-fills from metrics.jsonl what did not arrive (`_publish`).

    Ray Train V2 keeps only the metrics attached to checkpoints in `Result.metrics_dataframe`; this keeps
    the full history (runs in the controller, so `path` must be on a file system it can reach).

    When the fit ends, in the controller, the buffer sends what waits for at most 5 s and stops (event
    `mlflow_live_logging_end` with the values it left): a sender still retrying in a controller process that
    outlives the fit would deliver its batch when the server is back, beside the back-fill's, and the steps
    would show twice in the run's histories.
    """
    from ray.train import UserCallback
    from ray.train.v2._internal.execution.callback import ControllerCallback

    events = path.parent / recovery.EVENTS

    def on_event(name: str, **fields) -> None:
        log.warning("MLflow at %s %s: %s", uri, name, fields)
        try:
            fsio.append_line(events, json.dumps({"event": f"mlflow_{name}", **fields}))
        except OSError:
            pass

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0]
            try:
                fsio.append_line(path, json.dumps(row))
            except OSError as err:  # a full disk: the run stops at its next checkpoint with the reason
                log.warning("%s: step %s not recorded (%s)", path, row.get("step"), err)
            if run_id is None or "step" not in row:
                return
            from retain_asd import tracking

            tracking.metrics_buffer(uri, run_id, on_event).add(tracking.step_metrics(row), int(row["step"]))

    class LiveLoggingEnd(ControllerCallback):
        def after_controller_finish(self, result):
            from retain_asd import tracking

            unsent = tracking.close_metrics_buffer(uri, run_id)
            try:
                fsio.append_line(events, json.dumps({"event": "mlflow_live_logging_end", "unsent": unsent}))
            except OSError:
                pass

    return [MetricsLog(), *([LiveLoggingEnd()] if run_id is not None else [])]  # no MLflow run: no buffer to end


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The reported metrics by step; a step reported twice (replayed after a failure) keeps the last."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step = {row["step"]: row for row in fsio.read_jsonl(path) if "step" in row}
    return [by_step[s] for s in sorted(by_step)]


def resolve_use_gpu(setting: str) -> bool:
    """``train.use_gpu``: "true" / "false" as given; "auto" = the connected Ray cluster has a GPU (its total
    resources, so GPU nodes an autoscaler has not started yet are not counted: pass true for those)."""
    if setting in ("true", "false"):
        return setting == "true"
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if gpus:
        log.info("train.use_gpu=auto: the cluster has %s GPUs; one per worker", gpus)
    return gpus > 0


def trainer_class():
    """Ray Train's TorchTrainer; on a cluster without a Ray dashboard (the embedded Ray, a test cluster) without
    its placement-group cleaner. That actor asks the State API, which needs the dashboard, every second whether
    the run's controller still lives, so there it never learns anything, and a fit's end could wait up to 12 s
    for it (its stop timeout, with a 10 s State API call in flight; seen in Ray's logs). A local cluster ends
    with its driver anyway, and a sweep frees a stopped trial's group itself
    (`tune.sweep.release_stopped_trainers`). Ray internals (the default callback list), pinned with Ray."""
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized() or ray._private.worker.get_dashboard_url():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class TorchTrainerWithoutDashboard(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return TorchTrainerWithoutDashboard


def build_trainer(cfg: Config, loop_config: LoopConfig, train_dataset, out_dir: str | os.PathLike,
                  mlflow_run: tuple[str, str] | None = None, callbacks: Sequence[Any] = ()):
    """TorchTrainer: fractional-CPU workers (Ray Data read tasks need CPUs too), keep-N checkpoints.

    `train.placement_strategy` places the workers (STRICT_SPREAD: one per node); a group that cannot be placed
    within `train.resource_wait_s` (at the start, or after a lost node) stops the run (`recovery.resource_wait`).
    The stream is split between the workers in dataset order (`preserve_order`), not by which block finished
    first or where it lives, so each rank sees the same rows on one node or several and a run is reproducible
    for its seed.
    `mlflow_run`: (tracking URI, run id) that rank 0's metrics are logged to live. `callbacks`: more Ray Train
    callbacks (a sweep trial's forwarding of the validation reports to Ray Tune, `tune.sweep`).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    from retain_asd.train.loop import train_fn_per_worker

    out_dir = Path(out_dir).resolve()
    t = cfg.train
    use_gpu = resolve_use_gpu(t.use_gpu)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic split: OutputSplitter then ignores locality and arrival order
    return trainer_class()(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(name=cfg.name, **storage.ray_storage(checkpoint_root(cfg, out_dir)),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             callbacks=[*_metrics_log_callbacks(out_dir / "metrics.jsonl", *(mlflow_run or ())),
                                        recovery.run_monitor(out_dir / recovery.EVENTS),
                                        recovery.resource_wait(t.resource_wait_s, out_dir / recovery.EVENTS),
                                        *callbacks]),
        datasets={"train": train_dataset},
    )


# ---------------------------------------------------------------------------------------- export + MLflow
def export_student(checkpoint_dir: str | os.PathLike, init_checkpoint: str | os.PathLike,
                   path: str | os.PathLike) -> Path:
    """The student of a training checkpoint in the official BEATs layout (cfg from the init checkpoint)."""
    student: BEATs = load_beats(init_checkpoint)
    student.load_state_dict(read_train_state(checkpoint_dir)["student"], strict=True)
    return save_beats(student, path)


def latest_checkpoint(out_dir: str | os.PathLike, name: str,
                      root: str | os.PathLike | None = None) -> Path | str | None:
    """The complete Ray Train checkpoint (`checkpoint.complete_step`) of run `name` with the highest step, or None.
    `root`: Ray Train's storage path when not <out>/ray (`checkpoint_root`; a URI gives a URI)."""
    complete, _ = complete_checkpoints(storage.as_location(storage.join(root or Path(out_dir) / "ray", name)))
    return complete[-1][1] if complete else None


def _checkpoint_step(directory: Path) -> int:
    state = fsio.load_torch(directory / TRAIN_STATE, fix=f"delete the folder {directory} to resume from an "
                            "earlier checkpoint", mmap=True)
    return int(state["step"])


def _check_same_config(cfg: Config, path: Path) -> None:
    if path.is_file():
        previous = config_mod.load_config(path=path)
        if config_mod.to_dict(previous) != config_mod.to_dict(cfg):
            raise ConfigError(f"{path}: this out dir holds checkpoints of a run with a different config; "
                              "resuming would mix them. Use another --out, or delete the folder to start over")


@contextlib.contextmanager
def _tracked_run(cfg: Config, out_dir: Path, track: bool, protocol=None, tags: dict | None = None):
    """One MLflow run per out dir, open around training (so metrics go in live) and the export; its id is kept
    in <out>/mlflow_run.json, so a resumed run continues it. Nested under the active run (an experiment point's).
    `protocol`: the leakage guard's ``OverlapReport``, logged as ``protocol.*`` params (and kept in the pointer,
    so the evaluation of this student logs the same keys). `tags`: over the run's own (``preset`` names it)."""
    if not track:
        yield None
        return
    from retain_asd import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    state = read_run_pointer(out_dir)
    run_id = tracking.live_run_id(uri, state.get("run_id"))  # a deleted run is not resumed: a new one starts
    extra = state.get("params", {})
    if protocol is not None:  # what the two corpora share (data.add_eval_references)
        from retain_asd.corpus.protocol import overlap_params

        extra = overlap_params(protocol)
    params = {**config_mod.to_dict(cfg), **extra} if not run_id else None
    tags = {"kind": "pretrain", "preset": cfg.name, "seed": str(cfg.train.seed), "objective": cfg.objective.name,
            "out_dir": str(out_dir), **(tags or {})}
    name = tracking.run_name("pretrain", tags["preset"], cfg.train.seed)
    with tracking.mlflow_run(uri, cfg.tracking.experiment, name, params=params, tags=tags, run_id=run_id,
                             nested=tracking.active_run_id() is not None, storage=cfg.data.storage) as run:
        fsio.write_json(out_dir / RUN_POINTER, {"run_id": run.info.run_id, "tracking_uri": uri,
                                                "experiment": cfg.tracking.experiment, "params": extra})
        yield uri, run.info.run_id


def _publish(out_dir: Path, run: tuple[str, str], student_path: Path, student_uri: str | None = None) -> bool:
    """The end of a tracked run: the metric values live logging did not deliver (back-filled from metrics.jsonl),
    then the outputs (`_log_outputs`). A store that is down is a warning naming the command that does this later
    (`backfill_run`), not a failed run; False then."""
    from retain_asd import tracking

    uri, run_id = run
    try:
        with tracking.quick_failures():
            added = tracking.backfill(uri, run_id, read_metrics(out_dir / "metrics.jsonl"))
            _log_outputs(out_dir, student_path, student_uri)
    except Exception as err:
        message = (f"MLflow at {uri} unreachable at the end of the run ({tracking.short_error(err)}); its metrics "
                   f"are in {out_dir / 'metrics.jsonl'}: once the server is back, `retain-asd tracking backfill "
                   f"--out {out_dir}` logs them, the artifacts and the run's end")
        warnings.warn(message, stacklevel=2)
        log.warning(message)
        return False
    if added:
        log.info("MLflow: %d metric values the live logging missed back-filled from metrics.jsonl", added)
    return True


def backfill_run(out_dir: str | os.PathLike) -> dict:
    """`retain-asd tracking backfill --out DIR`: what the end of a pre-training run could not log to MLflow (the
    server was down) logged now: the metric values of metrics.jsonl the run lacks, the artifacts and tags, and the
    run marked FINISHED. Idempotent; refused while a run holds the folder (`fsio.run_lock`). Returns
    {"run_id", "tracking_uri", "backfilled"}; the next `pretrain` of the folder does the same at its end."""
    from retain_asd import tracking

    out_dir = Path(out_dir).resolve()
    with fsio.run_lock(out_dir, "retain-asd tracking backfill"):
        state = read_run_pointer(out_dir)
        if not state.get("run_id"):
            raise FileNotFoundError(f"{out_dir / RUN_POINTER}: not found; --out must be the output folder of a "
                                    "`retain-asd pretrain` run logged to MLflow")
        uri, run_id = state["tracking_uri"], state["run_id"]
        with tracking.mlflow_run(uri, state["experiment"], "", run_id=run_id):
            added = tracking.backfill(uri, run_id, read_metrics(out_dir / "metrics.jsonl"))
            student = out_dir / "student_beats.pt"
            if student.is_file() and (out_dir / "summary.json").is_file():
                cfg = config_mod.load_config(path=out_dir / "config.yaml")
                location = run_location(cfg, out_dir)
                _log_outputs(out_dir, student, location and storage.join(location, student.name))
    return {"run_id": run_id, "tracking_uri": uri, "backfilled": added}


def _log_outputs(out_dir: Path, student_path: Path, student_uri: str | None = None) -> None:
    """The run summary, the resolved config.yaml and the exported student as artifacts of the active run
    (the experiment's artifact location: in data.storage when it is set, `tracking.artifact_location`)."""
    from retain_asd import tracking

    tracking.set_tags({"student_beats": student_uri or str(student_path)})
    for name in ("config.yaml", "summary.json", "student_beats.pt"):
        tracking.log_artifact(out_dir / name)


# ---------------------------------------------------------------------------------------- pretrain
def pretrain(cfg: Config, out_dir: str | os.PathLike, *, corpus=None, stop_at_step: int | None = None,
             track: bool = True, protocol=None, tags: dict | None = None,
             callbacks: Sequence[Any] = ()) -> PretrainResult:
    """Pre-train (or resume) the student of `cfg` into `out_dir`; export it; log the run to MLflow.

    `corpus`: the ingested PRE-TRAINING corpus (default: `ingest.corpora_from_config(cfg)`, which runs the
    leakage guard against the evaluation corpus first); `protocol`: the guard's ``OverlapReport`` when the
    caller passes `corpus` (logged as MLflow params); `tags`: MLflow tags over the run's own (an experiment
    point's label as ``preset``, its study or trial); `callbacks`: Ray Train callbacks added to the trainer's
    (e.g. Ray Tune's report forwarding in a sweep trial). `stop_at_step`: stop after
    that optimiser step (a checkpoint is written there; a later call resumes), e.g. for time-limited jobs.
    A re-run resumes from the newest COMPLETE checkpoint on disk (`recovery.prepare_resume`); the run ends
    with <out>/summary.json; a divergence raises `DivergenceError` and exports nothing. The run owns `out_dir`
    while it runs (`fsio.run_lock`): a second run on it raises `fsio.RunLockedError` naming the first.
    """
    with fsio.run_lock(out_dir, "pretrain"):
        return _pretrain(cfg, Path(out_dir).resolve(), corpus, stop_at_step, track, protocol, tags, callbacks)


def _pretrain(cfg: Config, out_dir: Path, corpus, stop_at_step: int | None, track: bool,
              protocol, tags: dict | None, callbacks: Sequence[Any]) -> PretrainResult:
    fsio.remove_stale_temps(out_dir)  # temp files of a run that was killed (config.yaml, student, MLflow pointer)
    config_path = out_dir / "config.yaml"
    init_checkpoint = resolve_init_checkpoint(cfg, out_dir)
    newest = recovery.prepare_resume(out_dir, cfg.name, cfg.train.keep_checkpoints,  # removes torn folders
                                     checkpoint_root(cfg, out_dir))
    checkpoint = newest[1] if newest else None
    if checkpoint is not None:  # resuming: the run must be the same
        _check_same_config(cfg, config_path)
    config_mod.dump_yaml(cfg, config_path)
    student_path = out_dir / "student_beats.pt"

    if not objectives.objective_terms(cfg.objective.name).trains_student:
        log.warning("objective %r trains nothing: exporting the initial encoder as %s", cfg.objective.name,
                    student_path)
        with _tracked_run(cfg, out_dir, track, protocol, tags) as run:
            save_beats(load_beats(init_checkpoint), student_path)
            summary = _finish(cfg, out_dir, "completed", None, student_path, step=0)
            student_uri = _upload_outputs(cfg, out_dir)
            pending = bool(run) and not _publish(out_dir, run, student_path, student_uri)
        return PretrainResult(out_dir, student_path, config_path, 0, True, None, [], run and run[1], summary,
                              student_uri, pending)
    done = newest is not None and newest[0] >= (stop_at_step or cfg.train.total_steps)
    if corpus is None and not done:
        from retain_asd.corpus.ingest import corpora_from_config

        corpus, _, protocol = corpora_from_config(cfg)  # before the MLflow run: a corpus error is no failed run
    with _tracked_run(cfg, out_dir, track, protocol, tags) as run:
        checkpoint = checkpoint if done else _train(cfg, out_dir, corpus, init_checkpoint, checkpoint,
                                                    stop_at_step, run, callbacks)
        state = read_train_state(checkpoint)
        step = int(state["step"])
        export_student(checkpoint, init_checkpoint, student_path)
        history = read_metrics(out_dir / "metrics.jsonl")
        completed = step == cfg.train.total_steps
        summary = _finish(cfg, out_dir, "completed" if completed else "stopped", checkpoint, student_path,
                          skipped=int(state["data"].get("skipped_steps", 0)), step=step)
        student_uri = _upload_outputs(cfg, out_dir)
        pending = bool(run) and not _publish(out_dir, run, student_path, student_uri)
    return PretrainResult(out_dir, student_path, config_path, step, completed, str(checkpoint), history,
                          run and run[1], summary, student_uri, pending)


def _init_in_storage(cfg: Config, out_dir: Path, init_checkpoint: Path) -> dict:
    """With data.storage, the init checkpoint goes to the run's folder in the bucket (`<run>/init/<name>`, when
    not there yet at that size) and the workers read it from there (`student.local_init_checkpoint`), so no node
    needs the driver's disk; {} otherwise (the workers read the local path)."""
    location = run_location(cfg, out_dir)
    if location is None:
        return {}
    uri = storage.join(location, "init", Path(init_checkpoint).name)
    if storage.file_sizes(storage.join(location, "init")).get(Path(init_checkpoint).name) != \
            Path(init_checkpoint).stat().st_size:
        storage.upload(init_checkpoint, uri)
    filesystem, path = storage.resolve(uri)
    return {"init_checkpoint": path, "init_fs": filesystem}


def _local_run_dir(cfg: Config, out_dir: Path) -> str | None:
    """The local folder of the run's checkpoints (the workers check its free space first); None in a bucket."""
    root = checkpoint_root(cfg, out_dir)
    return None if storage.is_uri(root) else str(Path(root) / cfg.name)


def _validation(cfg: Config) -> dict:
    """With train.validate_every, the validation sets (built here, on the driver, and checked disjoint from the
    test sets) and how the workers score them; {} otherwise."""
    if not cfg.train.validate_every:
        return {}
    from retain_asd.eval.evalsets import validation_sets_from_config
    from retain_asd.train.validate import validation_args

    sets = validation_sets_from_config(cfg)
    return {"validation": validation_args(cfg, sets.root)}


def _train(cfg: Config, out_dir: Path, corpus, init_checkpoint: Path, checkpoint: Path | str | None,
           stop_at_step: int | None, run: tuple[str, str] | None, callbacks: Sequence[Any] = ()) -> Path | str:
    """Fit up to stop_at_step / total_steps from `checkpoint` (or the start); the newest checkpoint (a URI when
    the checkpoints are in data.storage).

    Worker losses are survived by Ray Train (train.max_failures); a divergence stops the run here, and so does a
    worker group that waited train.resource_wait_s for its resources (`recovery.ResourceWaitError`)."""
    resume = {"resume_from": str(checkpoint) if checkpoint else None}
    if checkpoint is not None and storage.is_uri(checkpoint):  # the workers read it through the filesystem
        filesystem, path = storage.resolve(checkpoint)
        resume = {"resume_from": path, "resume_fs": filesystem}
    plan = train_stream_from(cfg, corpus)
    loop_config = dataclasses.replace(loop_config_from(cfg, corpus.labels_path, init_checkpoint, stop_at_step),
                                      **resume, **_init_in_storage(cfg, out_dir, init_checkpoint),
                                      **_validation(cfg), noise_bank=plan.state_ref,
                                      checkpoint_dir=_local_run_dir(cfg, out_dir))
    trainer = build_trainer(cfg, loop_config, plan.dataset, out_dir, mlflow_run=run, callbacks=callbacks)
    since = recovery.fit_started(out_dir)
    try:
        result = trainer.fit()
    except Exception as err:
        recovery.fit_failed(out_dir)
        waited = recovery.find_resource_wait_error(err)
        if waited is not None:  # one line naming the setting, not Ray's wrapped controller error
            raise recovery.ResourceWaitError(str(waited)) from None
        raise
    try:
        recovery.raise_if_diverged(out_dir, since)
    except DivergenceError as err:
        _finish(cfg, out_dir, "diverged", None, None, message=str(err))
        raise
    recovery.raise_if_disk_full(out_dir, since)  # nothing more is written: the disk has no room
    root = checkpoint_root(cfg, out_dir)
    if result.checkpoint is None:
        raise RuntimeError(f"{storage.join(root, cfg.name)}: the run finished without a checkpoint")
    if storage.is_uri(root):
        return storage.to_location(result.checkpoint.path, root)
    return Path(result.checkpoint.path)


def _finish(cfg: Config, out_dir: Path, status: str, checkpoint: Path | str | None, student: Path | None,
            skipped: int = 0, step: int | None = None, message: str | None = None) -> dict:
    """Prune checkpoints to the newest train.keep_checkpoints, write <out>/summary.json and log its line."""
    newest = recovery.prepare_resume(out_dir, cfg.name, cfg.train.keep_checkpoints, checkpoint_root(cfg, out_dir))
    if step is None:  # diverged: the last good checkpoint
        step = newest[0] if newest else 0
        if newest is not None:
            skipped = int(read_train_state(newest[1])["data"].get("skipped_steps", 0))
        checkpoint = newest[1] if newest else None
    summary = recovery.summary(out_dir, name=cfg.name, status=status, step=step,
                               total_steps=cfg.train.total_steps, skipped_steps=skipped,
                               history=read_metrics(out_dir / "metrics.jsonl"),
                               checkpoint=str(checkpoint) if checkpoint else None,
                               student=str(student) if student else None, message=message)
    summary["seed"] = cfg.train.seed
    recovery.write_summary(out_dir, summary)
    log.info(recovery.summary_line(summary))
    return summary
