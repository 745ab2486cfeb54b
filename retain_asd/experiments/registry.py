"""A sweep trial's student in the MLflow Model Registry, as a version of ``retain-asd-<tracking.experiment>``.

A trial is an experiment point in ``<sweep out>/trials/<trial id>/`` (`tune.sweep.run_trial`): its student is
``pretrain/student_beats.pt``, logged as an artifact of its pre-training run (``pretrain/mlflow_run.json``), the
child of the trial's point run. `register_trial_student` registers that file (`tracking.register_student`) with the
trial's choices, config name, trial id and validation score as tags. The trial is the sweep's outcome of it
(`tune.sweep.TrialOutcome`: ``trial_id``, ``choices``, ``validation``, ``test``), the one `tune.sweep.best_trial`
selects on validation; nothing here imports Ray or Tune.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from retain_asd import tracking
from retain_asd.config import Config, load_config
from retain_asd.train.validate import METRIC as VALIDATION

log = logging.getLogger(__name__)

CHOICES = ("snr_range_db", "alpha", "beta")  # what a trial chose (tune.space)


def register_trial_student(cfg: Config, trial, sweep_dir: str | os.PathLike,
                           alias: str | None = "best") -> tracking.RegisteredStudent:
    """Register the student of `trial` (the sweep's outcome of a finished trial in `sweep_dir`) in the registry of
    `cfg`'s tracking store, as a new version of ``retain-asd-<cfg.tracking.experiment>`` that `alias` then points at.

    Tags: ``preset`` (the trial's config name), ``choices`` (JSON), ``trial_id``, the sweep's ``tune.metric`` with
    the trial's test value, and ``val/hmean_low`` (the selection figure; else the last value its pre-training run
    logged; absent when nothing validated). The version's source is the student among its pre-training run's
    artifacts (uploaded when missing).
    """
    trial_id = str(trial.trial_id or "")
    point_dir = Path(sweep_dir).resolve() / "trials" / trial_id
    pretrain_dir = point_dir / "pretrain"
    student = pretrain_dir / "student_beats.pt"
    run_id = tracking.read_run_pointer(pretrain_dir).get("run_id") or tracking.read_run_pointer(point_dir).get("run_id")
    if not trial_id or not student.is_file() or not run_id:
        raise FileNotFoundError(f"{student}: trial {trial_id or '?'} left no exported student logged to an MLflow "
                                f"run ({tracking.RUN_POINTER} beside it); nothing to register")
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    tags = {"preset": load_config(path=pretrain_dir / "config.yaml").name, "trial_id": trial_id,
            "choices": json.dumps({k: trial.choices[k] for k in CHOICES if k in (trial.choices or {})})}
    test = trial.test or {}
    if isinstance(test.get(cfg.tune.metric), int | float):
        tags[cfg.tune.metric] = test[cfg.tune.metric]
    score = trial.validation
    score = score if isinstance(score, int | float) else tracking.run_metrics(uri, run_id).get(VALIDATION)
    if score is not None:
        tags[VALIDATION] = score
    return tracking.register_student(uri, cfg.tracking.experiment, run_id, student, tags=tags, alias=alias)


def register_best_student(cfg: Config, trial, sweep_dir: str | os.PathLike) -> tracking.RegisteredStudent | None:
    """`register_trial_student` at the end of a sweep (alias ``best``): None when there is no trial, and a warning
    instead of a failed sweep when the registry cannot take it (its trials and best.yaml are done)."""
    if trial is None:
        return None
    try:
        return register_trial_student(cfg, trial, sweep_dir)
    except Exception as err:
        message = (f"the best trial's student was not registered ({tracking.short_error(err)}); its trials, runs and "
                   "best.yaml are complete: the same sweep run again registers it (finished trials are not repeated)")
        warnings.warn(message, stacklevel=2)
        log.warning(message)
        return None
