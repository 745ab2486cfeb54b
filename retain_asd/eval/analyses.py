"""The paper's two analyses: Table 3 (wave mixture vs. the embedding-mixture oracle) and Fig. 2 (layer-wise).

* Table 3: on the Mismatch set at 0 dB, per machine, without domain normalisation: each encoder on the wave
  mixture (what it is given at test time) against the embedding-mixture oracle of the first encoder,
  lam * E(clean) + (1 - lam) * E(noise) per token from the same clips (``embed.embed_oracle``), the
  representation the mixture loss asks the student for (Eq. 5). Students given after the first encoder are
  scored on the wave mixture too.
* Fig. 2: every layer of each encoder, all from one forward pass per clip (``run.evaluate_checkpoint`` with
  every layer), scored by the Table-2 harmonic mean over all sets (the primary figure, DN or raw); on a DCASE
  tree (``dcase_mode.evaluate_dcase``), by the official score of the tree's year.

Library functions: no Config (the builders in ``eval/builder.py`` and the pipelines pass flat arguments).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retain_asd import fsio
from retain_asd.eval import metrics
from retain_asd.eval.embed import Embedder, embed_oracle
from retain_asd.eval.evalsets import EvalSets, MixtureSource
from retain_asd.eval.results import score_machine

TABLE3_CONDITION, TABLE3_SNR_DB = "mismatch", 0.0


@dataclass
class Table3:
    """Rows (method name) x machines: the official score per machine (no DN) and over all machines."""

    layer: int
    machines: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> machine | "official" -> score
    keys: dict[str, str] = field(default_factory=dict)  # method -> metric key part ("<encoder>/wave" | "/oracle")

    def markdown(self) -> str:
        head = ["method", *self.machines, "official"]
        lines = [f"Table 3: Mismatch at {TABLE3_SNR_DB:g} dB, layer {self.layer}, no domain normalisation (x100)",
                 "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name, row in self.rows.items():
            cells = [row.get(m, math.nan) for m in [*self.machines, "official"]]
            lines.append("| " + " | ".join([name] + ["–" if math.isnan(v) else f"{100 * v:.2f}" for v in cells]) + " |")
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics ``table3/<encoder>/<wave|oracle>/<machine|official>_raw`` (Table 3 uses no DN)."""
        import re

        out = {}
        for name, row in self.rows.items():
            slug = re.sub(r"[^A-Za-z0-9_./-]", "_", self.keys.get(name, name))
            for key, value in row.items():
                if not math.isnan(value):
                    out[f"table3/{slug}/{key}_raw"] = float(value)
        return out


def _score_rows(rows: Sequence[dict], emb: np.ndarray, k: int, metric: str) -> dict[str, float]:
    out, figures = {}, []
    for machine in sorted({r["machine"] for r in rows}):
        idx = {role: [i for i, r in enumerate(rows) if r["machine"] == machine and r["role"] == role]
               for role in ("ref_source", "ref_target", "test")}
        tests = [rows[i] for i in idx["test"]]
        res = score_machine(machine, emb[idx["ref_source"]], emb[idx["ref_target"]], emb[idx["test"]],
                            [r["label"] == "anomaly" for r in tests], [r["domain"] == "target" for r in tests],
                            [r["wav_name"] for r in tests], [r["section"] for r in tests], k, metric,
                            domain_norm=False, threshold=False)
        if res is not None:
            out[machine] = metrics.official_score([res.figures])
            figures.append(res.figures)
    out["official"] = metrics.official_score(figures) if figures else math.nan
    return out


def table3(evalsets: EvalSets, encoders: Sequence[tuple[str, str]], layer: int, *, lam: float = 0.5,
           k: int = 1, metric: str = "euclidean", pooling: str = "genrep", batch_size: int = 16) -> Table3:
    """Table 3 for `encoders` = [(name, checkpoint path), ...]; the first also gives the oracle row.

    Each encoder is read at `layer` (clamped to its depth). The oracle uses the same clean clips and the same
    scaled noise segments as the wave mixtures (``MixtureSource.parts``), mixed in the embedding space.
    """
    if not encoders:
        raise ValueError("table3: give at least one encoder")
    rows = evalsets.rows(TABLE3_CONDITION, TABLE3_SNR_DB)
    source = MixtureSource(evalsets.corpus_root)
    clean, noise = source.parts(rows)
    out = Table3(layer, sorted({r["machine"] for r in rows}))
    for i, (name, path) in enumerate(encoders):
        embedder = Embedder(path, pooling=pooling, batch_size=batch_size)
        use = min(layer, embedder.model.num_layers) if hasattr(embedder.model, "num_layers") else layer
        wave = embedder.embed_waveforms(clean + noise, [use])[use]
        out.rows[f"{name} (wave mixture)"] = _score_rows(rows, wave, k, metric)
        out.keys[f"{name} (wave mixture)"] = f"{name}/wave"
        if i == 0:
            parts = [embed_oracle(embedder.model, clean[s:s + batch_size], noise[s:s + batch_size], use, lam,
                                  pooling)[use] for s in range(0, len(rows), batch_size)]
            oracle = np.concatenate([p.numpy() for p in parts])
            out.rows[f"{name} (embedding mixture, oracle)"] = _score_rows(rows, oracle, k, metric)
            out.keys[f"{name} (embedding mixture, oracle)"] = f"{name}/oracle"
    return out


def write_table3(table: Table3, out_dir: str | os.PathLike) -> list[Path]:
    """``table3.md`` and ``table3.png`` (a bar chart of the per-machine scores) under `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = fsio.write_text(out_dir / "table3.md", table.markdown())
    cols = [*table.machines, "official"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 3.2))
    width = 0.8 / max(1, len(table.rows))
    for j, (name, row) in enumerate(table.rows.items()):
        ax.bar(np.arange(len(cols)) + j * width, [100 * row.get(c, math.nan) for c in cols], width, label=name)
    ax.set_xticks(np.arange(len(cols)) + width * (len(table.rows) - 1) / 2, cols)
    ax.set_ylabel("official score (x100, no DN)")
    ax.set_title(f"Mismatch {TABLE3_SNR_DB:g} dB, layer {table.layer}")
    ax.legend(fontsize="x-small")
    from retain_asd.eval.report import save_figure

    return [md, save_figure(fig, out_dir / "table3.png")]


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
