"""The Table-2 study: every row of the paper's Table 2, over several seeds, from one initial encoder.

    run_study(cfg, out_dir)
      -> the initial encoder (model.checkpoint, or the cached stand-in foundation encoder)   once
      -> the pre-training corpus (pre-training world) and the evaluation sets (evaluation world) once
      -> for each row x seed:  <out>/rows/<row>/seed<k>/, one experiment point (`point.run_point`)
           pretrain (Ray Train; `frozen` trains nothing)        pretrain/
           evaluate on the 7 SNRs x 3 conditions (kNN)          evaluate/
           MLflow run `point-<row>-seed<k>` with its pretrain and evaluate runs nested, all tagged study=<name>
           result.json (written last: a finished cell of the study; a re-run skips it)
      -> summary: `compare_experiment` over the study's MLflow runs (what `retain-asd compare` prints): mean and
         95% interval over seeds per cell, hmean{-10,-5,0} and All, raw and DN; <out>/summary/comparison.{md,csv},
         plots, one MLflow run `summary`

Rows are presets (`retain_asd/presets/<preset>.yaml`) whose `objective` and `mixing` sections are merged
over the study config; a row is named by its preset, or `label:preset` (e.g. the demo's
`tagging_mixture:tagging_mixture_pm5`). A seed sets `train.seed` and `mixing.seed` (student init of the
heads, batch order, pairings, SNR draws); the initial encoder and the evaluation sets are the same for every
row and seed (paper Sec. 4: every method continues from the same BEATs iter3). `frozen` is deterministic,
so its interval is zero.

A plain loop over configs (the rows run one after another, each a Ray Train run using every worker): on
one machine, Tune's trial scheduling would add nothing; `tune/` sweeps around it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retain_asd import fsio
from retain_asd.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    from_dict,
    merge_dicts,
    read_yaml,
    to_dict,
    uses_foundation,
)

log = logging.getLogger(__name__)

TABLE2_ROWS = ("frozen", "denoise", "denoise_linear_mixup", "denoise_snr_mixup", "tagging_pm5", "mixture_pm5",
               "tagging_mixture_pm5", "tagging_0db", "mixture_0db", "tagging_mixture_0db")
ROW_SECTIONS = ("objective", "mixing")  # what a row preset may change; the rest is the study's
RESULT = "result.json"
STUDY_VERSION = 1


# ---------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    label: str  # the table's row name
    preset: str  # retain_asd/presets/<preset>.yaml


def parse_rows(specs: Sequence[str]) -> list[Row]:
    """`preset` or `label:preset` -> Rows; unknown presets and duplicate labels are ConfigErrors."""
    rows = []
    for spec in specs:
        label, _, preset = spec.partition(":") if ":" in spec else (spec, "", spec)
        if not (PRESETS_DIR / f"{preset}.yaml").is_file():
            raise ConfigError(f"study.rows: {spec!r}: no preset {preset!r} in {PRESETS_DIR}")
        if not label or any(c in label for c in "/ "):
            raise ConfigError(f"study.rows: {spec!r}: a row label must be non-empty, without '/' or spaces")
        rows.append(Row(label, preset))
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"study.rows: the row {dup[0]!r} appears twice")
    return rows


def row_config(cfg: Config, row: Row, seed: int) -> Config:
    """The study config with the row preset's objective / mixing sections and the seed."""
    preset = read_yaml(PRESETS_DIR / f"{row.preset}.yaml")
    over = {k: v for k, v in preset.items() if k in ROW_SECTIONS}
    values = merge_dicts(to_dict(cfg), over)
    values = merge_dicts(values, {"name": f"{cfg.name}-{row.label}-seed{seed}", "train": {"seed": seed},
                             "mixing": {"seed": seed}})
    return from_dict(values)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class CellResult:
    """One row x seed: the official score per (condition, SNR) and the Table-2 harmonic means."""

    row: str
    seed: int
    scores: dict[tuple[str, int], float]  # (condition, snr_db) -> official score in [0, 1]
    hmean_low: float
    hmean_all: float
    run_id: str | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    skipped: bool = False  # found finished on disk (resume)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": STUDY_VERSION, "row": self.row, "seed": self.seed,
                "scores": [[c, s, v] for (c, s), v in sorted(self.scores.items())],
                "hmean_low": self.hmean_low, "hmean_all": self.hmean_all, "run_id": self.run_id,
                "train_s": self.train_s, "eval_s": self.eval_s, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> CellResult:
        return cls(d["row"], int(d["seed"]), {(c, int(s)): float(v) for c, s, v in d["scores"]},
                   float(d["hmean_low"]), float(d["hmean_all"]), d.get("run_id"), float(d.get("train_s", 0)),
                   float(d.get("eval_s", 0)), True, d.get("extra", {}))


