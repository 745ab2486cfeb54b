"""Ray Tune around the library's experiment point: one trial = `retain_asd.experiments.run_point` (pre-train a
student with the trial's SNR range and alpha/beta, score it on the test sets), selected on validation.

Three layers as in Ray's train/tune interop example: the loop (retain_asd.train.loop) runs per worker,
``pretrain`` builds the TorchTrainer, and the Tuner below runs one experiment point per trial. Trial folders
come from trial ids and run names from the trial's choices (no timestamps), so a restarted sweep resumes its
trials. ``tune.search = grid`` (default) runs every point of the grid exactly once.

Selection and reporting are separate: every trial validates during pre-training (``train.validate_every``, on
by default in sweeps: `tune.space.sweep_base`), and each validation report reaches Tune while the trial trains
(`validation_to_tune`), so ``tune.scheduler = asha`` (Ray Tune's ASHAScheduler on ``val/hmean_low``, time in
optimiser steps) can stop a weak trial. A stopped trial never reaches its test evaluation; `record_outcomes`
tags its MLflow runs ``status=stopped_early``, ``stopped_at_step=<n>`` and ends them FINISHED (never failed).
A finished trial reports its test figures (``tune.metric`` is one) once, after the evaluation. The best trial,
written as best.yaml, is the finished trial with the best ``val/hmean_low`` (`best_trial`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain_asd.config import Config, from_dict, to_dict
from retain_asd.tracking import ensure_experiment, resolve_tracking_uri
from retain_asd.train.validate import METRIC as VALIDATION
from tune.space import check_trials, grace_steps, search_space, sweep_base, trial_config, trial_name

log = logging.getLogger(__name__)

REPORTED = ("hmean_all", "hmean_low", "hmean_all_dn", "hmean_low_dn")  # test figures, finished trials only


def validation_to_tune(total_steps: int):
    """Ray Train callback forwarding the trainer's validation reports to the Tune trial around it, through Ray's
    ``TuneReportCallback`` (ray.tune.integration.ray_train): only rank 0's reports that carry ``val/hmean_low``
    before the last step, as ``{"step", "val/hmean_low"}``. The others lack the metric (Tune wants it in every
    result); the last step's figure is reported with the test figures after the evaluation, so a scheduler never
    stops a trial that has trained to the end. Each forwarded report also names the trainer's controller actor and
    its workers' placement group (`ReleaseStoppedTrainers` frees that group when ASHA stops the trial). An internal
    Ray Train callback (ReportCallback + WorkerGroupCallback) so that it sees the placement group; built inside a
    Tune trial."""
    import ray
    from ray.train.v2._internal.execution.callback import ReportCallback, WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationToTune(WorkerGroupCallback, ReportCallback):
        def __init__(self):
            self._tune = TuneReportCallback()  # Tune's queue of this trial
            self._group: dict[str, str] = {}

        def after_worker_group_start(self, worker_group):  # again after a worker-group restart
            handle = worker_group.get_worker_group_state().placement_group_handle
            self._group = {"train_controller": ray.get_runtime_context().get_actor_id(),
                           "train_placement_group": handle.placement_group.id.hex()}

        def after_report(self, training_report, metrics):
            row = metrics[0]
            if VALIDATION in row and int(row.get("step", total_steps)) < total_steps:
                report = {"step": int(row["step"]), VALIDATION: row[VALIDATION], **self._group}
                self._tune.after_report(None, [report], None)

    return ValidationToTune()


def release_stopped_trainers():
    """Tune callback (driver side) that frees the workers of a trial stopped by the scheduler: Ray Train's
    PlacementGroupCleaner learns that a killed trainer's controller is gone through the State API, which needs
    the Ray dashboard; the embedded Ray runs without one, so a stopped trial's workers would keep their CPUs
    reserved and the next trial's Ray Data reads would wait for them forever. Once the controller named in the
    trial's last report is dead, its placement group is removed (each step of the Tune loop, and at the end)."""
    import time

    from ray._private.state import actors  # the GCS's actor table: no dashboard needed
    from ray._raylet import PlacementGroupID
    from ray.tune import Callback
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class ReleaseStoppedTrainers(Callback):
        def __init__(self):
            self._pending: list[tuple[str, str]] = []  # (controller actor id, placement group id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if "train_placement_group" in last and not any(k in last for k in REPORTED):  # stopped early
                self._pending.append((last["train_controller"], last["train_placement_group"]))

        def on_step_begin(self, iteration, trials, **info):
            self._release()

        def on_experiment_end(self, trials, **info):
            deadline = time.monotonic() + 60
            while self._release() and time.monotonic() < deadline:
                time.sleep(0.5)

        def _release(self) -> int:
            for controller, group in list(self._pending):
                if actors(actor_id=controller).get("State") != "DEAD":
                    continue
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
                except Exception as err:  # already removed
                    log.debug("placement group %s: %s", group, err)
                self._pending.remove((controller, group))
            return len(self._pending)

    return ReleaseStoppedTrainers()


