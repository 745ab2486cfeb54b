"""The paper's two analyses: Table 3 (wave mixture vs. the embedding-mixture oracle) and Fig. 2 (layer-wise).

* Table 3, the testbed check: per condition (Factory A, Factory B, Mismatch) and SNR, without domain
  normalisation, the first encoder on the wave mixture (what it is given at test time) against its
  embedding-mixture oracle lam * E(clean) + (1 - lam) * E(noise) from the same clips and scaled noise
  segments (Eq. 5, the representation the mixture loss asks the student for). The method rests on the oracle
  scoring above the wave mixture (paper, BEATs, Mismatch 0 dB: 73.6 against 60.4). Students given after the
  first encoder are scored on the wave mixture too. Every cell carries a 95% interval from a paired
  bootstrap over the test clips (resampled within domain x label, so each group keeps its size) and the
  references (source and target banks resampled), the same draws for wave and oracle, so the difference
  has its own interval.
* Fig. 2: every layer of each encoder, all from one forward pass per clip (``run.evaluate_checkpoint`` with
  every layer), scored by the Table-2 harmonic mean over all sets (the primary figure, DN or raw); on a DCASE
  tree (``dcase_mode.evaluate_dcase``), by the official score of the tree's year.

Library functions: no Config (the builders in ``eval/builder.py`` and the pipelines pass flat arguments).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retain_asd import fsio
from retain_asd.eval import knn, metrics
from retain_asd.eval.embed import Embedder
from retain_asd.eval.evalsets import EvalSets, MixtureSource, row_key

TABLE3_CONDITIONS = ("factory_a", "factory_b", "mismatch")
TABLE3_SNRS_DB = (-5.0, 0.0, 5.0)
TESTBED_CELL = ("mismatch", 0.0)  # the paper's Table 3 cell: the premise of the method
PAPER_TESTBED_DIFF = 13.2  # BEATs iter3, Mismatch 0 dB, no DN: oracle 73.6 - wave 60.4 (paper, Table 3)
CONDITION_NAMES = {"factory_a": "Factory A", "factory_b": "Factory B", "mismatch": "Mismatch"}


@dataclass
class Table3Cell:
    """One condition x SNR: official scores (0-1) over all machines, per machine, and 95% intervals."""

    condition: str
    snr_db: float
    wave: float
    oracle: float
    ci95: dict[str, tuple[float, float]]  # "wave" | "oracle" | "diff" (oracle - wave) -> (low, high)
    machines: dict[str, dict[str, float]] = field(default_factory=dict)  # "wave" | "oracle" -> machine -> score
    students: dict[str, float] = field(default_factory=dict)  # other encoders on the wave mixture

    @property
    def diff(self) -> float:
        return self.oracle - self.wave


@dataclass
class Table3:
    """The testbed check of one encoder (`encoder`), x100 in every rendering."""

    layer: int
    encoder: str
    machines: list[str]
    cells: list[Table3Cell]
    resamples: int
    interval: str  # what the intervals count

    def cell(self, condition: str, snr_db: float) -> Table3Cell:
        for c in self.cells:
            if c.condition == condition and c.snr_db == float(snr_db):
                return c
        raise KeyError(f"Table 3 has no cell {condition} at {snr_db:g} dB")

    def to_json(self) -> dict:
        """``{"layer", "encoder", "interval", "resamples", "cells": [{"condition", "snr_db", "wave", "oracle",
        "diff", "ci95": {"wave": [lo, hi], "oracle": [..], "diff": [..]}, ...}]}``, scores x100 to 2 decimals
        (the figures of the markdown)."""
        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(100 * x, 2)

        cells = []
        for c in self.cells:
            cell = {"condition": c.condition, "snr_db": c.snr_db, "wave": r(c.wave), "oracle": r(c.oracle),
                    "diff": r(c.diff), "ci95": {k: [r(lo), r(hi)] for k, (lo, hi) in c.ci95.items()}}
            if c.students:
                cell["students"] = {k: r(v) for k, v in c.students.items()}
            cells.append(cell)
        return {"layer": self.layer, "encoder": self.encoder, "domain_normalisation": False,
                "interval": self.interval, "resamples": self.resamples, "cells": cells}

    def markdown(self) -> str:
        students = list(self.cells[0].students) if self.cells else []
        head = ["condition", "SNR (dB)", "wave", "oracle", "oracle - wave", "95% interval (oracle - wave)",
                *[f"{s} (wave)" for s in students]]
        lines = [f"Table 3: {self.encoder}, layer {self.layer}, no domain normalisation; official score over "
                 f"{len(self.machines)} machines ({', '.join(self.machines)}), x100", "",
                 f"Intervals: {self.interval}.", "",
                 "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        js = self.to_json()["cells"]
        for c in js:
            f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            lo, hi = c["ci95"]["diff"]
            lines.append("| " + " | ".join([CONDITION_NAMES[c["condition"]], f"{c['snr_db']:g}", f(c["wave"]),
                                            f(c["oracle"]), f(c["diff"]), f"[{f(lo)}, {f(hi)}]",
                                            *[f(c["students"][s]) for s in students]]) + " |")
        return "\n".join(lines) + "\n"

    def testbed_line(self) -> str:
        """One line: the oracle's margin over the wave mixture at Mismatch 0 dB, with its interval."""
        c = self.cell(*TESTBED_CELL)
        lo, hi = c.ci95["diff"]
        return (f"testbed: oracle - wave at Mismatch 0 dB = {100 * c.diff:+.1f} ± {100 * (hi - lo) / 2:.1f} "
                f"(95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]; paper, BEATs: +{PAPER_TESTBED_DIFF:.1f})")

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics ``table3/<condition>_<snr>db/<wave|oracle|diff>_raw`` (and per machine)."""
        out = {}
        for c in self.cells:
            cell = f"table3/{c.condition}_{c.snr_db:g}db".replace("-", "m")
            for name, value in (("wave", c.wave), ("oracle", c.oracle), ("diff", c.diff)):
                if not math.isnan(value):
                    out[f"{cell}/{name}_raw"] = float(value)
            for name, (lo, hi) in c.ci95.items():
                if not math.isnan(lo):
                    out[f"{cell}/{name}_ci95_low"], out[f"{cell}/{name}_ci95_high"] = float(lo), float(hi)
            for kind, by in c.machines.items():
                for machine, value in by.items():
                    if not math.isnan(value):
                        out[f"{cell}/{kind}/{machine}_raw"] = float(value)
            for name, value in c.students.items():
                if not math.isnan(value):
                    out[f"{cell}/student/{name}_raw"] = float(value)
        return out


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class _Machine:
    """One machine of one cell: every test clip's distances to every reference, sorted (k-NN with any subset of
    the references is then a lookup), and the test clips' groups."""

    source: tuple[np.ndarray, np.ndarray]  # (Q, Ms) ascending distances, (Q, Ms) bank indices
    target: tuple[np.ndarray, np.ndarray]
    is_anomaly: np.ndarray  # (Q,)
    is_target: np.ndarray  # (Q,)