def read_cell(path: Path) -> CellResult | None:
    """A finished row x seed, or None (missing, torn or of another study version: it is run again)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return CellResult.from_json(data) if data.get("version") == STUDY_VERSION else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------- summary
def study_metric(cfg: Config) -> str:
    """The ranking figure of `compare_experiment` that makes eval.primary's table the primary one."""
    return "hmean_low_dn" if cfg.eval.primary == "dn" else "hmean_low"


def compact_table(comparison, order: Sequence[str] | None = None) -> str:
    """The console form of a `compare_experiment` result: one line per row, Table-2 order, with hmean{-10,-5,0}
    and All of the primary variant, then of the other (the same numbers `retain-asd compare` prints)."""
    from retain_asd.eval.report import plus_minus

    primary = comparison.primary
    other = "raw" if primary == "dn" else "dn"
    suffix = {"raw": "", "dn": "_dn"}
    rows = {r.name: r for r in comparison.rows}
    names = [n for n in (order or []) if n in rows] + [n for n in rows if n not in (order or [])]
    width = max([len("row")] + [len(n) for n in names])
    head = (f"{'row':<{width}}  seeds  {primary + ' hmean{-10,-5,0}':>19}  {primary + ' All':>15}  "
            f"{other + ' hmean{-10,-5,0}':>19}  {other + ' All':>15}")
    lines = [head]
    for n in names:
        r = rows[n]
        cells = [plus_minus(r.estimates.get(f"hmean_{k}{suffix[v]}")) for v in (primary, other) for k in ("low", "all")]
        lines.append(f"{n:<{width}}  {len(r.seeds):>5}  {cells[0]:>19}  {cells[1]:>15}  {cells[2]:>19}  "
                     f"{cells[3]:>15}" + ("" if r.status == "ok" else f"  ({r.status})"))
    return "\n".join(lines)


def plot_hmeans(comparison, order: Sequence[str], path: Path) -> Path:
    """hmean{-10,-5,0} and All of the primary variant per row with 95% intervals (the answer at a glance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = "_dn" if comparison.primary == "dn" else ""
    rows = {r.name: r for r in comparison.rows}
    names = [n for n in order if n in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    for i, (key, label) in enumerate(((f"hmean_low{s}", "hmean{-10,-5,0}"), (f"hmean_all{s}", "All"))):
        est = [rows[n].estimates.get(key) for n in names]
        means = [100 * e.mean if e else math.nan for e in est]
        halves = [0.0 if (e is None or math.isnan(e.half_width)) else 100 * e.half_width for e in est]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=halves, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(f"official score x100 ({comparison.primary})")
    finite = [m for m in means if not math.isnan(m)] or [50.0]
    ax.set_ylim(max(0.0, min(finite) - 10), None)
    ax.axhline(50.0, color="grey", lw=0.8, ls=":")  # chance
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        return fsio.savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the study
Say = Callable[[str], None]


@dataclass
class StudyResult:
    out_dir: Path
    cells: list[CellResult]
    comparison: object  # retain_asd.eval.compare.Comparison: the Table-2 layout over seeds, from MLflow
    table: str  # its console form (`compact_table`)
    tracking_uri: str
    experiment: str
    summary_run_id: str | None
    table_path: Path


def study_plan(cfg: Config) -> list[tuple[Row, int]]:
    """(row, seed) pairs in run order: seed-major, so an interrupted study has every row at a few seeds."""
    rows = parse_rows(cfg.study.rows)
    return [(row, seed) for seed in cfg.study.seeds for row in rows]


def check_study(cfg: Config) -> None:
    """Every row's config, before any work (a bad preset or layer fails here, not an hour in)."""
    from retain_asd.train.objectives import objective_terms

    if not cfg.study.seeds:
        raise ConfigError("study.seeds: empty; give at least one seed")
    for row, seed in study_plan(cfg):
        rc = row_config(cfg, row, seed)
        objective_terms(rc.objective.name)


