"""Worker loss and re-runs of a killed job: checkpoint completeness, run events, and `<out>/summary.json`.

    RunMonitor (Ray Train callback, in the controller)   <out>/ray/<name>/checkpoint_*/complete.json
      after_report: marks each persisted checkpoint        (`checkpoint.mark_complete`, written last)
      complete; records resumes, a divergence stop and   <out>/events.jsonl   one JSON object per event
      a stop for want of disk space
      after_exception: records a worker-group failure      (Ray Train then restarts the group from the
                                                           latest checkpoint, up to train.max_failures)
    resource_wait (Ray Train controller callback): bounds the time a worker group waits to be placed, at the start
      or after a lost node (train.resource_wait_s); past it the run stops with `ResourceWaitError`
    prepare_resume (driver, before a fit): removes incomplete and orphaned checkpoint folders and Ray's run
      snapshot, and returns the newest complete checkpoint, which the new fit starts from (`LoopConfig.resume_from`)
    write_summary (driver, at the end): steps, restarts, steps_lost, resumed_from_step, final_loss, ... (atomic)

With data.storage set the checkpoint folders are in an object store (`<data.storage>/runs/<out name>/<name>/`):
the marker, the cleaning and the resume go through `retain_asd.storage`; events and the summary stay in <out>.

Ray Train's own restore reads its run snapshot, which a killed driver may have left behind the folders on disk
(the issue-13 probe resumed from step 3 beside a complete step-6 folder); the marker is the record here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from retain_asd import fsio, runtime, storage
from retain_asd.train.checkpoint import DiskFullError, clean_checkpoints, folder_name, mark_complete
from retain_asd.train.guard import DivergenceError

log = logging.getLogger(__name__)

EVENTS = "events.jsonl"
SUMMARY = "summary.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def run_monitor(events_path: Path):
    """A Ray Train callback that marks checkpoints complete and logs run events (see the module doc). A worker
    failure records the newest step reported before it (`reached_step`): the steps after the checkpoint the
    group restarts from are done again (`summary`'s steps_lost)."""
    from ray.train import UserCallback

    class RunMonitor(UserCallback):
        reached_step = 0  # the newest step reported in this fit (the controller sees no other)

        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0] if metrics else {}
            self.reached_step = max(self.reached_step, int(first.get("step", 0)))
            if checkpoint is not None:  # persisted by every rank: the marker is the folder's last file
                try:
                    mark_complete(checkpoint.path, first["step"], checkpoint.filesystem)
                except (OSError, KeyError) as err:  # the run goes on; a re-run will not resume from this one
                    log.warning("%s: completeness marker not written (%s)", checkpoint.path, err)
            if "resumed_from_step" in first:
                _event(events_path, "resumed", step=first["resumed_from_step"])
            if "diverged" in first:
                _event(events_path, "diverged", message=first["diverged"])
            if "disk_full" in first:
                _event(events_path, "disk_full", message=first["disk_full"])

        def after_exception(self, run_context, worker_exceptions):
            _event(events_path, "worker_failure", reached_step=self.reached_step,
                   errors={rank: f"{type(e).__name__}: {e}"[:300] for rank, e in sorted(worker_exceptions.items())})

    return RunMonitor()


class ResourceWaitError(RuntimeError):
    """The worker group could not be placed within train.resource_wait_s (a lost node not replaced, or a cluster
    too small for train.num_workers x the resources per worker)."""


# Ray Train waits this long for one placement group (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, its default), then
# makes a new one, forever (FailureConfig.controller_failure_limit -1): attempts are at most this long.
PLACEMENT_ATTEMPT_S = 60.0


def placement_attempt_s(resource_wait_s: float) -> float:
    """One placement attempt: resource_wait_s split into equal attempts of at most PLACEMENT_ATTEMPT_S, so the
    wait ends at resource_wait_s (an attempt checks the clock only when it times out)."""
    return resource_wait_s / math.ceil(resource_wait_s / PLACEMENT_ATTEMPT_S)


def resource_wait(resource_wait_s: float, events_path: Path):
    """A Ray Train controller callback (in the controller, like `run_monitor`) that bounds the wait for resources.

    Ray Train 2.60's controller, after a worker-group failure (a node lost) or at the start, asks for a placement
    group and waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for it; on a timeout it asks again, without
    end. This sets that timeout to `placement_attempt_s` in the controller, times the wait from the first
    scheduling after the group last ran, and when it reaches `resource_wait_s` raises `ResourceWaitError`, which
    the controller does not retry: the fit ends with it (`launch._train` raises it on the driver).
    """
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import (
        ReschedulingState,
        RestartingState,
        RunningState,
        SchedulingState,
    )

    class ResourceWait(ControllerCallback):
        waiting_since: float | None = None

        def after_controller_start(self, train_run_context):
            os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(placement_attempt_s(resource_wait_s))

        def after_controller_state_update(self, previous_state, current_state):
            if isinstance(current_state, RunningState) or current_state.is_terminal():
                self.waiting_since = None
            elif isinstance(current_state, SchedulingState | RestartingState) and self.waiting_since is None:
                self.waiting_since = time.monotonic()
            elif isinstance(current_state, ReschedulingState) and self.waiting_since is not None:
                waited = time.monotonic() - self.waiting_since
                if waited >= resource_wait_s:
                    message = (f"the Ray Train worker group could not be placed for {waited:.0f} s "
                               f"(train.resource_wait_s = {resource_wait_s:g}): the cluster lacks the nodes or "
                               "resources for its workers "
                               "(a lost node not replaced?). Add nodes or raise train.resource_wait_s; the same "
                               "command resumes from the newest complete checkpoint")
                    _event(events_path, "resource_wait_exceeded", waited_s=round(waited, 1), message=message)
                    raise ResourceWaitError(message)

    return ResourceWait()


