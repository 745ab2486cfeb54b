"""The Table-2 study: every row of the paper's Table 2, over several seeds, from one initial encoder.

    run_study(cfg, out_dir)
      -> the initial encoder (model.checkpoint, or the cached stand-in foundation encoder)   once
      -> the pre-training corpus (pre-training world) and the evaluation sets (evaluation world) once
      -> for each row x seed:  <out>/rows/<row>/seed<k>/
           pretrain (Ray Train; `frozen` trains nothing)        pretrain/
           evaluate on the 7 SNRs x 3 conditions (kNN)          evaluate/
           one MLflow run `<row>/seed<k>` (config, metrics, tables)
           result.json (written last: a finished cell of the study; a re-run skips it)
      -> summary: mean and 95% interval over seeds per cell, hmean_low and hmean_all (Table-2 layout),
         <out>/summary/table2.{md,csv}, plots, one MLflow run `summary`

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
    _merge,
    _read_yaml,
    from_dict,
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
    preset = _read_yaml(PRESETS_DIR / f"{row.preset}.yaml")
    over = {k: v for k, v in preset.items() if k in ROW_SECTIONS}
    values = _merge(to_dict(cfg), over)
    values = _merge(values, {"name": f"{cfg.name}-{row.label}-seed{seed}", "train": {"seed": seed},
                             "mixing": {"seed": seed}})
    return from_dict(values)


# ---------------------------------------------------------------------------------------------------- statistics
def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval of the mean); half-width 0 for one value or equal values."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), 0.0
    import scipy.stats

    sem = float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()), float(scipy.stats.t.ppf(0.5 + level / 2, len(x) - 1) * sem)


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
@dataclass(frozen=True)
class StudyTable:
    """Mean and 95% interval over seeds per row and column (official score x100)."""

    columns: list[str]  # "<condition>/snr_<dB>" ..., "hmean_low", "hmean_all"
    rows: dict[str, dict[str, tuple[float, float, int]]]  # row -> column -> (mean, half-width, seeds)

    def markdown(self, digits: int = 2) -> str:
        head = ["row"] + [c.replace("/snr_", " ") + (" dB" if "/snr_" in c else "") for c in self.columns]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(self.columns)]
        for row, cells in self.rows.items():
            lines.append("| " + " | ".join([row] + [fmt_cell(cells.get(c), digits) for c in self.columns]) + " |")
        return "\n".join(lines) + "\n"

    def compact(self, digits: int = 2) -> str:
        """The console form: one line per row with hmean_low and hmean_all (mean +- 95% half-width, seeds)."""
        width = max([len("row")] + [len(r) for r in self.rows])
        lines = [f"{'row':<{width}}  {'hmean_low':>15}  {'hmean_all':>15}  seeds"]
        for row, cells in self.rows.items():
            low, all_ = cells.get("hmean_low"), cells.get("hmean_all")
            n = (low or all_ or (0, 0, 0))[2]
            lines.append(f"{row:<{width}}  {fmt_cell(low, digits):>15}  {fmt_cell(all_, digits):>15}  {n}")
        return "\n".join(lines)

    def csv_rows(self) -> list[list]:
        header = ["row", "seeds"] + [f"{c}{s}" for c in self.columns for s in ("", "_ci95")]
        out = [header]
        for row, cells in self.rows.items():
            n = max((v[2] for v in cells.values()), default=0)
            line: list = [row, n]
            for c in self.columns:
                m, h, _ = cells.get(c, (math.nan, math.nan, 0))
                line += [round(m, 4), round(h, 4)]
            out.append(line)
        return out


def fmt_cell(cell: tuple[float, float, int] | None, digits: int = 2) -> str:
    if cell is None or math.isnan(cell[0]):
        return "–"
    mean, half, n = cell
    return f"{mean:.{digits}f}" if n <= 1 else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarise(cells: Sequence[CellResult], row_order: Sequence[str] | None = None) -> StudyTable:
    """The Table-2 layout over seeds: per (condition, SNR) cell and for hmean_low / hmean_all, the mean over
    seeds of each seed's figure (the hmeans are computed per seed, then averaged), x100."""
    by_row: dict[str, list[CellResult]] = {}
    for c in cells:
        by_row.setdefault(c.row, []).append(c)
    order = [r for r in (row_order or []) if r in by_row] + [r for r in by_row if r not in (row_order or [])]
    keys = sorted({k for c in cells for k in c.scores}, key=lambda k: (_condition_rank(k[0]), k[1]))
    columns = [f"{c}/snr_{s}" for c, s in keys] + ["hmean_low", "hmean_all"]
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for row in order:
        runs = by_row[row]
        out = {}
        for key, col in zip(keys, columns):
            values = [100 * r.scores[key] for r in runs if key in r.scores]
            out[col] = (*mean_interval(values), len(values))
        for col in ("hmean_low", "hmean_all"):
            values = [100 * getattr(r, col) for r in runs]
            out[col] = (*mean_interval(values), len(values))
        table[row] = out
    return StudyTable(columns, table)


