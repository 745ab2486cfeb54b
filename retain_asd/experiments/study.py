"""The Table-2 study: every row of the paper's Table 2, over several seeds, from one initial encoder.

    run_study(cfg, out_dir)
      -> the initial encoder (model.checkpoint, or the cached stand-in foundation encoder)   once
      -> the pre-training corpus (pre-training world) and the evaluation sets (evaluation world) once
      -> for each row x seed:  <out>/rows/<row>/seed<k>/, one experiment point (`point.run_point`)
           pretrain (Ray Train; `frozen` trains nothing)        pretrain/
           evaluate on the 7 SNRs x 3 conditions (kNN)          evaluate/
           MLflow run `point-<row>-seed<k>` with its pretrain and evaluate runs nested, all tagged study=<name>
           result.json (written last: a finished cell of the study; a re-run skips it)
      -> summary: `compare_experiment` over the study's MLflow runs (what `retain-asd compare` prints: the mean and
         95% t-interval over seeds per condition x SNR), then the headline figures (hmean{-10,-5,0} and All, raw
         and DN) with intervals over the training seeds *and* the test clips (`eval/uncertainty.py`: a paired
         bootstrap over the per-clip scores each evaluation wrote, CLIP_RESAMPLES draws seeded by eval.seed) and
         every row against `study.base` (`denoise`; better / worse only when the difference's interval excludes
         0, else "no difference"); <out>/summary/comparison.{md,csv}, plots, one MLflow run `summary`

Rows are presets (`retain_asd/presets/<preset>.yaml`) whose `objective` and `mixing` sections are merged
over the study config; a row is named by its preset, or `label:preset` (e.g. the demo's
`tagging_mixture:tagging_mixture_pm5`). A seed sets `train.seed` and `mixing.seed` (student init of the
heads, batch order, pairings, SNR draws); the initial encoder and the evaluation sets are the same for every
row and seed (paper Sec. 4: every method continues from the same BEATs iter3). `frozen` is deterministic,
so its interval counts the test clips only.

A plain loop over configs (the rows run one after another, each a Ray Train run using every worker): on
one machine, Tune's trial scheduling would add nothing; `tune/` sweeps around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from retain_asd.eval.uncertainty import Interval, Labels

log = logging.getLogger(__name__)

BASE_ROW = "denoise"  # study.base's default: every other row is compared with it (the paper's baseline)
# Bootstrap draws of the test clips behind the headline intervals (stated in the header). The interval uses the
# draws' standard deviation, not their percentiles: 100 give it to about 7% (1 / sqrt(2 (B - 1))), at half the
# cost of 200 (each draw rescores every set of every row x seed; measured below in docs/study.md).
CLIP_RESAMPLES = 100
HEADLINE_KEYS = ("hmean_low", "hmean_all", "hmean_low_dn", "hmean_all_dn")  # Table 2's figures, raw and DN
TABLE2_ROWS = ("frozen", "denoise", "denoise_linear_mixup", "denoise_snr_mixup", "tagging_pm5", "mixture_pm5",
               "tagging_mixture_pm5", "tagging_0db", "mixture_0db", "tagging_mixture_0db")
ROW_SECTIONS = ("objective", "mixing")  # what a row preset may change; the rest is the study's
RESULT = "result.json"
REPLICATES = "clip_replicates.npz"  # beside it: the cell's headline figures and their test-clip replicates
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


# ---------------------------------------------------------------------------------------------------- intervals
ScoreMap = dict[tuple[str, float, str], np.ndarray]  # (condition, snr_db, machine) -> (Q,) per-clip scores


def clip_labels(evaluation_sets, condition: str, snr_db: float
                ) -> tuple[dict[str, Labels], dict[str, list[tuple[str, str]]]]:
    """Every machine's test clips in one fixed order (by section, then file name) -> ({machine: Labels},
    {machine: [(section, wav_name), ...]}). Every condition and SNR holds the same clean clips (`evalsets`)."""
    from retain_asd.eval.uncertainty import Labels

    by_machine: dict[str, list[dict]] = {}
    for r in evaluation_sets.rows(condition, snr_db):
        if r["role"] == "test":
            by_machine.setdefault(r["machine"], []).append(r)
    labels, clips = {}, {}
    for machine, tests in sorted(by_machine.items()):
        tests = sorted(tests, key=lambda r: (str(r["section"]), str(r["wav_name"])))
        clips[machine] = [(str(r["section"]), str(r["wav_name"])) for r in tests]
        labels[machine] = Labels(np.array([r["label"] == "anomaly" for r in tests]),
                                 np.array([r["domain"] == "target" for r in tests]))
    return labels, clips


def read_clip_scores(where: Path, clips: dict[str, list[tuple[str, str]]], conditions: Sequence[str],
                     snrs_db: Sequence[float]) -> dict[str, ScoreMap]:
    """One study cell's per-clip scores, {"raw" | "dn": ScoreMap} in `clips`' order, read back from the score files
    its evaluation wrote (`run.write_score_files`: <where>/evaluate/<run>/scores/<condition>/snr_<dB>/<raw|dn>/,
    the primary layer); nothing is embedded again, and a resumed study reads the same files."""
    from retain_asd.eval.dcase_files import anomaly_score_path, read_score_file

    found = sorted(p for p in (where / "evaluate").glob("*/scores") if p.is_dir())
    if len(found) != 1:
        raise FileNotFoundError(f"{where / 'evaluate'}: expected the score files of one evaluation, found "
                                f"{[str(p) for p in found] or 'none'}; delete {where / RESULT} to run the cell again")
    out: dict[str, ScoreMap] = {"raw": {}, "dn": {}}
    for variant in out:
        for condition in conditions:
            for snr_db in snrs_db:
                folder = found[0] / condition / f"snr_{int(snr_db)}" / variant
                for machine, order in clips.items():
                    named = {}
                    for section in sorted({sec for sec, _ in order}):
                        named |= {(section, n): v for n, v in
                                  read_score_file(anomaly_score_path(folder, machine, section)).items()}
                    missing = [n for n in order if n not in named]
                    if missing:
                        raise ValueError(f"{folder}: {machine} has no score for {len(missing)} test clips of the "
                                         f"evaluation sets, e.g. {missing[:2]}; the cell was scored on other sets")
                    out[variant][(condition, float(snr_db), machine)] = np.array([named[n] for n in order])
    return out


@dataclass(frozen=True)
class Headline:
    """The study table's headline figures (HEADLINE_KEYS) with intervals over training seeds and test clips
    (`eval/uncertainty.py`), per row, and every other row against `base` (row - base, paired by seed and draw)."""

    seeds: int  # training seeds per row (the most any row has)
    resamples: int  # bootstrap draws of the test clips
    intervals: dict[str, dict[str, Interval]]  # row -> key -> its interval
    differences: dict[str, dict[str, Interval]]  # row -> key -> interval of row - base (rows other than base)
    auc_pairs: dict[tuple[str, str], int]  # (machine, domain) -> normal x anomalous pairs of its AUC
    wanted: str = BASE_ROW  # the base row asked for (`study.base`; "" = none)

    @property
    def base(self) -> str | None:
        """The base row, or None when the study has no such row (nothing is called)."""
        return self.wanted if self.wanted in self.intervals else None

    def header(self) -> str:
        """What every headline interval counts."""
        from retain_asd.eval.uncertainty import interval_text

        return interval_text(self.seeds, self.resamples)

    def resolution(self, key: str) -> str:
        """The smallest differences the sets can resolve: one AUC step, and the difference intervals' half widths
        of figure `key` (its All counterpart when the sets have no hmean{-10,-5,0})."""
        steps = sorted({100 / n for n in self.auc_pairs.values() if n})
        text = f"one AUC step (1 / normal x anomalous clips per domain) is {_span(steps, '.3g')} points here"
        if self.base is None:
            return text + (f"; no {self.wanted} row: no difference is called" if self.wanted
                           else "; no base row (study.base is empty): no difference is called")
        if not any(key in d for d in self.differences.values()):
            key = key.replace("hmean_low", "hmean_all")
        halves = sorted(100 * d[key].half_width for d in self.differences.values()
                        if key in d and not math.isnan(d[key].half_width))
        if halves:
            text += (f"; the differences against {self.base} ({_figure_name(key)}) have 95% half widths of "
                     f"{_span(halves, '.2f')} points: a smaller difference is not called")
        return text


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def _figure_name(key: str) -> str:
    variant = "dn" if key.endswith("_dn") else "raw"
    return f"{variant} {'hmean{-10,-5,0}' if key.startswith('hmean_low') else 'All'}"


def cell_figures(scores: dict[str, ScoreMap], labels: dict[str, Labels], draws: dict[str, np.ndarray]
                 ) -> dict[str, tuple[float, np.ndarray]]:
    """One row x seed: figure key -> (its value on the whole test set, its (B,) replicates over `draws`), from
    {"raw" | "dn": ScoreMap}; a figure the sets cannot give (hmean_low without -10, -5 and 0 dB) is left out."""
    from retain_asd.eval.uncertainty import figure_replicates, whole_set

    out = {}
    for variant, suffix in (("raw", ""), ("dn", "_dn")):
        point = figure_replicates(scores[variant], labels, whole_set(labels))
        replicates = figure_replicates(scores[variant], labels, draws)
        for figure in ("hmean_low", "hmean_all"):
            if not math.isnan(point[figure][0]):
                out[figure + suffix] = (float(point[figure][0]), replicates[figure])
    return out


def cached_cell_figures(where: Path, stamp: str, clips: dict, labels: dict[str, Labels], draws: dict[str, np.ndarray],
                        conditions: Sequence[str], snrs_db: Sequence[float]) -> dict[str, tuple[float, np.ndarray]]:
    """`cell_figures` of the cell in `where` (its score files, `read_clip_scores`), kept in <where>/clip_replicates.npz
    under `stamp` (`draws_stamp`): a resumed study reprints its table without redrawing; `study_point` deletes the
    file when the cell runs again."""
    import io

    path = where / REPLICATES
    try:
        with np.load(path) as data:
            if str(data["stamp"]) == stamp:
                return {k: (float(data[k][0]), data[k][1:]) for k in data.files if k != "stamp"}
    except (OSError, ValueError, KeyError):
        pass  # none yet, torn or of other draws: computed again
    figures = cell_figures(read_clip_scores(where, clips, conditions, snrs_db), labels, draws)
    buffer = io.BytesIO()
    np.savez(buffer, stamp=np.array(stamp), **{k: np.r_[point, reps] for k, (point, reps) in figures.items()})
    fsio.write_bytes(path, buffer.getvalue())
    return figures


def draws_stamp(labels: dict[str, Labels], clips: dict, resamples: int, seed: int, conditions: Sequence[str],
                snrs_db: Sequence[float]) -> str:
    """What a cell's replicates depend on besides its scores: the draws (clips, labels, B, seed) and the sets."""
    import hashlib

    text = json.dumps([resamples, seed, list(conditions), [float(x) for x in snrs_db], sorted(clips.items()),
                       {m: [lab.is_anomaly.tolist(), lab.is_target.tolist()] for m, lab in sorted(labels.items())}])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def headline_intervals(figures: dict[str, dict[int, dict[str, tuple[float, np.ndarray]]]], resamples: int,
                       auc_pairs: dict[tuple[str, str], int], base: str = BASE_ROW) -> Headline:
    """`figures`: row -> training seed -> `cell_figures` (every cell from the same draws, so rows are paired) ->
    each row's `combined_interval` and, for every row but `base`, `difference_interval` against it over the seeds
    both have. Pure numpy."""
    from retain_asd.eval.uncertainty import combined_interval, difference_interval

    stacked: dict[str, dict[str, tuple[list[int], np.ndarray, np.ndarray]]] = {}  # row -> key -> seeds, (S,), (S, B)
    for row, by_seed in figures.items():
        seeds = sorted(by_seed)
        for key in set.intersection(*(set(by_seed[s]) for s in seeds)) if seeds else ():
            stacked.setdefault(row, {})[key] = (seeds, np.array([by_seed[s][key][0] for s in seeds]),
                                                np.stack([by_seed[s][key][1] for s in seeds]))
    intervals = {row: {k: combined_interval(p, r) for k, (_, p, r) in keys.items()} for row, keys in stacked.items()}
    differences: dict[str, dict[str, Interval]] = {}
    for row, keys in stacked.items():
        for key, (seeds, p, r) in keys.items():
            if row == base or key not in stacked.get(base, {}):
                continue
            base_seeds, bp, br = stacked[base][key]
            both = [s for s in seeds if s in base_seeds]  # paired by seed
            if both:
                i, j = [seeds.index(s) for s in both], [base_seeds.index(s) for s in both]
                differences.setdefault(row, {})[key] = difference_interval(p[i], r[i], bp[j], br[j])
    num_seeds = max((len(v) for v in figures.values()), default=0)
    return Headline(num_seeds, resamples, intervals, differences, auc_pairs, base)


