"""Reports: the paper's Table-2 layout (markdown, CSV) and plots (score vs SNR, score per layer).

Every function takes plain data and an output path and returns the path. Results are official
scores in [0, 1] keyed by (condition, snr_db), per run (a model / checkpoint / row of the table);
tables print them x100 with 2 decimals as the paper does. hmean_low / hmean_all are the "all" row
of `metrics.table2` (harmonic mean over every condition at SNRs {-10, -5, 0} / at every SNR).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retain_asd import fsio  # noqa: E402
from retain_asd.eval.metrics import table2  # noqa: E402

Results = Mapping[str, Mapping[tuple[str, int], float]]  # run -> (condition, snr_db) -> official score


def _columns(results: Results) -> list[tuple[str, int]]:
    """(condition, snr_db) columns: conditions in first-seen order, SNRs ascending."""
    if not results:
        raise ValueError("no results to report")
    snrs: dict[str, set[int]] = {}
    for cells in results.values():
        for condition, snr_db in cells:
            snrs.setdefault(str(condition), set()).add(int(snr_db))
    return [(c, s) for c, ss in snrs.items() for s in sorted(ss)]


def _pct(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def table2_rows(results: Results, label: str = "") -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings, x100, 2 decimals) of the Table-2 layout: run, cells, hmean_low, hmean_all.
    `label` names the figure in the first column ("run (DN, primary)")."""
    columns = _columns(results)
    header = [f"run ({label})" if label else "run"] + [f"{c}/snr_{s}" for c, s in columns] + ["hmean_low",
                                                                                              "hmean_all"]
    rows = []
    for run, cells in results.items():
        cells = {(str(c), int(s)): float(v) for (c, s), v in cells.items()}
        overall = table2(cells)[-1]
        rows.append([str(run)] + [_pct(cells.get(col)) for col in columns]
                    + [_pct(overall.hmean_low), _pct(overall.hmean_all)])
    return header, rows


def _write_text_atomic(path, text: str) -> Path:
    return fsio.write_text(path, text)


def write_table2_markdown(results: Results, path, label: str = "") -> Path:
    """Table 2 as a GitHub markdown table (empty cells shown as '–'); `label`: see `table2_rows`."""
    header, rows = table2_rows(results, label)
    pretty = header[:1] + [h.replace("/snr_", " ") + " dB" for h in header[1:-2]] + header[-2:]
    lines = ["| " + " | ".join(pretty) + " |", "|" + "---|" + "---:|" * (len(pretty) - 1)]
    lines += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in rows]
    return _write_text_atomic(path, "\n".join(lines) + "\n")