def validation_figure(cfg: Config, point) -> float:
    """``val/hmean_low`` of a point's final student: its last validation report when that is at the last step,
    else (nothing trained, or train.validate_every does not divide the steps) the student scored now."""
    from retain_asd.eval.embed import as_model
    from retain_asd.eval.evalsets import validation_sets_from_config
    from retain_asd.train.validate import score_student, validation_args

    reports = [m for m in point.pretrained.metrics if VALIDATION in m]
    if reports and int(reports[-1]["step"]) == point.steps:
        return float(reports[-1][VALIDATION])
    args = validation_args(cfg, validation_sets_from_config(cfg).root)
    if point.steps == 0:  # the initial encoder, read where the frozen row is evaluated
        args["layer"] = cfg.eval.ssl_layer
    return float(score_student(as_model(point.student_path), args)[VALIDATION])


def run_trial(choices: dict[str, Any], *, base: dict, corpus_root: str, out_dir: str, uri: str) -> None:
    """Tune function trainable: one experiment point (`retain_asd.experiments.run_point`) for one choice of
    (SNR range, alpha, beta), in ``<out>/trials/<trial id>`` (a restarted trial resumes there).

    The point's MLflow run is named after its choices and tagged with the trial id, in the sweep's experiment,
    with its pre-training and evaluation runs nested. Tune receives every validation report while the student
    trains (`validation_to_tune`), then one final report: the test hmeans, the final ``val/hmean_low``, the
    step, and the point's run id and student path (what a registry needs of the best trial).
    """
    from ray import tune

    from retain_asd.corpus.ingest import load_corpus
    from retain_asd.experiments.point import run_point

    trial_id = tune.get_context().get_trial_id()
    name = trial_name(base["name"], choices)
    cfg = trial_config(from_dict(base), choices, name=name)
    point = run_point(cfg, Path(out_dir) / "trials" / trial_id, tracking_uri=uri, tags={"trial_id": trial_id},
                      corpus=load_corpus(corpus_root), callbacks=[validation_to_tune(cfg.train.total_steps)])
    tune.report({k: v for k, v in point.figures.items() if k in REPORTED}
                | {VALIDATION: validation_figure(cfg, point), "step": point.steps, "point_run_id": point.run_id,
                   "student_path": str(point.student_path)})


# A trial only drives a TorchTrainer: it holds no CPU, or the workers (0.5 CPU each) plus Ray Data's read
# tasks (1 CPU each) would not fit on a 2-CPU machine. Ray needs a non-empty bundle: reserve memory instead.
TRIAL_RESOURCES = {"CPU": 0.0, "memory": 256 * 1024**2}


def sweep_experiment(cfg: Config) -> str:
    """The MLflow experiment of a sweep: every trial's run, its pre-training and evaluation runs."""
    return f"{cfg.tracking.experiment}-sweep"