def find_resource_wait_error(err: BaseException) -> ResourceWaitError | None:
    """The `ResourceWaitError` a failed fit carries (Ray Train wraps it: ControllerError.controller_failure)."""
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if isinstance(e, ResourceWaitError):
            return e
        if e is not None:
            todo += [getattr(e, "controller_failure", None), e.__cause__]
    return None


def _event(path: Path, event: str, **fields) -> None:
    fsio.append_line(path, json.dumps({"event": event, **fields}, default=str))


def read_events(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / EVENTS
    return fsio.read_jsonl(path, fix="delete it (it only feeds summary.json)") if path.is_file() else []


def prepare_resume(out_dir: str | os.PathLike, name: str, keep: int,
                   checkpoint_root: str | os.PathLike | None = None) -> tuple[int, Path | str] | None:
    """Before a fit: clean the run folder and return (step, folder) of the newest complete checkpoint, or None.

    `checkpoint_root`: Ray Train's storage path, default ``<out>/ray``; a URI keeps the run in an object store
    (the folder returned is then a URI). Ray's run snapshot is removed too, so Ray Train does not restore its
    own (possibly older) idea of the latest checkpoint: the new fit starts from the returned folder, later
    restarts from what it reports.
    """
    run_dir = storage.as_location(storage.join(checkpoint_root or Path(out_dir) / "ray", name))
    runtime.reap_workers_of_dead_clusters()  # a killed driver's Train controller may still write its snapshot
    latest, removed = clean_checkpoints(run_dir, keep)
    for folder in removed:
        _event(Path(out_dir) / EVENTS, "removed_checkpoint", folder=folder_name(folder))
    storage.remove(storage.join(run_dir, RAY_SNAPSHOT))
    return latest


def fit_started(out_dir: Path) -> int:
    """The number of events before a fit starts (`raise_if_diverged` reads only the later ones)."""
    return len(read_events(out_dir))


def raise_if_diverged(out_dir: Path, since: int) -> None:
    for row in read_events(out_dir)[since:]:
        if row["event"] == "diverged":
            raise DivergenceError(row["message"])


def raise_if_disk_full(out_dir: Path, since: int) -> None:
    """The workers stopped before a checkpoint that had no room (`checkpoint.checkpoint_room`)."""
    for row in read_events(out_dir)[since:]:
        if row["event"] == "disk_full":
            raise DiskFullError(row["message"])


def fit_failed(out_dir: Path) -> None:
    """Record that a fit ended in an error (its last worker failure was not survived)."""
    _event(Path(out_dir) / EVENTS, "fit_failed")


def summary(out_dir: str | os.PathLike, *, name: str, status: str, step: int, total_steps: int,
            skipped_steps: int, history: list[dict], checkpoint: str | None, student: str | None,
            message: str | None = None) -> dict:
    """The run summary from the events and the metric history of this out dir (every fit of it)."""
    events = read_events(out_dir)
    failures = sum(e["event"] == "worker_failure" for e in events)
    restarts, steps_lost = restarts_and_steps_lost(events)
    losses = [row["loss"] for row in history if isinstance(row.get("loss"), (int, float)) and row["step"] <= step]
    return {
        "name": name, "status": status,  # completed | stopped | diverged
        "steps": step - skipped_steps,  # optimiser steps applied
        "total_steps": total_steps, "skipped_steps": skipped_steps,
        "restarts": restarts,  # worker-group restarts survived
        "worker_failures": failures,
        "steps_lost": steps_lost,  # steps reported before a worker-group failure and done again after its restart
        "resumed_from_step": [e["step"] for e in events if e["event"] == "resumed"],
        "final_loss": losses[-1] if losses and math.isfinite(losses[-1]) else None,
        "checkpoint": checkpoint, "student": student, "message": message,
    }


def restarts_and_steps_lost(events: list[dict]) -> tuple[int, int]:
    """(worker-group restarts survived, steps done again after them) from the run events.

    A worker failure not followed by its fit's failure was survived; the restart resumes from a checkpoint, and
    the steps reported between that checkpoint and the failure (`reached_step`) are done again. Counted at report
    granularity (train.log_every, train.checkpoint_every): steps done after the last report are not seen."""
    failures = fatal = steps_lost = 0
    reached = None  # the step reached before the failures not yet resumed from
    for e in events:
        if e["event"] == "worker_failure":
            failures, reached = failures + 1, max(reached or 0, e.get("reached_step", 0))
        elif e["event"] == "resumed" and reached is not None:
            steps_lost, reached = steps_lost + max(reached - e["step"], 0), None
        elif e["event"] == "fit_failed":  # the fit's last failure was not survived (when it was a worker's)
            fatal, reached = fatal + (reached is not None), None
    return failures - fatal, steps_lost


def write_summary(out_dir: str | os.PathLike, values: dict) -> Path:
    return fsio.write_json(Path(out_dir) / SUMMARY, values, indent=2)


def summary_line(s: dict) -> str:
    """One line for the console: state, steps, restarts, resumes, final loss."""
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4g}"
    resumed = ",".join(map(str, s["resumed_from_step"])) or "-"
    return (f"pretrain {s['name']}: {s['status']}, {s['steps']}/{s['total_steps']} steps applied, "
            f"{s['skipped_steps']} skipped, {s['restarts']} restart(s) ({s.get('steps_lost', 0)} steps done again), "
            f"resumed from step {resumed}, "
            f"final loss {loss}")