def _condition_rank(condition: str) -> int:
    order = ("factory_a", "factory_b", "mismatch")
    return order.index(condition) if condition in order else len(order)


def plot_study(table: StudyTable, path: Path) -> Path:
    """Score vs SNR per condition, one line per row with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(c.split("/")[0] for c in table.columns if "/snr_" in c))
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.2 * len(conditions), 3.4), sharey=True, squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        for row, cells in table.rows.items():
            pts = sorted((int(c.split("snr_")[1]), *cells[c][:2]) for c in table.columns
                         if c.startswith(f"{condition}/snr_"))
            if pts:
                xs, ms, hs = zip(*pts)
                ax.errorbar(xs, ms, yerr=hs, marker="o", ms=3, capsize=2, label=row)
        ax.set_title(condition)
        ax.set_xlabel("SNR (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("official score (x100)")
    axes[0][-1].legend(fontsize="x-small")
    fig.tight_layout()
    try:
        return fsio.savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def plot_hmeans(table: StudyTable, path: Path) -> Path:
    """hmean_low and hmean_all per row with 95% intervals (the study's answer at a glance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table.rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    for i, col in enumerate(("hmean_low", "hmean_all")):
        means = [table.rows[r][col][0] for r in names]
        halves = [table.rows[r][col][1] for r in names]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=halves, capsize=3, label=col)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("official score (x100)")
    lows = [table.rows[r][c][0] - table.rows[r][c][1] for r in names for c in ("hmean_low", "hmean_all")]
    ax.set_ylim(max(0.0, min(lows) - 5), None)
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
    table: StudyTable
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

        evaluation_sets = evalsets_from_config(cfg)  # from the evaluation corpus only
    say(f"evaluation sets: {evaluation_sets.root} ({len(evaluation_sets.machines)} machines "
        f"{', '.join(evaluation_sets.machines)}; {len(cfg.eval.conditions)} conditions x "
        f"{len(evaluation_sets.snrs_db)} SNRs, {time.perf_counter() - t0:.0f} s)")

    cells: list[CellResult] = []
    for i, (row, seed) in enumerate(plan, 1):
        where = out_dir / "rows" / row.label / f"seed{seed}"
        done = read_cell(where / RESULT)
        if done is not None:
            say(f"[{i}/{len(plan)}] {row.label} seed {seed}: done earlier, skipped "
                f"(hmean_low {100 * done.hmean_low:.2f}, hmean_all {100 * done.hmean_all:.2f})")
            cells.append(done)
            continue
        cell = run_cell(cfg, row, seed, where, corpus=corpus, evaluation_sets=evaluation_sets, uri=uri,
                        experiment=experiment)
        cells.append(cell)
        say(f"[{i}/{len(plan)}] {row.label} seed {seed}: hmean_low {100 * cell.hmean_low:.2f}, hmean_all "
            f"{100 * cell.hmean_all:.2f} (train {cell.train_s:.0f} s, eval {cell.eval_s:.0f} s)")

    table = summarise(cells, [r.label for r in parse_rows(cfg.study.rows)])
    summary = out_dir / "summary"
    paths = [fsio.write_text(summary / "table2.md", table.markdown()),
             _write_csv(summary / "table2.csv", table.csv_rows()),
             plot_study(table, summary / "score_vs_snr.png"), plot_hmeans(table, summary / "hmeans.png")]
    fsio.write_text(summary / "cells.json", json.dumps([c.to_json() for c in cells], indent=1))
    run_id = _log_summary(uri, experiment, cfg, table, summary)
    log.info("study summary: %s", [str(p) for p in paths])
    return StudyResult(out_dir, cells, table, uri, experiment, run_id, summary / "table2.md")