def _search(cfg: Config):
    """(search algorithm, num_samples, max_concurrent_trials) for ``tune.search``; the concurrency goes to the
    one place Ray honours it (Tune's ConcurrencyLimiter for a searcher, else the variant generator)."""
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    if t.search == "grid":
        return None, 1, t.max_concurrent  # Ray's own variant generator: each grid point once
    if t.search == "random":
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=t.max_concurrent), t.num_samples, None
    try:
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.train.seed)
    except (ImportError, AssertionError) as err:
        raise ValueError(f"tune.search = optuna needs the optuna package ({err}); pip install optuna, or use "
                         "tune.search=grid / random") from None
    return searcher, t.num_samples, t.max_concurrent


def sweep_plan(cfg: Config) -> str:
    """The sweep's console line: trials, how they validate (``train.validate_every``, on by default in sweeps),
    the scheduler, and what selects and what reports."""
    from tune.space import VALIDATION_POINTS, sweep_validate_every

    t = cfg.tune
    trials = check_trials(cfg) if t.search == "grid" else t.num_samples
    every = sweep_validate_every(cfg)
    why = "train.validate_every" if cfg.train.validate_every else \
        f"train.validate_every 0: {VALIDATION_POINTS} validation points by default in sweeps"
    scheduler = "fifo (every trial to the end)" if t.scheduler == "fifo" else (
        f"asha (grace {t.grace_period} validation points = {grace_steps(cfg)} steps, reduction factor "
        f"{t.reduction_factor:g})")
    return (f"sweep {cfg.name}: {trials} trials, each a pretrain validated every {every} steps ({why}) + a test "
            f"evaluation when it finishes; scheduler {scheduler}; best.yaml by {VALIDATION}, test {t.metric} "
            "reported")


def _scheduler(cfg: Config):
    """Ray Tune's trial scheduler for ``tune.scheduler``: None (FIFO, every trial to the end) or ASHA on
    ``val/hmean_low`` with time in optimiser steps (``step``): rungs from ``tune.grace_period`` validation points,
    spaced by ``tune.reduction_factor``, up to ``train.total_steps``."""
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=cfg.train.total_steps, grace_period=grace_steps(cfg),
                         reduction_factor=cfg.tune.reduction_factor)


def run_sweep(cfg: Config, out_dir: str | Path, *, trial_resources: dict | None = None,
              say: Callable[[str], None] | None = None):
    """Run the sweep of ``cfg.tune`` and return the ResultGrid, its stopped trials recorded (`record_outcomes`).

    Trials validate every `tune.space.sweep_validate_every` steps (``train.validate_every``, or when that is 0
    a tenth of ``train.total_steps``); Tune's metric is ``val/hmean_low`` (mode max), for ASHA and for the
    selection (`best_trial`); ``tune.metric`` names the test figure reported beside it. Validation sets too
    small to rank the trials (`EvalSets.coarse_warning`) are said through `say` (default: a logged warning)
    before any trial starts: ASHA's stops and best.yaml would then follow single clips."""
    from ray import tune

    from retain_asd.corpus.ingest import check_protocol, corpora_from_config
    from retain_asd.eval.evalsets import evalsets_from_config, validation_sets_from_config

    cfg = sweep_base(cfg)
    check_trials(cfg)  # every trial's config, before any work
    check_protocol(cfg)  # the leakage guard on the raw folders, before any Ray work
    out_dir = Path(out_dir).resolve()
    corpus, _, _ = corpora_from_config(cfg)  # once, on the driver: trials only read the pre-training corpus
    validation = validation_sets_from_config(cfg, test_sets=evalsets_from_config(cfg))  # both built once, cached
    coarse = validation.coarse_warning()
    if coarse:
        (say or log.warning)(f"warning: {coarse}")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    experiment = sweep_experiment(cfg)
    ensure_experiment(uri, experiment, cfg.data.storage)  # trials need it to exist
    base = to_dict(cfg)
    base["tracking"] = {**base["tracking"], "tracking_uri": uri, "experiment": experiment}
    trainable = tune.with_parameters(run_trial, base=base, corpus_root=str(corpus.root), out_dir=str(out_dir),
                                     uri=uri)
    trainable = tune.with_resources(trainable, trial_resources or TRIAL_RESOURCES)
    where = sweep_storage(cfg, out_dir)
    previous = f"{where['storage_path']}/{cfg.name}-sweep"
    fs = where.get("storage_filesystem")
    if tune.Tuner.can_restore(previous, storage_filesystem=fs):  # a restarted sweep resumes its unfinished trials
        log.info("resuming the sweep in %s", previous)
        grid = tune.Tuner.restore(previous, trainable, resume_errored=True, storage_filesystem=fs).fit()
    else:
        searcher, num_samples, concurrent = _search(cfg)
        grid = tune.Tuner(
            trainable,
            param_space=search_space(cfg.tune),
            tune_config=tune.TuneConfig(metric=VALIDATION, mode="max", num_samples=num_samples,
                                        max_concurrent_trials=concurrent, search_alg=searcher,
                                        scheduler=_scheduler(cfg)),
            run_config=tune.RunConfig(name=f"{cfg.name}-sweep", callbacks=[release_stopped_trainers()], **where),
        ).fit()
    record_outcomes(grid, uri, experiment)
    return grid