def _sorted_distances(test: np.ndarray, bank: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    dist, idx = knn.knn_distance(test, bank, k=len(bank), metric=metric)  # every reference, ascending
    return dist.cpu().numpy(), idx.cpu().numpy()


def _knn_with_counts(dist: np.ndarray, idx: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """(Q,) mean of the k smallest distances to a bank in which reference j occurs counts[j] times."""
    w = counts[idx].astype(np.float64)  # (Q, M) multiplicity of each neighbour, in distance order
    before = np.cumsum(w, axis=1) - w
    take = np.clip(np.minimum(w, k - before), 0, None)  # copies of each neighbour among the k nearest
    return (dist * take).sum(1) / k


def _machine_figures(m: _Machine, k: int, tests: np.ndarray, src_counts: np.ndarray,
                     tgt_counts: np.ndarray) -> metrics.MachineScore:
    scores = np.minimum(_knn_with_counts(m.source[0][tests], m.source[1][tests], src_counts, k),
                        _knn_with_counts(m.target[0][tests], m.target[1][tests], tgt_counts, k))
    return metrics.replicate_machine_scores(scores, m.is_anomaly[tests], m.is_target[tests])


def _prepare_machine(rows: Sequence[dict], emb: np.ndarray, machine: str, metric: str) -> _Machine:
    idx = {role: [i for i, r in enumerate(rows) if r["machine"] == machine and r["role"] == role]
           for role in ("ref_source", "ref_target", "test")}
    tests = [rows[i] for i in idx["test"]]
    test = emb[idx["test"]]
    return _Machine(_sorted_distances(test, emb[idx["ref_source"]], metric),
                    _sorted_distances(test, emb[idx["ref_target"]], metric),
                    np.asarray([r["label"] == "anomaly" for r in tests]),
                    np.asarray([r["domain"] == "target" for r in tests]))


def _resample(m: _Machine, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test clips drawn with replacement within each domain x label group; reference multiplicities."""
    tests = []
    key = m.is_anomaly.astype(int) * 2 + m.is_target.astype(int)
    for g in np.unique(key):
        members = np.flatnonzero(key == g)
        tests.append(rng.choice(members, size=len(members), replace=True))
    ms, mt = m.source[0].shape[1], m.target[0].shape[1]
    return (np.concatenate(tests), rng.multinomial(ms, np.full(ms, 1.0 / ms)),
            rng.multinomial(mt, np.full(mt, 1.0 / mt)))


def score_cell(rows: Sequence[dict], embeddings: dict[str, np.ndarray], *, k: int = 1, metric: str = "euclidean",
               resamples: int = 200, seed: int = 0) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                            dict[str, np.ndarray]]:
    """Official score over machines (no DN) of each embedding set of one cell (`embeddings`: name -> (N, d) in
    `rows` order), per machine, and `resamples` paired bootstrap replicates of the official score (the same
    test clips and references for every name). Returns (official, per machine, replicates)."""
    machines = sorted({r["machine"] for r in rows})
    prepared = {name: {m: _prepare_machine(rows, emb, m, metric) for m in machines}
                for name, emb in embeddings.items()}
    full = {name: {m: metrics.machine_scores(
        np.minimum(_knn_with_counts(*pm.source, np.ones(pm.source[0].shape[1]), k),
                   _knn_with_counts(*pm.target, np.ones(pm.target[0].shape[1]), k)),
        pm.is_anomaly, pm.is_target) for m, pm in by.items()} for name, by in prepared.items()}
    official = {name: metrics.official_score(list(by.values())) for name, by in full.items()}
    per_machine = {name: {m: metrics.official_score([s]) for m, s in by.items()} for name, by in full.items()}
    rng = np.random.default_rng(seed)
    replicates = {name: np.empty(resamples) for name in embeddings}
    first = next(iter(prepared.values()))
    for b in range(resamples):
        draws = {m: _resample(first[m], rng) for m in machines}
        for name, by in prepared.items():
            replicates[name][b] = metrics.official_score([_machine_figures(by[m], k, *draws[m]) for m in machines])
    return official, per_machine, replicates


def _interval(replicates: np.ndarray) -> tuple[float, float]:
    if len(replicates) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------- embeddings
def _part_key(kind: str, row: dict) -> str:
    """Cache key of a mixture's clean part (the clip alone) or its scaled noise part (segment + gain alone)."""
    text = (f"clean|{row['clip_id']}" if kind == "clean" else
            f"noise|{row['noise_id']}|{row['noise_offset']}|{float(row['noise_gain'])!r}")
    return hashlib.sha1(text.encode()).hexdigest()


def table3(evalsets: EvalSets, encoders: Sequence[tuple[str, str]], layer: int, *, lam: float = 0.5,
           k: int = 1, metric: str = "euclidean", pooling: str = "genrep", batch_size: int = 16,
           conditions: Sequence[str] = TABLE3_CONDITIONS, snrs_db: Sequence[float] = TABLE3_SNRS_DB,
           resamples: int = 200, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Table3:
    """Table 3 for `encoders` = [(name, checkpoint path), ...]: the first on the wave mixture and its oracle at
    every condition x SNR, the others on the wave mixture; each read at `layer` (clamped to its depth).

    The oracle is lam * E(clean) + (1 - lam) * E(noise) of the same clean clip and scaled noise segment as the
    wave mixture (``MixtureSource.parts``). The pooling is linear (a mean over time), so mixing the pooled
    embeddings equals ``embed.embed_oracle``'s per-token mix, and each clean clip is encoded once for every
    condition and SNR. With `cache_dir` the wave, clean and noise embeddings are cached by content
    (the wave ones under the evaluation's own keys, so a scored checkpoint's are reused).
    """
    if not encoders:
        raise ValueError("table3: give at least one encoder")
    missing = [s for s in snrs_db if float(s) not in evalsets.snrs_db]
    if missing:
        raise ValueError(f"table3: SNRs {missing} dB are not in the evaluation sets ({evalsets.snrs_db}); add them "
                         "to eval.snrs_db or pick others with --snrs")
    bad = [c for c in conditions if c not in TABLE3_CONDITIONS]
    if bad:
        raise ValueError(f"table3: conditions {bad}: expected some of {TABLE3_CONDITIONS}")
    cells_rows = {(c, float(s)): evalsets.rows(c, s) for c in conditions for s in snrs_db}
    unique = {row_key(r): r for rows in cells_rows.values() for r in rows}
    source = MixtureSource(evalsets.corpus_root)

    def loader(kind: str, by_key: dict[str, dict]):
        def load(keys):
            clean, noise = source.parts([by_key[x] for x in keys])
            return {"wave": clean + noise, "clean": clean, "noise": noise}[kind]
        return load

    embedded: list[dict[str, dict[str, np.ndarray]]] = []  # per encoder: kind -> row key -> embedding
    use_layer = layer
    for i, (_, path) in enumerate(encoders):
        embedder = Embedder(path, pooling=pooling, cache_dir=cache_dir, batch_size=batch_size)
        use = min(layer, embedder.model.num_layers) if hasattr(embedder.model, "num_layers") else layer
        use_layer = use if i == 0 else use_layer
        keys = list(unique)
        kinds = {"wave": (keys, unique)}
        if i == 0:
            for kind in ("clean", "noise"):
                by_part = {_part_key(kind, r): r for r in unique.values()}
                kinds[kind] = ([_part_key(kind, unique[x]) for x in keys], by_part)
        mine = {}
        for kind, (kind_keys, by_key) in kinds.items():
            emb = embedder.embed_keyed(kind_keys, loader(kind, by_key), [use])[use]
            mine[kind] = dict(zip(keys, emb, strict=True))
        embedded.append(mine)

    first_name = encoders[0][0]
    cells = []
    for (condition, snr_db), rows in cells_rows.items():
        keys = [row_key(r) for r in rows]
        first = embedded[0]
        wave = np.stack([first["wave"][x] for x in keys])
        oracle = lam * np.stack([first["clean"][x] for x in keys]) + (1 - lam) * np.stack([first["noise"][x]
                                                                                              for x in keys])
        official, per_machine, reps = score_cell(rows, {"wave": wave, "oracle": oracle}, k=k, metric=metric,
                                                 resamples=resamples, seed=seed)
        students = {}
        for (name, _), mine in zip(encoders[1:], embedded[1:], strict=True):
            students[name] = score_cell(rows, {"wave": np.stack([mine["wave"][x] for x in keys])}, k=k,
                                        metric=metric, resamples=0)[0]["wave"]
        ci95 = {"wave": _interval(reps["wave"]), "oracle": _interval(reps["oracle"]),
                "diff": _interval(reps["oracle"] - reps["wave"])}
        cells.append(Table3Cell(condition, snr_db, official["wave"], official["oracle"], ci95, per_machine,
                                students))
    interval = (f"95% percentile bootstrap, {resamples} paired draws of the test clips (with replacement within "
                "each domain x label group) and of the source and target references, per machine")
    return Table3(use_layer, first_name, sorted({r["machine"] for r in unique.values()}), cells, resamples, interval)


def write_table3(table: Table3, out_dir: str | os.PathLike) -> list[Path]:
    """``table3.md``, ``table3.json`` (the same figures) and ``table3.png`` (wave vs oracle per cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = fsio.write_text(out_dir / "table3.md", table.markdown())
    js = fsio.write_text(out_dir / "table3.json", json.dumps(table.to_json(), indent=1) + "\n")
    labels = [f"{CONDITION_NAMES[c.condition]}\n{c.snr_db:g} dB" for c in table.cells]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 3.4))
    x = np.arange(len(labels))
    for j, kind in enumerate(("wave", "oracle")):
        values = np.asarray([100 * getattr(c, kind) for c in table.cells])
        low, high = (np.asarray([100 * c.ci95[kind][k] for c in table.cells]) for k in (0, 1))
        ax.bar(x + (j - 0.5) * 0.4, values, 0.4,
               label=f"{table.encoder} ({'wave mixture' if kind == 'wave' else 'embedding mixture, oracle'})")
        # the interval as it is: a percentile bootstrap of a harmonic mean of AUCs need not contain the estimate
        shown = np.isfinite(low) & np.isfinite(high)
        ax.errorbar((x + (j - 0.5) * 0.4)[shown], (low[shown] + high[shown]) / 2, yerr=(high - low)[shown] / 2,
                    fmt="none", ecolor="black", elinewidth=1, capsize=2)
    ax.set_xticks(x, labels, fontsize="x-small")
    ax.set_ylabel("official score (x100, no DN)")
    ax.set_title(f"Table 3, layer {table.layer}")
    ax.legend(fontsize="x-small")
    from retain_asd.eval.report import save_figure

    return [md, js, save_figure(fig, out_dir / "table3.png")]


# ---------------------------------------------------------------------------------------------------- Fig. 2
def _layer_cells(by: dict[int, float], layers: Sequence[int], mark: int | None) -> str:
    return " | ".join((f"{100 * by[x]:.2f}" if x in by and not math.isnan(by[x]) else "–")
                      + ("*" if x == mark else "") for x in layers)


def layerwise_markdown(scores: dict[str, dict[int, float]], figure: str, marked: dict[str, int] | None = None) -> str:
    """Encoders x layers table of `figure` (x100); `marked` {encoder: layer} gets a star (the layer `evaluate`
    reports)."""
    marked = marked or {}
    layers = sorted({layer for by in scores.values() for layer in by})
    lines = [f"Fig. 2: {figure} per layer (x100)", "", "| encoder | " + " | ".join(f"L{x}" for x in layers) + " |",
             "|---|" + "---:|" * len(layers)]
    for name, by in scores.items():
        lines.append(f"| {name} | " + _layer_cells(by, layers, marked.get(name)) + " |")
    if marked:
        lines += ["", "* the layer `evaluate` reports for the encoder (eval.layer; eval.ssl_layer for 'frozen')"]
    return "\n".join(lines) + "\n"


def layerwise_machine_markdown(per_machine: dict[str, dict[int, float]], encoder: str, mark: int | None = None) -> str:
    """One encoder's machine x layer table: each machine section's hmean of AUC_s, AUC_t, pAUC (x100)."""
    layers = sorted({layer for by in per_machine.values() for layer in by})
    lines = [f"{encoder}: hmean of AUC_source, AUC_target, pAUC per machine section and layer (x100)", "",
             "| machine section | " + " | ".join(f"L{x}" for x in layers) + " |", "|---|" + "---:|" * len(layers)]
    lines += [f"| {machine} | " + _layer_cells(by, layers, mark) + " |" for machine, by in per_machine.items()]
    return "\n".join(lines) + "\n"
