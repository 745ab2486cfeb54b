"""Evaluator-format files: anomaly scores, decisions and ground truth (DCASE 2021-2025 Task 2).

Submission files (one per machine and section, no header):
  anomaly_score_<machine>_section_<NN>_test.csv    wav_name,score
  decision_result_<machine>_section_<NN>_test.csv  wav_name,0|1
The 2021 evaluator wants one pair per domain (`..._section_<NN>_{source,target}_test.csv`); the
readers accept either.

Ground truth: an official evaluator's folder (2021, 2022 or 2023+ layout), read by
`retain_asd.corpus.groundtruth` (labels from ground_truth_data/, domains from ground_truth_domain/ or
the 2021 file names, full-name aliases from ground_truth_attributes/ when present).

The evaluators align scores with ground truth by sorting both files by name; we match rows by
file name instead, so any row order works, full names map through the attributes files, and a
missing or extra name is an error that names it. All sections are scored with the 2022+ rules
(`metrics.py`), including 2021 ground truth (the 2021 challenge itself scored AUC and pAUC per
domain without cross-domain anomalies).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
from sklearn.metrics import roc_auc_score

from retain_asd import fsio
from retain_asd.corpus.groundtruth import read_truth_sections
from retain_asd.eval.metrics import MachineScore, machine_scores


def section_id(section: int | str) -> str:
    """Two-digit section id from 3, "3", "03" or "section_03"."""
    text = str(section).removeprefix("section_")
    if not text.isdigit():
        raise ValueError(f"section must be a number like 3, '03' or 'section_03', got {section!r}")
    return f"{int(text):02d}"


def anomaly_score_path(out_dir, machine: str, section: int | str) -> Path:
    return Path(out_dir) / f"anomaly_score_{machine}_section_{section_id(section)}_test.csv"


def decision_result_path(out_dir, machine: str, section: int | str) -> Path:
    return Path(out_dir) / f"decision_result_{machine}_section_{section_id(section)}_test.csv"


def _write_rows_atomic(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    """Write CSV rows to a temporary file in the same folder, then rename (no half-written files)."""
    with fsio.atomic_write(path, newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def _check_names(wav_names: Sequence[str], n_values: int, what: str) -> list[str]:
    names = [str(n) for n in wav_names]
    if len(names) != n_values:
        raise ValueError(f"{what}: {len(names)} wav names but {n_values} values")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate wav names")
    if any(("," in n) or ("\n" in n) for n in names):
        raise ValueError(f"{what}: wav names must not contain commas or newlines")
    return names


def write_anomaly_scores(out_dir, machine: str, section: int | str, wav_names: Sequence[str], scores) -> Path:
    """Write `anomaly_score_<machine>_section_<NN>_test.csv` (wav_name,score; no header)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    path = anomaly_score_path(out_dir, machine, section)
    names = _check_names(wav_names, scores.size, str(path))
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{path}: scores contain NaN or inf")
    return _write_rows_atomic(path, [(n, repr(float(s))) for n, s in zip(names, scores)])


def write_decisions(out_dir, machine: str, section: int | str, wav_names: Sequence[str], decisions) -> Path:
    """Write `decision_result_<machine>_section_<NN>_test.csv` (wav_name,0|1; no header)."""
    decisions = np.asarray(decisions).reshape(-1)
    path = decision_result_path(out_dir, machine, section)
    names = _check_names(wav_names, decisions.size, str(path))
    if not np.all(np.isin(decisions, (0, 1))):
        raise ValueError(f"{path}: decisions must be 0 or 1")
    return _write_rows_atomic(path, [(n, str(int(d))) for n, d in zip(names, decisions)])


