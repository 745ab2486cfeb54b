"""The cross-run comparison of an MLflow experiment in the paper's Table-2 layout (`retain-asd compare`).

Runs come from ``mlflow.search_runs`` (through `retain_asd.tracking.experiment_runs`); grouping, intervals,
tables and plots are `report.comparison_*`. The evaluation runs are the ones tagged ``kind=evaluate`` (one per
scored checkpoint, see `builder.evaluate_from_config`); an experiment point (``kind=point``: a study cell or a
sweep trial, `retain_asd.experiments.point`) with no evaluation run under it shows as a failed row, or, when a
sweep's scheduler stopped it before its evaluation (tags ``status=stopped_early``, ``stopped_at_step``, written by
`tune.sweep.record_outcomes`), as a row "stopped early at step n": not failed, no figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from retain_asd import fsio
from retain_asd.eval import report


@dataclass(frozen=True)
class Comparison:
    markdown: str  # both tables, primary first (what `retain-asd compare` prints)
    rows: list[report.ComparisonRow]
    columns: list[tuple[str, int]]  # (condition, snr_db)
    primary: str  # "raw" or "dn"
    paths: list[Path] = field(default_factory=list)  # markdown, CSV, one SNR-curve PNG per condition x variant
    run_id: str | None = None  # the comparison's own MLflow run (None when not logged)
    scored_on: list[str] = field(default_factory=list)  # what the scores were computed on (`scored_on_lines`)


POINT_KINDS = ("point", "trial")  # "trial": a sweep's point before experiment points had their own kind


def _records(runs: list[dict]) -> list[report.RunRecord]:
    evaluations = [r for r in runs if r["tags"].get("kind") == "evaluate"]
    scored_points = {r["tags"].get("mlflow.parentRunId") for r in evaluations}
    scored_groups = {report.group_name(report.RunRecord(**r)) for r in evaluations}
    out = [report.RunRecord(**r) for r in evaluations]
    for r in runs:  # a point that never got to its evaluation: a failed (or stopped) row of its own
        if r["tags"].get("kind") in POINT_KINDS and r["run_id"] not in scored_points:
            if r["tags"].get("status") == "stopped_early":
                status = report.STOPPED
            else:
                status = "FAILED" if r["status"] == "FINISHED" else r["status"]
            rec = report.RunRecord(**(r | {"status": status, "metrics": {}}))
            if report.group_name(rec) not in scored_groups:
                out.append(rec)
    return out


def scored_on_lines(records) -> list[str]:
    """What the compared scores were computed on (the runs' eval.corpus / eval.split / eval.sizes tags), one line
    per distinct set; a table mixing several says so, each once."""
    from retain_asd.eval.evalsets import scored_on_line

    seen = {}
    for r in records:
        if r.tags.get("eval.corpus"):
            tags = {k: r.tags.get(k, "?") for k in ("eval.corpus", "eval.split", "eval.sizes")}
            seen.setdefault(scored_on_line(tags), None)
    return [f"scored on the {line}" for line in seen]


def compare_experiment(experiment: str, *, tracking_uri: str, out_dir: str | os.PathLike,
                       runs: str = "", metric: str = "hmean_low", log_run: bool = True) -> Comparison:
    """Table 2 over the evaluation runs of an MLflow experiment. Stable API (used by `retain-asd compare`
    and the study / demo commands).

    experiment: MLflow experiment name; tracking_uri: its store (``tracking.resolve_tracking_uri``);
    out_dir: where ``comparison.md``, ``comparison.csv`` and ``snr_<condition>_<raw|dn>.png`` are written;
    runs: an MLflow filter string (``mlflow.search_runs`` syntax) narrowing the runs; metric: the ranking
    figure, ``hmean_low`` / ``hmean_all`` (raw kNN scores primary) or ``hmean_low_dn`` / ``hmean_all_dn``
    (domain normalisation primary); log_run: log the files as a run tagged ``kind=compare`` in the same
    experiment (never itself compared).

    Rows: runs grouped by their ``preset`` tag (a sweep trial has its own preset name), mean and 95%
    t-interval over the ``seed`` tag; a FAILED run, or one without figures, counts as failed; a sweep trial
    stopped early by its scheduler counts as stopped (status "stopped early at step n"), not failed.
    Raises ValueError when the experiment is missing or holds no evaluation run.
    """
    from retain_asd import tracking

    if metric not in ("hmean_low", "hmean_all", "hmean_low_dn", "hmean_all_dn"):
        raise ValueError(f"--metric {metric!r}: one of hmean_low, hmean_all, hmean_low_dn, hmean_all_dn")
    records = _records(tracking.experiment_runs(tracking_uri, experiment, runs))
    if not records and runs:
        presets = sorted({report.group_name(r) for r in _records(tracking.experiment_runs(tracking_uri, experiment))})
        raise ValueError(f"experiment {experiment!r} ({tracking_uri}) has no evaluation runs matching {runs!r}; "
                         + (f"its presets: {', '.join(presets)} (e.g. --runs \"tags.preset = '{presets[0]}'\")"
                            if presets else "it has no evaluation runs at all; run `retain-asd evaluate` first"))
    if not records:
        raise ValueError(f"experiment {experiment!r} ({tracking_uri}) has no evaluation runs; "
                         "run `retain-asd evaluate` first")
    primary = "dn" if metric.endswith("_dn") else "raw"
    rows = report.comparison_rows(records, metric)
    columns = report.comparison_columns(records)
    title = f"{experiment}: Table 2 ({len(records)} runs, ranked by {metric})"
    scored_on = scored_on_lines(records)
    title += "".join(f"; {line}" for line in scored_on)
    markdown = report.comparison_markdown(rows, columns, primary, title)
    out_dir = Path(out_dir)
    paths = [fsio.write_text(out_dir / "comparison.md", markdown),
             report.write_comparison_csv(rows, columns, out_dir / "comparison.csv")]
    for condition in dict.fromkeys(c for c, _ in columns):
        snrs = [s for c, s in columns if c == condition]
        for variant in sorted(report.VARIANTS, key=lambda v: v != primary):
            paths.append(report.plot_comparison_snr(rows, condition, snrs, variant,
                                                    out_dir / f"snr_{condition}_{variant}.png"))
    run_id = None
    if log_run:
        params = {"experiment": experiment, "runs": runs or "(all)", "metric": metric, "primary": primary}
        with tracking.mlflow_run(tracking_uri, experiment, f"compare-{metric}", params,
                                 {"kind": "compare"}) as run:
            for path in paths:
                tracking.log_artifact(path, artifact_path="compare")
            run_id = run.info.run_id
    return Comparison(markdown, rows, columns, primary, paths, run_id, scored_on)