def write_table2_csv(results: Results, path, label: str = "") -> Path:
    """Table 2 as CSV with a header row; columns `<condition>/snr_<dB>`, hmean_low, hmean_all."""
    header, rows = table2_rows(results, label)
    with fsio.atomic_write(path, newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return Path(path)


def plot_score_vs_snr(results: Results, path) -> Path:
    """One panel per condition: official score (x100) vs SNR, one line per run."""
    conditions = list(dict.fromkeys(c for c, _ in _columns(results)))
    fig, axes = plt.subplots(1, len(conditions), figsize=(4 * len(conditions), 3.2), sharey=True,
                             squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        for run, cells in results.items():
            points = sorted((int(s), 100 * float(v)) for (c, s), v in cells.items() if str(c) == condition)
            if points:
                ax.plot(*zip(*points), marker="o", label=str(run))
        ax.set_title(condition)
        ax.set_xlabel("SNR (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("official score (x100)")
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def layer_figure(scores: Mapping[str, Mapping[int, float]], marked: Mapping[str, int] | None = None,
                 title: str = ""):
    """The paper's Fig. 2: official score (x100) per encoder layer (1-based), one curve per run; a run's
    `marked` layer (the one `evaluate` reports) is ringed. Returns the matplotlib figure."""
    if not scores:
        raise ValueError("no scores to plot")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for run, by_layer in scores.items():
        points = sorted((int(layer), 100 * float(v)) for layer, v in by_layer.items())
        (line,) = ax.plot(*zip(*points), marker="o", label=str(run))
        mark = (marked or {}).get(run)
        if mark in by_layer:
            ax.scatter([mark], [100 * float(by_layer[mark])], s=140, facecolors="none", edgecolors=line.get_color(),
                       linewidths=1.5, zorder=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("official score (x100)")
    if title:
        ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_score_per_layer(scores: Mapping[str, Mapping[int, float]], path, marked: Mapping[str, int] | None = None,
                         title: str = "") -> Path:
    """`layer_figure` saved to `path`."""
    return _save(layer_figure(scores, marked, title), path)


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure atomically and close it (as every plot of this module)."""
    return _save(fig, path)


def _save(fig, path) -> Path:
    fig.tight_layout()
    try:
        return fsio.savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- compare
# The cross-run comparison (`retain-asd compare`, `retain_asd.eval.compare.compare_experiment`): runs of an
# MLflow experiment as plain records, grouped into rows (preset or sweep trial) with the mean and a 95%
# t-interval over seeds, in the Table-2 layout. Column keys are the evaluation's own MLflow metric keys
# (`results.EvalResult.metrics`): ``<condition>/snr_<dB>/official[_dn]``, ``hmean_low[_dn]``, ``hmean_all[_dn]``.
CONDITION_ORDER = ("factory_a", "factory_b", "mismatch")
VARIANTS = {"raw": "", "dn": "_dn"}
VARIANT_TITLES = {"raw": "raw kNN scores", "dn": "DN (GenRep domain normalisation)"}
CHANCE = 0.5  # official score (hmean of AUCs and McClish pAUC) of a random detector
_CELL = re.compile(r"^(?P<condition>[A-Za-z0-9_.-]+)/snr_(?P<snr>-?\d+)/official$")


STOPPED = "STOPPED_EARLY"  # a sweep trial its scheduler stopped before the evaluation (`compare._records`)


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain data (what `tracking.experiment_runs` returns)."""

    run_id: str
    run_name: str
    status: str  # MLflow: FINISHED, FAILED, KILLED, RUNNING, SCHEDULED; or STOPPED_EARLY (`STOPPED`)
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # 95% t-interval half width over seeds; NaN with one value
    n: int


@dataclass(frozen=True)
class ComparisonRow:
    name: str  # the preset (or sweep trial) the runs belong to
    seeds: tuple[str, ...]  # of the runs that produced figures
    runs: int  # runs in the group (failed included)
    failed: int  # runs that failed or logged no figures (stopped ones not included)
    estimates: Mapping[str, Estimate]  # metric key -> mean / interval over the group's finished runs
    stopped_at: tuple[int, ...] = ()  # the step of each run a sweep's scheduler stopped early

    @property
    def status(self) -> str:
        if self.failed == 0 and not self.stopped_at:
            return "ok"
        parts = []
        if self.stopped_at:
            steps = ", ".join(str(s) for s in self.stopped_at)
            at = f"at step{'s' if len(self.stopped_at) > 1 else ''} {steps}"
            n = len(self.stopped_at)
            parts.append(f"stopped early {at}" if n == self.runs else f"{n} of {self.runs} stopped early {at}")
        if self.failed:
            parts.append("FAILED" if self.failed == self.runs else f"{self.failed} of {self.runs} failed")
        return "; ".join(parts)


def mean_interval(values, confidence: float = 0.95) -> Estimate:
    """Mean and Student-t interval half width (t_{n-1} * s / sqrt(n)) of per-seed figures; NaN for n < 2."""
    xs = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(xs) == 0:
        return Estimate(math.nan, math.nan, 0)
    if len(xs) == 1:
        return Estimate(float(xs[0]), math.nan, 1)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))
    return Estimate(float(xs.mean()), half, len(xs))


def group_name(record: RunRecord) -> str:
    """The row a run belongs to: its `preset` tag (the pre-trained preset / sweep trial), else the config name."""
    t, p = record.tags, record.params
    return str(t.get("preset") or p.get("name") or p.get("config.name") or record.run_name or record.run_id)


def run_seed(record: RunRecord) -> str:
    t, p = record.tags, record.params
    return str(t.get("seed") or p.get("train.seed") or p.get("config.train.seed") or "?")


def comparison_columns(records) -> list[tuple[str, int]]:
    """(condition, snr_db) cells present in any run: the paper's condition order first, SNRs ascending."""
    cells = set()
    for r in records:
        for key in r.metrics:
            m = _CELL.match(key)
            if m:
                cells.add((m["condition"], int(m["snr"])))
    rank = {c: i for i, c in enumerate(CONDITION_ORDER)}
    return sorted(cells, key=lambda c: (rank.get(c[0], len(rank)), c[0], c[1]))


def metric_keys(columns, variant: str) -> list[str]:
    """MLflow metric keys of one variant ("raw" / "dn") in table order: cells, then hmean_low, hmean_all."""
    s = VARIANTS[variant]
    return [f"{c}/snr_{snr}/official{s}" for c, snr in columns] + [f"hmean_low{s}", f"hmean_all{s}"]


def comparison_rows(records, metric: str = "hmean_low") -> list[ComparisonRow]:
    """Group run records into rows; a run counts as failed when MLflow says so or it logged no figures, unless a
    sweep's scheduler stopped it early (status STOPPED: counted in ``stopped_at``, not failed).

    Rows are sorted by ``metric`` (best first); rows without it (failed) come last.
    """
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(group_name(r), []).append(r)
    keys = {k for r in records for k in r.metrics}
    rows = []
    for name, runs in groups.items():
        ok = [r for r in runs if r.status == "FINISHED" and r.metrics]
        stopped = tuple(sorted(int(r.tags.get("stopped_at_step", 0)) for r in runs if r.status == STOPPED))
        estimates = {k: mean_interval([r.metrics.get(k, math.nan) for r in ok]) for k in sorted(keys)}
        rows.append(ComparisonRow(name, tuple(sorted((run_seed(r) for r in ok), key=_seed_order)), len(runs),
                                  len(runs) - len(ok) - len(stopped), {k: e for k, e in estimates.items() if e.n},
                                  stopped))
    key = lambda row: (-row.estimates[metric].mean if metric in row.estimates else math.inf, row.name)  # noqa: E731
    return sorted(rows, key=key)


def _seed_order(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def plus_minus(e: Estimate | None) -> str:
    if e is None or math.isnan(e.mean):
        return "–"
    return f"{100 * e.mean:.2f}" + ("" if math.isnan(e.half_width) else f" ± {100 * e.half_width:.2f}")


SEEDS_NOTE = ("Official DCASE score x100: mean ± 95% t-interval half width over seeds (no interval with one seed); "
              "hmean{-10,-5,0} = harmonic mean over every condition at -10, -5 and 0 dB, All = over every SNR. "
              "Chance = 50.")


def comparison_markdown(rows, columns, primary: str = "raw", title: str = "", note: str = SEEDS_NOTE) -> str:
    """Both variants as markdown tables (x100, mean ± 95% half width), the primary one first and labelled;
    ``hmean{-10,-5,0}`` is `hmean_low`, ``All`` is `hmean_all`. `note`, under the tables, says what the intervals
    count (default: the seeds; the study's replaces the headline figures' with intervals over seeds and clips)."""
    header = (["run", "seeds", "status"] + [f"{c} {s} dB" for c, s in columns] + ["hmean{-10,-5,0}", "All"])
    out = [f"## {title}".rstrip()] if title else []
    for variant in sorted(VARIANTS, key=lambda v: v != primary):
        label = "primary" if variant == primary else "secondary"
        out += ["", f"### {VARIANT_TITLES[variant]} ({label})", "",
                "| " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * (len(header) - 3)]
        for row in rows:
            cells = [plus_minus(row.estimates.get(k)) for k in metric_keys(columns, variant)]
            out.append("| " + " | ".join([row.name, str(len(row.seeds)), row.status, *cells]) + " |")
    out += ["", note]
    return "\n".join(out) + "\n"


def write_comparison_csv(rows, columns, path, extra: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """One line per row: name, status, runs, failed, seeds, then for raw and DN every metric key (the mean, in
    MLflow's units) and ``<key>_ci95`` (the half width); a key is exactly the evaluation's MLflow metric key.
    `extra`: row name -> {column: value} appended after them (a row without a value gets an empty cell)."""
    keys = metric_keys(columns, "raw") + metric_keys(columns, "dn")
    more = list(dict.fromkeys(c for values in (extra or {}).values() for c in values))
    header = ["run", "status", "runs", "failed", "seeds"] + [x for k in keys for x in (k, f"{k}_ci95")] + more

    def num(x: float) -> str:
        return "" if math.isnan(x) else repr(float(x))

    lines = [header]
    for row in rows:
        values = []
        for k in keys:
            e = row.estimates.get(k)
            values += ["", ""] if e is None else [num(e.mean), num(e.half_width)]
        mine = (extra or {}).get(row.name, {})
        lines.append([row.name, row.status, row.runs, row.failed, " ".join(row.seeds), *values,
                      *(mine.get(c, "") for c in more)])
    with fsio.atomic_write(path, newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(lines)
    return Path(path)


def plot_comparison_snr(rows, condition: str, snrs, variant: str, path) -> Path:
    """One condition's official score (x100) vs SNR, one line per row with its 95% interval, and chance."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    s = VARIANTS[variant]
    for row in rows:
        pts = [(snr, row.estimates.get(f"{condition}/snr_{snr}/official{s}")) for snr in snrs]
        pts = [(x, e) for x, e in pts if e is not None]
        if pts:
            err = [0.0 if math.isnan(e.half_width) else 100 * e.half_width for _, e in pts]
            ax.errorbar([x for x, _ in pts], [100 * e.mean for _, e in pts], yerr=err, marker="o", capsize=3,
                        label=f"{row.name} (n={len(row.seeds)})")
    ax.axhline(100 * CHANCE, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_title(f"{condition}: {VARIANT_TITLES[variant]}")
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("official score (x100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