def sweep_storage(cfg: Config, out_dir: str | Path) -> dict:
    """Tune's storage_path (+ storage_filesystem) for the sweep's experiment state: ``<out>/ray``, or with
    data.storage the bucket, beside the trials' checkpoints (``<data.storage>/runs/<out folder name>``), so a
    sweep restarted on another machine resumes from the bucket."""
    from retain_asd import storage
    from retain_asd.train.launch import checkpoint_root

    return storage.ray_storage(checkpoint_root(cfg, out_dir))


# ---------------------------------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the sweep sees it after fit."""

    trial_id: str
    status: str  # "finished" | "stopped_early" (by the scheduler) | "error" | "no_result"
    choices: dict[str, Any]
    step: int | None  # optimiser steps reached (for a stopped trial: the validation step it was stopped at)
    validation: float | None  # val/hmean_low: of the final student, or at the stop
    test: dict[str, float] = field(default_factory=dict)  # REPORTED test figures (finished trials only)
    point_run_id: str | None = None  # the trial's experiment-point MLflow run (finished trials)
    student_path: str | None = None  # the finished trial's exported student (official BEATs layout)
    error: str | None = None  # the last line of a failed trial's error


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def trial_outcomes(grid) -> list[TrialOutcome]:
    """Every trial of a ResultGrid, classified: an error is "error"; test figures reported (the evaluation ran)
    is "finished"; a validation figure without them is "stopped_early" (the scheduler stopped it)."""
    out = []
    for result in grid:
        m = result.metrics or {}
        test = {k: float(m[k]) for k in REPORTED if _number(m.get(k)) is not None}
        validation, step = _number(m.get(VALIDATION)), _number(m.get("step"))
        if result.error is not None:
            status = "error"
        elif test:
            status = "finished"
        else:
            status = "stopped_early" if validation is not None else "no_result"
        choices = {k: v for k, v in (result.config or {}).items()}
        out.append(TrialOutcome(_trial_id(result), status, choices, None if step is None else int(step), validation,
                                test, m.get("point_run_id"), m.get("student_path"),
                                _last_line(result.error) if result.error is not None else None))
    return out


def best_trial(grid) -> TrialOutcome | None:
    """The sweep's choice: the finished trial with the highest ``val/hmean_low`` (never a test figure, never a
    stopped trial); None when no trial finished. Its ``point_run_id`` / ``student_path`` name what to register."""
    finished = [o for o in trial_outcomes(grid) if o.status == "finished" and o.validation is not None]
    return max(finished, key=lambda o: o.validation) if finished else None