def run_study(cfg: Config, out_dir: str | os.PathLike, *, evaluation_sets=None, corpus=None,
              say: Say = print, progress: bool | None = None) -> StudyResult:
    """Run (or resume) the study of `cfg` into `out_dir` and write its summary. Ray must be initialised.

    `evaluation_sets`: built `EvalSets` of the evaluation world (default: built from the config).
    `corpus`: the ingested pre-training corpus (default: from the config). `say`: one line per stage.
    """
    from retain_asd import tracking
    from retain_asd.config import dump_yaml
    from retain_asd.train.launch import initial_encoder

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    check_study(cfg)
    dump_yaml(cfg, out_dir / "study.yaml")
    plan = study_plan(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    experiment = cfg.tracking.experiment

    t0 = time.perf_counter()
    if cfg.model.checkpoint or uses_foundation(cfg):
        init = initial_encoder(cfg, progress=progress)
        say(f"initial encoder: {init} ({time.perf_counter() - t0:.0f} s)")
    else:  # model.init = random: smoke tests only, each run draws its own random encoder
        say("initial encoder: RANDOM (model.init = random: a smoke run, not a study)")
    t0 = time.perf_counter()
    if corpus is None:  # both worlds, guarded: no machine type, clip or noise recording shared (Sec. 4.1)
        from retain_asd.corpus.ingest import corpora_from_config

        corpus, _, report = corpora_from_config(cfg)
        say(f"protocol: {report.describe(limit=1)}")
    say(f"pre-training corpus: {corpus.root} ({corpus.vocab.num_machine} machine + {corpus.vocab.num_noise} "
        f"noise classes, {time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    if evaluation_sets is None:
        from retain_asd.eval.evalsets import evalsets_from_config

        evaluation_sets = evalsets_from_config(cfg, say=say)  # from the evaluation corpus only
    from retain_asd.eval.evalsets import scored_on_line

    say(f"evaluation sets: {scored_on_line(evaluation_sets.scored_on())}")
    say(f"  {evaluation_sets.root} ({len(evaluation_sets.machines)} machines "
        f"{', '.join(evaluation_sets.machines)}; {len(cfg.eval.conditions)} conditions x "
        f"{len(evaluation_sets.snrs_db)} SNRs, {time.perf_counter() - t0:.0f} s)")
    say(testbed_check(cfg, evaluation_sets, out_dir / "testbed"))

    cells: list[CellResult] = []
    for i, (row, seed) in enumerate(plan, 1):
        where = out_dir / "rows" / row.label / f"seed{seed}"
        done = read_cell(where / RESULT)
        if done is not None:
            say(f"[{i}/{len(plan)}] {row.label} seed {seed}: done earlier, skipped "
                f"(hmean_low {100 * done.hmean_low:.2f}, hmean_all {100 * done.hmean_all:.2f})")
            cells.append(done)
            continue
        cell = study_point(cfg, row, seed, where, corpus=corpus, evaluation_sets=evaluation_sets, uri=uri,
                        experiment=experiment)
        cells.append(cell)
        say(f"[{i}/{len(plan)}] {row.label} seed {seed}: hmean_low {100 * cell.hmean_low:.2f}, hmean_all "
            f"{100 * cell.hmean_all:.2f} (train {cell.train_s:.0f} s, eval {cell.eval_s:.0f} s)")

    # The table comes from the MLflow runs, by the function `retain-asd compare` uses: the same numbers.
    from retain_asd.eval.compare import compare_experiment

    summary = out_dir / "summary"
    order = [r.label for r in parse_rows(cfg.study.rows)]
    comparison = compare_experiment(experiment, tracking_uri=uri, out_dir=summary, runs=f"tags.study = '{cfg.name}'",
                                    metric=study_metric(cfg), log_run=False)
    plot_hmeans(comparison, order, summary / "hmeans.png")
    fsio.write_json(summary / "cells.json", [c.to_json() for c in cells], indent=1)
    run_id = _log_summary(uri, experiment, cfg, comparison, summary)
    table = compact_table(comparison, order)
    return StudyResult(out_dir, cells, comparison, table, uri, experiment, run_id, summary / "comparison.md")


def testbed_check(cfg: Config, evaluation_sets, out_dir: Path) -> str:
    """The Table-3 check of the initial encoder before any row (the premise the rows test: its oracle embedding
    mixture beats its wave mixture at Mismatch 0 dB), at 0 dB only (`retain-asd table3` gives every SNR);
    <out>/testbed/table3.{md,json}. One console line."""
    from retain_asd.eval.analyses import TESTBED_CELL
    from retain_asd.eval.builder import table3_from_config
    from retain_asd.experiments.checkpoints import resolve_checkpoint

    condition, snr_db = TESTBED_CELL
    if not (cfg.model.checkpoint or uses_foundation(cfg)):
        return "testbed: not run (model.init = random: no initial encoder to check)"
    if condition not in cfg.eval.conditions or snr_db not in evaluation_sets.snrs_db:
        return f"testbed: not run (the evaluation sets have no {condition} set at {snr_db:g} dB)"
    t0 = time.perf_counter()
    frozen = resolve_checkpoint("frozen", cfg, out_dir)
    table, _ = table3_from_config(cfg, [frozen], out_dir, snrs_db=[snr_db], resamples=200, track=False,
                                  sets=evaluation_sets)
    return f"{table.testbed_line()} [{time.perf_counter() - t0:.0f} s; {out_dir / 'table3.md'}]"


def study_point(cfg: Config, row: Row, seed: int, where: Path, *, corpus, evaluation_sets, uri: str,
                experiment: str) -> CellResult:
    """One row at one seed as an experiment point (`run_point`: pre-train, evaluate, log), then result.json (last)."""
    from retain_asd import tracking
    from retain_asd.experiments.point import run_point

    rc = row_config(cfg, row, seed)
    tags = {"study": cfg.name, "preset": row.label, "seed": str(seed)}  # the runs `retain-asd compare` groups
    if not tracking.read_run_pointer(where):  # the same cell of an earlier study in this store, another folder
        tracking.delete_runs(uri, experiment, tags)
    point = run_point(rc, where, tracking_uri=uri, experiment=experiment, label=row.label,
                      tags=tags | {"row_preset": row.preset}, corpus=corpus, evaluation_sets=evaluation_sets,
                      layers=cfg.study.extra_layers)
    last = point.pretrained.metrics[-1] if point.pretrained.metrics else {}
    extra = {"steps": point.steps, "primary_layer": point.evaluation.primary_layer,
             "primary": point.evaluation.primary, "final_loss": last.get("loss"), "objective": rc.objective.name}
    cell = CellResult(row.label, seed, point.scores, point.hmean_low, point.hmean_all, point.run_id, point.train_s,
                      point.eval_s, extra=extra)
    fsio.write_text(where / RESULT, json.dumps(cell.to_json(), indent=1))  # last: the cell is finished
    return cell


def _log_summary(uri: str, experiment: str, cfg: Config, comparison, summary: Path) -> str:
    """The summary run (replaced at each call, so a resumed study keeps one): per-row means and half widths of
    the hmeans, the comparison's markdown, CSV and plots."""
    from retain_asd import tracking

    tracking.delete_runs(uri, experiment, {"kind": "study_summary", "study": cfg.name})
    metrics = {}
    for row in comparison.rows:
        for key, e in row.estimates.items():
            if key.startswith("hmean_") and "/" not in key and not math.isnan(e.mean):
                metrics[f"{row.name}/{key}"] = e.mean
                if not math.isnan(e.half_width):
                    metrics[f"{row.name}/{key}_ci95"] = e.half_width
    with tracking.mlflow_run(uri, experiment, "summary", params={"study": to_dict(cfg.study)},
                             tags={"kind": "study_summary", "study": cfg.name}, storage=cfg.data.storage) as run:
        tracking.log_metrics(metrics)
        tracking.log_artifacts(summary, artifact_path="summary")
        return run.info.run_id


__all__ = ["CellResult", "Row", "StudyResult", "TABLE2_ROWS", "check_study", "compact_table", "parse_rows",
           "read_cell", "row_config", "run_study", "study_metric", "study_plan", "study_point", "testbed_check"]