def _write_csv(path: Path, rows: list[list]) -> Path:
    import csv

    with fsio.atomic_write(path, newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def run_cell(cfg: Config, row: Row, seed: int, where: Path, *, corpus, evaluation_sets, uri: str,
             experiment: str) -> CellResult:
    """Pre-train one row at one seed, evaluate it, log its MLflow run, write result.json (last)."""
    from retain_asd import tracking
    from retain_asd.eval.builder import evaluate_from_config
    from retain_asd.train.launch import pretrain

    rc = row_config(cfg, row, seed)
    t0 = time.perf_counter()
    trained = pretrain(rc, where / "pretrain", corpus=corpus, track=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = "frozen" if trained.step == 0 else str(trained.student_path)
    layers = list(cfg.study.extra_layers)
    (result,) = evaluate_from_config(rc, [spec], where / "evaluate", layers=layers, sets=evaluation_sets,
                                     track=False)
    eval_s = time.perf_counter() - t0
    dn = result.primary == "dn"  # eval.primary: the reported figure (DN, as the paper's Table 2, or raw)
    scores = result.official_by_set(domain_norm=dn)
    overall = result.table2(domain_norm=dn)[-1]
    figures = result.metrics()
    last = trained.metrics[-1] if trained.metrics else {}
    extra = {"steps": trained.step, "primary_layer": result.primary_layer, "primary": result.primary,
             "final_loss": last.get("loss"), "objective": rc.objective.name}
    # kind=evaluate, preset=<row>, seed: the run convention `retain-asd compare` groups by (row, seeds)
    tags = {"kind": "evaluate", "study": cfg.name, "preset": row.label, "seed": str(seed)}
    tracking.delete_runs(uri, experiment, tags)  # a run of this cell left by an interrupted study
    tags |= {"row_preset": row.preset, "objective": rc.objective.name}
    with tracking.mlflow_run(uri, experiment, f"{row.label}/seed{seed}", params=to_dict(rc), tags=tags) as run:
        for h in trained.metrics:  # the training curve
            numbers = {f"train/{k}": v for k, v in h.items()
                       if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
            tracking.log_metrics(numbers, step=int(h["step"]))
        tracking.log_metrics({**figures, "train_s": train_s, "eval_s": eval_s, "steps": trained.step})
        tracking.log_artifacts(where / "evaluate", artifact_path="evaluate")
        run_id = run.info.run_id
    cell = CellResult(row.label, seed, scores, overall.hmean_low, overall.hmean_all, run_id, train_s, eval_s,
                      extra=extra)
    fsio.write_text(where / RESULT, json.dumps(cell.to_json(), indent=1))  # last: the cell is finished
    return cell


def _log_summary(uri: str, experiment: str, cfg: Config, table: StudyTable, summary: Path) -> str:
    """The summary run (replaced at each call, so a resumed study keeps one): mean / interval metrics."""
    from retain_asd import tracking

    tracking.delete_runs(uri, experiment, {"kind": "study_summary", "study": cfg.name})
    metrics = {}
    for row, cells in table.rows.items():
        for col in ("hmean_low", "hmean_all"):
            mean, half, _ = cells[col]
            metrics[f"{row}/{col}"] = mean / 100
            metrics[f"{row}/{col}_ci95"] = half / 100
    with tracking.mlflow_run(uri, experiment, "summary", params={"study": to_dict(cfg.study)},
                             tags={"kind": "study_summary", "study": cfg.name}) as run:
        tracking.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        tracking.log_artifacts(summary, artifact_path="summary")
        return run.info.run_id


__all__ = ["CellResult", "Row", "StudyResult", "StudyTable", "TABLE2_ROWS", "check_study",
           "mean_interval", "parse_rows", "read_cell", "row_config", "run_cell",
           "run_study", "study_plan", "summarise"]