def with_headline(comparison, headline: Headline):
    """`comparison` with the headline figures' intervals replaced by the Headline's (the condition x SNR cells keep
    their intervals over seeds) and its markdown rebuilt: the headline table first, its header saying what the
    intervals count."""
    from retain_asd.eval import report

    rows = []
    for row in comparison.rows:
        mine, estimates = headline.intervals.get(row.name, {}), dict(row.estimates)
        for key, e in row.estimates.items():
            figure = key.replace("_primary_dn", "_dn").replace("_primary_raw", "")  # the labelled primary copies
            if figure in mine:
                estimates[key] = report.Estimate(mine[figure].mean, mine[figure].half_width, e.n)
        rows.append(dataclasses.replace(row, estimates=estimates))
    title = comparison.markdown.split("\n", 1)[0]
    seeds_only = [r.name for r in rows if r.name not in headline.intervals]
    note = ("Condition x SNR cells: official score x100, mean ± 95% t-interval half width over seeds only (no "
            "interval with one seed); hmean{-10,-5,0} and All: the headline intervals above"
            + (f" (rows {', '.join(seeds_only)}: over seeds only, no per-clip scores in this study)"
               if seeds_only else "") + ". Chance = 50.")
    markdown = (f"{title}\n\n{headline_markdown(rows, headline, comparison.primary)}"
                + report.comparison_markdown(rows, comparison.columns, comparison.primary, note=note))
    return dataclasses.replace(comparison, rows=rows, markdown=markdown)