def _read_two_columns(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    rows = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{line_no}: expected 'wav_name,value', got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _read_named_values(path: Path, parse, what: str) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for line_no, (name, value) in enumerate(_read_two_columns(path), start=1):
        try:
            parsed = parse(value)
        except ValueError:
            raise ValueError(f"{path}: row {line_no} ({name!r}): {value!r} is not a valid {what} "
                             f"(these files have no header row)") from None
        key = Path(name).name  # the evaluators use bare names; tolerate 'machine/test/x.wav'
        if key in out:
            raise ValueError(f"{path}: {key!r} appears twice")
        out[key] = parsed
    return out


def _parse_score(value: str) -> float:
    x = float(value)
    if not np.isfinite(x):
        raise ValueError(value)
    return x


def _parse_01(value: str) -> int:
    x = float(value)
    if x not in (0.0, 1.0):
        raise ValueError(value)
    return int(x)


def read_score_file(path) -> dict[str, float]:
    """{wav_name: score} from an anomaly_score file."""
    return _read_named_values(Path(path), _parse_score, "score")


def read_decision_file(path) -> dict[str, int]:
    """{wav_name: 0|1} from a decision_result file."""
    return _read_named_values(Path(path), _parse_01, "decision (0 or 1)")


@dataclass(frozen=True)
class SectionTruth:
    """Ground truth of one machine/section, rows sorted by wav name."""

    machine: str
    section: str  # "03"
    wav_names: tuple[str, ...]
    is_anomaly: np.ndarray  # (N,) bool
    is_target: np.ndarray  # (N,) bool
    aliases: dict[str, str] = field(default_factory=dict)  # full name -> wav name (attributes files)


def read_ground_truth(gt_dir) -> list[SectionTruth]:
    """Every machine/section of an evaluator ground-truth folder (2021 or 2022+ layout).

    Errors are `ValueError`s naming the file (`LayoutError`); a missing folder or domain file is also a
    `FileNotFoundError`.
    """
    out = []
    for section in read_truth_sections(gt_dir):
        rows = section.rows
        out.append(SectionTruth(
            section.machine, section.section, tuple(r.wav_name for r in rows),
            np.array([r.label == "anomaly" for r in rows], dtype=bool),
            np.array([r.domain == "target" for r in rows], dtype=bool),
            {r.full_name: r.wav_name for r in rows if r.full_name},
        ))
    return out


def align(truth: SectionTruth, named_values: Mapping[str, float], source: str) -> np.ndarray:
    """Values in the order of `truth.wav_names`, matched by (anonymised or full) file name."""
    index = {n: i for i, n in enumerate(truth.wav_names)}
    out = np.full(len(index), np.nan)
    seen = np.zeros(len(index), dtype=bool)
    extra = []
    for name, value in named_values.items():
        key = Path(name).name
        i = index.get(key, index.get(truth.aliases.get(key, ""), -1))
        if i < 0:
            extra.append(key)
            continue
        if seen[i]:
            raise ValueError(f"{source}: two rows name the clip {truth.wav_names[i]!r}")
        seen[i] = True
        out[i] = value
    if extra:
        hint = "" if truth.aliases else " (full names need ground_truth_attributes/ to map them)"
        raise ValueError(f"{source}: {len(extra)} names are not in the ground truth of {truth.machine} "
                         f"section {truth.section}, e.g. {extra[:3]}{hint}")
    if not seen.all():
        missing = [n for n, s in zip(truth.wav_names, seen) if not s]
        raise ValueError(f"{source}: {len(missing)} clips of {truth.machine} section {truth.section} "
                         f"have no row, e.g. {missing[:3]}")
    return out


def section_score_files(scores_dir, machine: str, section: str) -> list[Path]:
    """The score file(s) of a section: one `_test.csv`, or the 2021 `_source_test`/`_target_test` pair."""
    scores_dir = Path(scores_dir)
    single = anomaly_score_path(scores_dir, machine, section)
    if single.is_file():
        return [single]
    pair = [scores_dir / f"anomaly_score_{machine}_section_{section}_{domain}_test.csv"
            for domain in ("source", "target")]
    return pair if all(p.is_file() for p in pair) else []


def read_section_scores(scores_dir, truth: SectionTruth) -> np.ndarray:
    """Scores of one section aligned with `truth.wav_names`."""
    files = section_score_files(scores_dir, truth.machine, truth.section)
    if not files:
        raise FileNotFoundError(f"{anomaly_score_path(scores_dir, truth.machine, truth.section)}: not found")
    merged: dict[str, float] = {}
    for path in files:
        part = read_score_file(path)
        if dup := set(part) & set(merged):
            raise ValueError(f"{path}: names also in the other domain's file, e.g. {sorted(dup)[:3]}")
        merged.update(part)
    return align(truth, merged, " + ".join(str(p) for p in files))


@dataclass(frozen=True)
class DomainDecisions:
    """Precision, recall and F1 of the decisions on one domain's test clips (the evaluator's definitions)."""

    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class SectionResult:
    machine: str
    section: str
    score: MachineScore
    auc_all: float = math.nan  # AUC over every test clip of the section
    decisions: dict[str, DomainDecisions] | None = None  # "source" / "target"; None without decision files


def decision_figures(decisions, is_anomaly, is_target) -> dict[str, DomainDecisions]:
    """Per domain, the clips of that domain (normal and anomalous): precision = tp / (tp + fp), recall =
    tp / (tp + fn), F1, each denominator floored at float epsilon, as the DCASE evaluator computes them."""
    eps = sys.float_info.epsilon
    d, a, t = (np.asarray(x, dtype=bool) for x in (decisions, is_anomaly, is_target))
    out = {}
    for domain, sel in (("source", ~t), ("target", t)):
        if not sel.any():
            continue
        tp = float(np.sum(d[sel] & a[sel]))
        fp = float(np.sum(d[sel] & ~a[sel]))
        fn = float(np.sum(~d[sel] & a[sel]))
        prec, rec = tp / max(tp + fp, eps), tp / max(tp + fn, eps)
        out[domain] = DomainDecisions(prec, rec, 2 * prec * rec / max(prec + rec, eps))
    return out


def score_submission(scores_dir, gt_dir) -> list[SectionResult]:
    """Score every ground-truth section from a folder of anomaly_score files (2022+ rules)."""
    scores_dir = Path(scores_dir)
    if not scores_dir.is_dir():
        raise FileNotFoundError(f"{scores_dir}: scores folder not found")
    truths = read_ground_truth(gt_dir)
    missing = [t for t in truths if not section_score_files(scores_dir, t.machine, t.section)]
    if missing:
        names = [anomaly_score_path(scores_dir, t.machine, t.section).name for t in missing]
        raise FileNotFoundError(f"{scores_dir}: {len(missing)} of {len(truths)} sections have no score file, "
                                f"e.g. {names[:3]}")
    results = []
    for t in truths:
        scores = read_section_scores(scores_dir, t)
        decided = None
        decision_path = decision_result_path(scores_dir, t.machine, t.section)
        if decision_path.is_file():
            decided = decision_figures(align(t, read_decision_file(decision_path), str(decision_path)),
                                       t.is_anomaly, t.is_target)
        auc_all = float(roc_auc_score(t.is_anomaly, scores)) if 0 < t.is_anomaly.sum() < len(scores) else math.nan
        results.append(SectionResult(t.machine, t.section, machine_scores(scores, t.is_anomaly, t.is_target),
                                     auc_all, decided))
    return results


RESULT_COLUMNS = ["AUC (all)", "AUC (source)", "AUC (target)", "pAUC", "precision (source)", "precision (target)",
                  "recall (source)", "recall (target)", "F1 score (source)", "F1 score (target)"]


def write_result_csv(results: Sequence[SectionResult], path) -> Path:
    """The DCASE 2022-2025 evaluators' ``result_<team>.csv`` layout: per machine type its name, a header row,
    one row per section, then arithmetic / harmonic means (overall, source, target) of AUC, pAUC, precision,
    recall and F1; finally the official score and its 95% jackknife interval. Figures that cannot be computed
    (no decision files: precision / recall / F1; no target clips: target columns) are left empty."""
    from retain_asd.eval.metrics import official_score, official_score_interval

    def fmt(x) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    def mean_rows(rows: list[list[float]]) -> list[list[str]]:
        out = []
        for label, pick in (("arithmetic mean", slice(None)), ("harmonic mean", slice(None)),
                            ("source harmonic mean", "source"), ("target harmonic mean", "target")):
            cols = []
            for j in range(5):  # AUC, pAUC, precision, recall, F1 over both domains (source values, then target)
                values = [r[j] for r in rows if pick in (slice(None), r[5])]
                values = [v for v in values if not math.isnan(v)]
                if not values:
                    cols.append("")
                elif label == "arithmetic mean":
                    cols.append(fmt(np.mean(values)))
                else:
                    cols.append(fmt(scipy.stats.hmean(np.maximum(values, sys.float_info.epsilon))))
            out.append([label, "", *cols])
        return out

    lines: list[list[str]] = []
    for machine in dict.fromkeys(r.machine for r in results):
        mine = [r for r in results if r.machine == machine]
        lines += [[machine], ["section", *RESULT_COLUMNS]]
        per_domain = []
        for r in mine:
            dec = r.decisions or {}
            nan = DomainDecisions(math.nan, math.nan, math.nan)
            src, tgt = dec.get("source", nan), dec.get("target", nan)
            lines.append([r.section, fmt(r.auc_all), fmt(r.score.auc_source), fmt(r.score.auc_target),
                          fmt(r.score.pauc), fmt(src.precision), fmt(tgt.precision), fmt(src.recall),
                          fmt(tgt.recall), fmt(src.f1), fmt(tgt.f1)])
            per_domain.append([r.score.auc_source, r.score.pauc, src.precision, src.recall, src.f1, "source"])
            per_domain.append([r.score.auc_target, r.score.pauc, tgt.precision, tgt.recall, tgt.f1, "target"])
        lines.append(["", "", "AUC", "pAUC", "precision", "recall", "F1 score"])
        lines += mean_rows(per_domain)
        lines.append([])
    scores = [r.score for r in results]
    lines.append(["official score", fmt(official_score(scores))])
    if len(scores) >= 2:
        lines.append(["official score ci95", fmt(official_score_interval(scores).half_width)])
    with fsio.atomic_write(path, newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(lines)
    return Path(path)
