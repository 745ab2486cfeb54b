"""Reports: the paper's Table-2 layout (markdown, CSV) and plots (score vs SNR, score per layer).

Every function takes plain data and an output path and returns the path. Results are official
scores in [0, 1] keyed by (condition, snr_db), per run (a model / checkpoint / row of the table);
tables print them x100 with 2 decimals as the paper does. hmean_low / hmean_all are the "all" row
of `metrics.table2` (harmonic mean over every condition at SNRs {-10, -5, 0} / at every SNR).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

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


def plot_score_per_layer(scores: Mapping[str, Mapping[int, float]], path) -> Path:
    """Official score (x100) per encoder layer (1-based), one line per run (the paper's Fig. 2)."""
    if not scores:
        raise ValueError("no scores to plot")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for run, by_layer in scores.items():
        points = sorted((int(layer), 100 * float(v)) for layer, v in by_layer.items())
        ax.plot(*zip(*points), marker="o", label=str(run))
    ax.set_xlabel("layer")
    ax.set_ylabel("official score (x100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path) -> Path:
    fig.tight_layout()
    try:
        return fsio.savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