def difference_cell(d: Interval) -> str:
    """`+1.23 ± 0.80 better` (x100; the call only when the interval excludes 0)."""
    return f"{100 * d.mean:+.2f} ± {100 * d.half_width:.2f} {d.call}"


def headline_markdown(rows, headline: Headline, primary: str) -> str:
    """The headline table: per row hmean{-10,-5,0} and All, primary variant first, each with its difference
    against the base row; the header states what the intervals count and the smallest resolvable difference."""
    from retain_asd.eval.report import plus_minus

    variants = sorted(("raw", "dn"), key=lambda v: v != primary)
    keys = [f"{f}{'_dn' if v == 'dn' else ''}" for v in variants for f in ("hmean_low", "hmean_all")]
    base = headline.base or headline.wanted or "base"
    header = ["row", "seeds"] + [x for k in keys for x in (_figure_name(k), f"vs {base}")]
    lines = [f"### Table 2 over training seeds and test clips ({primary} primary)", "",
             f"Official score x100, mean ± {headline.header()}. vs {base}: row - {base}, paired by seed and by "
             "draw; \"better\" / \"worse\" only when its interval excludes 0, else \"no difference\". The per-clip "
             "scores are kept as scored (references and DN statistics are not redrawn).", "",
             f"Resolution: {headline.resolution(keys[0])}.", "",
             "| " + " | ".join(header) + " |", "|---|---:|" + "---:|---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            d = headline.differences.get(row.name, {}).get(k)
            vs = "(base)" if row.name == headline.base else (difference_cell(d) if d else "–")
            cells += [plus_minus(row.estimates.get(k)), vs]
        lines.append("| " + " | ".join([row.name, str(len(row.seeds)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def difference_columns(headline: Headline) -> dict[str, dict[str, str]]:
    """comparison.csv's extra columns: per row `<key>_vs_<base>`, its `_ci95` half width and `_call`."""
    out: dict[str, dict[str, str]] = {}
    for row, diffs in headline.differences.items():
        for key in HEADLINE_KEYS:
            d, name = diffs.get(key), f"{key}_vs_{headline.base}"
            values = ("", "", "") if d is None else (repr(d.mean), repr(d.half_width), d.call)
            out.setdefault(row, {}).update(zip((name, f"{name}_ci95", f"{name}_call"), values))
    return out


# ---------------------------------------------------------------------------------------------------- summary
def study_metric(cfg: Config) -> str:
    """The ranking figure of `compare_experiment` that makes eval.primary's table the primary one."""
    return "hmean_low_dn" if cfg.eval.primary == "dn" else "hmean_low"


def compact_table(comparison, order: Sequence[str] | None = None, headline: Headline | None = None) -> str:
    """The console form of the study table: one line per row, Table-2 order, with hmean{-10,-5,0} and All of the
    primary variant, then of the other (`comparison`'s estimates: `with_headline`'s intervals in a study); with a
    `headline`, each primary figure is followed by the row's difference against its base row and the call."""
    from retain_asd.eval.report import plus_minus

    primary = comparison.primary
    other = "raw" if primary == "dn" else "dn"
    suffix = {"raw": "", "dn": "_dn"}
    rows = {r.name: r for r in comparison.rows}
    names = [n for n in (order or []) if n in rows] + [n for n in rows if n not in (order or [])]
    width = max([len("row")] + [len(n) for n in names])
    base = headline.base if headline else None
    vs = f"vs {base}" if base else ""

    def vs_cell(name: str, key: str) -> str:
        d = headline.differences.get(name, {}).get(key) if headline else None
        return "(base)" if name == base else (difference_cell(d) if d else "–")

    head = (f"{'row':<{width}}  seeds  {primary + ' hmean{-10,-5,0}':>19}  " + (f"{vs:<27}  " if base else "")
            + f"{primary + ' All':>15}  " + (f"{vs:<27}  " if base else "")
            + f"{other + ' hmean{-10,-5,0}':>19}  {other + ' All':>15}")
    lines = [head.rstrip()]
    for n in names:
        r = rows[n]
        keys = [f"hmean_{k}{suffix[v]}" for v in (primary, other) for k in ("low", "all")]
        cells = [plus_minus(r.estimates.get(k)) for k in keys]
        diffs = [f"{vs_cell(n, k):<27}  " if base else "" for k in keys[:2]]
        lines.append(f"{n:<{width}}  {len(r.seeds):>5}  {cells[0]:>19}  {diffs[0]}{cells[1]:>15}  {diffs[1]}"
                     f"{cells[2]:>19}  {cells[3]:>15}" + ("" if r.status == "ok" else f"  ({r.status})"))
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
    headline: Headline  # the headline figures' intervals over seeds and test clips, and the calls against denoise


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
              say: Say = print, progress: bool | None = None, resamples: int = CLIP_RESAMPLES) -> StudyResult:
    """Run (or resume) the study of `cfg` into `out_dir` and write its summary. Ray must be initialised.

    `evaluation_sets`: built `EvalSets` of the evaluation world (default: built from the config).
    `corpus`: the ingested pre-training corpus (default: from the config). `say`: one line per stage.
    `resamples`: bootstrap draws of the test clips behind the headline intervals (stated in the table header).
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

    # The cells come from the MLflow runs, by the function `retain-asd compare` uses: the same numbers.
    from retain_asd.eval.compare import compare_experiment
    from retain_asd.eval.report import write_comparison_csv

    summary = out_dir / "summary"
    order = [r.label for r in parse_rows(cfg.study.rows)]
    comparison = compare_experiment(experiment, tracking_uri=uri, out_dir=summary, runs=f"tags.study = '{cfg.name}'",
                                    metric=study_metric(cfg), log_run=False)
    headline = study_headline(cfg, cells, out_dir, evaluation_sets, resamples, say)
    comparison = with_headline(comparison, headline)
    fsio.write_text(summary / "comparison.md", comparison.markdown)  # over compare's: the same cells, these intervals
    write_comparison_csv(comparison.rows, comparison.columns, summary / "comparison.csv",
                         extra=difference_columns(headline))
    plot_hmeans(comparison, order, summary / "hmeans.png")
    fsio.write_json(summary / "cells.json", [c.to_json() for c in cells], indent=1)
    run_id = _log_summary(uri, experiment, cfg, comparison, headline, summary)
    table = compact_table(comparison, order, headline)
    return StudyResult(out_dir, cells, comparison, table, uri, experiment, run_id, summary / "comparison.md",
                       headline)


def study_headline(cfg: Config, cells: Sequence[CellResult], out_dir: Path, evaluation_sets, resamples: int,
                   say: Say) -> Headline:
    """The headline intervals of the study's cells: one set of test-clip draws (seeded by eval.seed) applied to the
    per-clip scores each cell's evaluation wrote (kept per cell, `cached_cell_figures`)."""
    from retain_asd.eval.uncertainty import auc_steps, clip_draws

    if resamples < 2:
        raise ValueError(f"resamples={resamples}: the test clips' interval needs at least 2 bootstrap draws")
    t0 = time.perf_counter()
    conditions, snrs_db = cfg.eval.conditions, evaluation_sets.snrs_db
    labels, clips = clip_labels(evaluation_sets, conditions[0], snrs_db[0])
    draws = clip_draws(labels, resamples, cfg.eval.seed)
    stamp = draws_stamp(labels, clips, resamples, cfg.eval.seed, conditions, snrs_db)
    figures: dict[str, dict[int, dict]] = {}
    for c in cells:
        where = out_dir / "rows" / c.row / f"seed{c.seed}"
        figures.setdefault(c.row, {})[c.seed] = cached_cell_figures(where, stamp, clips, labels, draws, conditions,
                                                                    snrs_db)
    headline = headline_intervals(figures, resamples, auc_steps(labels), base=cfg.study.base)
    say(f"intervals: {headline.header()} ({time.perf_counter() - t0:.0f} s)")
    return headline


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
    (where / REPLICATES).unlink(missing_ok=True)  # of an earlier evaluation of this cell
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


def _log_summary(uri: str, experiment: str, cfg: Config, comparison, headline: Headline, summary: Path) -> str:
    """The summary run (replaced at each call, so a resumed study keeps one): per-row means and half widths of
    the hmeans (`<row>/<key>`, `<row>/<key>_ci95`: seeds and test clips), each row's difference against the base
    row (`<row>/<key>_vs_<base>`, e.g. `_vs_denoise`, and its `_ci95`), the comparison's markdown, CSV and plots."""
    from retain_asd import tracking

    tracking.delete_runs(uri, experiment, {"kind": "study_summary", "study": cfg.name})
    metrics = {}
    for row in comparison.rows:
        for key, e in row.estimates.items():
            if key.startswith("hmean_") and "/" not in key and not math.isnan(e.mean):
                metrics[f"{row.name}/{key}"] = e.mean
                if not math.isnan(e.half_width):
                    metrics[f"{row.name}/{key}_ci95"] = e.half_width
    for row, diffs in headline.differences.items():
        for key, d in diffs.items():
            metrics[f"{row}/{key}_vs_{headline.base}"] = d.mean
            if not math.isnan(d.half_width):
                metrics[f"{row}/{key}_vs_{headline.base}_ci95"] = d.half_width
    intervals = {"text": headline.header(), "clip_resamples": headline.resamples, "clip_draw_seed": cfg.eval.seed,
                 "base_row": headline.base or "none"}
    params = {"study": to_dict(cfg.study), "intervals": intervals}
    with tracking.mlflow_run(uri, experiment, "summary", params=params,
                             tags={"kind": "study_summary", "study": cfg.name}, storage=cfg.data.storage) as run:
        tracking.log_metrics(metrics)
        tracking.log_artifacts(summary, artifact_path="summary")
        return run.info.run_id


__all__ = ["BASE_ROW", "CLIP_RESAMPLES", "CellResult", "HEADLINE_KEYS", "Headline", "Row", "StudyResult",
           "TABLE2_ROWS", "cell_figures", "check_study", "clip_labels", "compact_table", "headline_intervals",
           "headline_markdown", "parse_rows", "read_cell", "read_clip_scores", "row_config", "run_study",
           "study_metric", "study_plan", "study_point", "testbed_check", "with_headline"]
