"""One experiment point: pre-train (if the objective trains anything) -> evaluate -> log, written once.

The demo, the study (one point per row x seed) and every sweep trial call `run_point`; nothing else chains
pre-training and evaluation. Its MLflow layout, the same for every caller:

    point-<label>-seed<k>           kind=point     config as params; hmean_{low,all}[_dn], train_s, eval_s, steps
      pretrain-<label>-seed<k>      kind=pretrain  nested: the training curve, live; config.yaml, student, summary
      evaluate-<label>-seed<k>      kind=evaluate  nested: every figure, tables, plots, score files

All three carry ``preset=<label>``, ``seed`` and the caller's `tags` (``study``, ``trial_id``, ...);
`retain-asd compare` groups the evaluate runs by (preset, seed). On disk: ``<out>/pretrain/`` (as
`train.launch.pretrain` writes it), ``<out>/evaluate/`` and ``<out>/mlflow_run.json`` (the point's run: a re-run
of an interrupted point continues it and replaces its evaluate run).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from retain_asd import fsio, tracking
from retain_asd.config import Config, to_dict
from retain_asd.eval.builder import ResolvedCheckpoint, evaluate_from_config
from retain_asd.eval.results import EvalResult
from retain_asd.experiments.checkpoints import resolve_checkpoint
from retain_asd.train.launch import PretrainResult, pretrain

HEADLINE = ("hmean_all", "hmean_low", "hmean_all_dn", "hmean_low_dn")  # also on the point's run (what Tune reads)


@dataclass(frozen=True)
class PointResult:
    """What one point gives: the primary figure per (condition, SNR), the Table-2 hmeans, its runs and files."""

    label: str
    seed: int
    out_dir: Path
    scores: dict[tuple[str, int], float]  # (condition, snr_db) -> official score of eval.primary, in [0, 1]
    hmean_low: float  # hmean{-10,-5,0} over every condition, eval.primary
    hmean_all: float
    figures: dict[str, float]  # HEADLINE: raw and DN hmeans
    steps: int  # optimiser steps (0: the objective trains nothing, the initial encoder is scored frozen)
    train_s: float
    eval_s: float
    student_path: Path
    run_id: str | None  # the point's MLflow run; its children below
    pretrain_run_id: str | None
    evaluate_run_id: str | None
    pretrained: PretrainResult
    evaluation: EvalResult


def run_point(cfg: Config, out_dir: str | os.PathLike, *, tracking_uri: str | None = None,
              experiment: str | None = None, parent_run_id: str | None = None, label: str | None = None,
              tags: Mapping[str, str] | None = None, corpus=None, protocol=None, evaluation_sets=None,
              layers: Sequence[int] = (), callbacks: Sequence = ()) -> PointResult:
    """Pre-train `cfg` (resumes; `frozen` trains nothing), score the student on the eval sets, log the point.

    `tracking_uri` / `experiment`: the MLflow store and experiment (default: the config's tracking section);
    `parent_run_id`: nest the point's run under that run. `label`: the point's name in runs and tables (default
    cfg.name); `tags`: on every run of the point. `corpus` (+ its leakage-guard `protocol` report) and
    `evaluation_sets`: built ones to reuse (default: from the config). `layers`: scored besides eval.layer.
    `callbacks`: Ray Train callbacks for the pre-training (a sweep trial forwards its validation reports to Ray
    Tune with one, so a scheduler can stop it before the evaluation). Ray must be initialised.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri, cfg.data.work_dir)
    experiment = experiment or cfg.tracking.experiment
    if (uri, experiment) != (cfg.tracking.tracking_uri, cfg.tracking.experiment):  # the children log there too
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri,
                                                                     experiment=experiment))
    label = label or cfg.name
    seed = cfg.train.seed
    tags = {"preset": label, "seed": str(seed), **(tags or {})}
    run_id = tracking.live_run_id(uri, tracking.read_run_pointer(out_dir).get("run_id"))
    if run_id is None:  # a new point run: children of an earlier one are not continued under it
        (out_dir / "pretrain" / tracking.RUN_POINTER).unlink(missing_ok=True)
    name = tracking.run_name("point", label, seed)
    with tracking.mlflow_run(uri, experiment, name, params=None if run_id else to_dict(cfg),
                             tags={"kind": "point", "objective": cfg.objective.name, **tags}, run_id=run_id,
                             parent_run_id=parent_run_id, storage=cfg.data.storage) as run:
        fsio.write_json(out_dir / tracking.RUN_POINTER, {"run_id": run.info.run_id, "tracking_uri": uri,
                                                         "experiment": experiment})
        for earlier in tracking.child_runs(uri, experiment, run.info.run_id, kind="evaluate"):
            tracking.delete_run(uri, earlier["run_id"])  # an interrupted point's: one evaluation per point

        t0 = time.perf_counter()
        trained = pretrain(cfg, out_dir / "pretrain", corpus=corpus, protocol=protocol, tags=tags,
                           callbacks=callbacks)
        train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        (out_dir / "evaluate").mkdir(exist_ok=True)
        if trained.step == 0:  # nothing trained: the initial encoder, scored as the frozen SSL baseline
            checkpoint = resolve_checkpoint("frozen", cfg, out_dir / "evaluate")._replace(name=label)
        else:
            checkpoint = ResolvedCheckpoint(label, str(trained.student_path), False)
        scored = {"pretrain_run_id": trained.mlflow_run_id} if trained.mlflow_run_id else {}  # frozen ones too
        (result,) = evaluate_from_config(cfg, [checkpoint], out_dir / "evaluate", layers=list(layers),
                                         sets=evaluation_sets, tags=tags | scored)
        eval_s = time.perf_counter() - t0

        figures = {k: v for k, v in result.metrics().items() if k in HEADLINE}
        tracking.log_metrics({**figures, "train_s": train_s, "eval_s": eval_s, "steps": trained.step})
        dn = result.primary == "dn"  # eval.primary: the reported figure (DN, as the paper's Table 2, or raw)
        overall = result.table2(domain_norm=dn)[-1]
        return PointResult(label, seed, out_dir, result.official_by_set(domain_norm=dn), overall.hmean_low,
                           overall.hmean_all, figures, trained.step, train_s, eval_s, trained.student_path,
                           run.info.run_id, trained.mlflow_run_id, result.run_id, trained, result)