def record_outcomes(grid, uri: str, experiment: str) -> list[TrialOutcome]:
    """Record in MLflow what the scheduler did: each stopped trial's point and pre-training runs (found by their
    ``trial_id`` tag) get ``status=stopped_early``, ``stopped_at_step=<n>`` and end FINISHED (a killed trial
    leaves them RUNNING); the pre-training run gets the metric values its live logging had not sent yet (from
    its metrics.jsonl). Every point run gets ``val/hmean_low`` (the selection figure beside the test figures)."""
    from retain_asd import tracking
    from retain_asd.train.launch import read_metrics

    outcomes = trial_outcomes(grid)
    for o in outcomes:
        if o.status not in ("finished", "stopped_early"):
            continue
        runs = tracking.experiment_runs(uri, experiment, f"tags.trial_id = '{o.trial_id}'")
        for run in runs:
            kind = run["tags"].get("kind")
            if kind == "point" and o.validation is not None:
                tracking.log_metrics_to(uri, run["run_id"], {VALIDATION: o.validation}, step=o.step)
            if o.status != "stopped_early" or kind not in ("point", "pretrain"):
                continue
            with tracking.mlflow_run(uri, experiment, "", run_id=run["run_id"]):
                tracking.set_tags({"status": "stopped_early", "stopped_at_step": o.step})
                if kind == "pretrain" and run["tags"].get("out_dir"):
                    tracking.backfill(uri, run["run_id"], read_metrics(Path(run["tags"]["out_dir"]) / "metrics.jsonl"))
    return outcomes


def write_best_config(grid, cfg: Config, path: str | Path) -> Path | None:
    """The best trial's config (`best_trial`: by ``val/hmean_low``) as a preset file, for ``--config PATH``: the
    base config with the trial's choices; None when no trial finished."""
    from retain_asd.config import dump_yaml

    best = best_trial(grid)
    if best is None:
        return None
    choices = {k: best.choices[k] for k in ("snr_range_db", "alpha", "beta")}
    return dump_yaml(trial_config(cfg, choices, name=trial_name(cfg.name, choices)), path)


# ---------------------------------------------------------------------------------------------------- summary
def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name if result.path else "?"  # run_trial_<id>_<n>_<choices>_<date>
    parts = name.split("_")
    return "_".join(parts[2:4]) if name.startswith("run_trial_") and len(parts) > 3 else name


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _status_text(o: TrialOutcome) -> str:
    return {"finished": "finished", "error": "ERROR", "no_result": "NO RESULT"}.get(
        o.status, f"stopped early at step {o.step}")


def summarize_sweep(grid, metric: str) -> tuple[str, int]:
    """(text, exit code) of a finished sweep: per trial its status (finished / stopped early at step n / ERROR),
    the validation figure it was selected on, the test figure ``metric`` (finished trials only) and its choices;
    then the best trial by validation (`best_trial`). Exit code 1 when any trial failed or none finished (a
    stopped trial is no failure); a clear line when every trial failed."""
    outcomes = trial_outcomes(grid)
    if not outcomes:
        return "the sweep ran no trials", 1

    def fig(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    lines = [f"{'trial':<14} {'status':<26} {'val/hmean_low':>13} {'test ' + metric:>17}  choices"]
    lines += [f"{o.trial_id:<14} {_status_text(o):<26} {fig(o.validation):>13} {fig(o.test.get(metric)):>17}  "
              f"{o.choices}" for o in outcomes]
    failed = [o for o in outcomes if o.status == "error"]
    stopped = [o for o in outcomes if o.status == "stopped_early"]
    best = best_trial(grid)
    if best is not None:
        lines.append(f"best by validation: {VALIDATION} = {best.validation:.4f} (test {metric} = "
                     f"{fig(best.test.get(metric)) or '?'}) with {best.choices}")
    if stopped:
        lines.append(f"{len(stopped)} of {len(outcomes)} trials stopped early by the scheduler (not failed)")
    if failed and len(failed) == len(outcomes):
        lines.append(f"all {len(outcomes)} trials failed; nothing to rank. First error ({failed[0].trial_id}): "
                     f"{failed[0].error}")
    elif failed:
        lines.append(f"{len(failed)} of {len(outcomes)} trials failed:")
        lines += [f"  {o.trial_id}: {o.error}" for o in failed]
    elif best is None:
        lines.append(f"no trial finished with a {VALIDATION} figure")
    return "\n".join(lines), 1 if failed or best is None else 0
