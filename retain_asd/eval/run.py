"""The library evaluation: eval sets -> embeddings -> kNN scores -> DCASE metrics -> Table 2.

Owns the Factory A/B/Mismatch evaluation (`evaluate_checkpoint`), score files and reports. Result types and
per-machine scoring live in `results.py` (shared with the DCASE-folder mode, `dcase_mode.py`); the config
builder (`evaluate_from_config`, what pipelines/ and tune/ call) in `builder.py`; the deployable detector
(pipelines/score.py) in `detector.py`. Metrics come from `metrics.py`, kNN from `knn.py`, tables and plots
from `report.py`, evaluator-format files from `dcase_files.py`.

Metric names (MLflow, made by `results.EvalResult.metrics`): ``<condition>/snr_<dB>/official`` (raw kNN
scores) and ``..._dn`` (GenRep domain normalisation), per machine
``<condition>/snr_<dB>/<machine>/{auc_source,auc_target,pauc}[_dn]``, per condition
``<condition>/hmean_{low,all}[_dn]`` and overall ``hmean_low``, ``hmean_all`` (raw) and ``hmean_low_dn``,
``hmean_all_dn``. Layers other than the primary one get a ``layer_<k>/`` prefix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retain_asd.eval import dcase_files, metrics
from retain_asd.eval.embed import Embedder
from retain_asd.eval.evalsets import EvalSets, MixtureSource, row_key, scored_on_line
from retain_asd.eval.results import Cell, EvalResult, cell_name, score_machine


def evaluate_checkpoint(model_or_path, evalsets: EvalSets, layers: int | Sequence[int], *, k: int = 1,
                        metric: str = "euclidean", domain_norm: Sequence[bool] = (False, True), memmixup: int = 0,
                        pooling: str = "genrep", conditions: Sequence[str] | None = None,
                        cache_dir: str | os.PathLike | None = None, batch_size: int = 16, use_ray: bool = False,
                        name: str = "model", embedder: Embedder | None = None, memmixup_ratio: float = 0.9,
                        primary: str = "dn") -> EvalResult:
    """Every (condition, SNR) set x layer x DN on/off -> per-machine figures and the official score.

    `layers`: one 1-based layer or several (all from one forward per clip); the first is the primary.
    `memmixup`: 0 = off, K > 0 = MemMixup with the K nearest source references of each target reference,
    mixed at `memmixup_ratio`. `primary` ("dn" | "raw"): the figure reported first (both are computed).
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    embedder = embedder or Embedder(model_or_path, pooling=pooling, cache_dir=cache_dir, batch_size=batch_size)
    source = MixtureSource(evalsets.corpus_root)
    result = EvalResult(name, embedder.checkpoint_hash, layers[0], primary=primary, scored_on=evalsets.scored_on())
    for condition in conditions or ("factory_a", "factory_b", "mismatch"):
        for snr_db in evalsets.snrs_db:
            rows = evalsets.rows(condition, snr_db)
            keys = [row_key(r) for r in rows]
            by_key = dict(zip(keys, rows))
            load = lambda ks, by_key=by_key: source.mixtures([by_key[x] for x in ks])  # noqa: E731
            embs = embedder.embed_keyed(keys, load, layers, use_ray=use_ray)
            for layer in layers:
                for dn in domain_norm:
                    machines = {}
                    for machine in sorted({r["machine"] for r in rows}):
                        idx = {role: [i for i, r in enumerate(rows) if r["machine"] == machine and r["role"] == role]
                               for role in ("ref_source", "ref_target", "test")}
                        tests = [rows[i] for i in idx["test"]]
                        res = score_machine(
                            machine, embs[layer][idx["ref_source"]], embs[layer][idx["ref_target"]],
                            embs[layer][idx["test"]], [r["label"] == "anomaly" for r in tests],
                            [r["domain"] == "target" for r in tests], [r["wav_name"] for r in tests],
                            [r["section"] for r in tests], k, metric, dn, memmixup, memmixup_ratio=memmixup_ratio)
                        if res is not None:
                            machines[machine] = res
                    if machines:
                        official = metrics.official_score([m.figures for m in machines.values()])
                        result.cells.append(Cell(condition, snr_db, layer, dn, machines, official))
    return result


def write_score_files(result: EvalResult, out_dir: str | os.PathLike) -> list[Path]:
    """Evaluator-format anomaly_score (and decision_result, raw scores) files per cell, machine and section.

    Layout: ``<out>/<condition>/snr_<dB>/[layer_<k>/]{raw,dn}/anomaly_score_<machine>_section_<NN>_test.csv``.
    """
    written = []
    for c in result.cells:
        folder = Path(out_dir) / cell_name(c)
        if c.layer != result.primary_layer:
            folder = folder / f"layer_{c.layer}"
        folder = folder / ("dn" if c.domain_norm else "raw")
        for r in c.machines.values():
            machine = r.machine
            for section in sorted(set(r.sections)):
                sel = [i for i, s in enumerate(r.sections) if s == section]
                names = [r.wav_names[i] for i in sel]
                written.append(dcase_files.write_anomaly_scores(folder, machine, section, names, r.scores[sel]))
                if r.threshold is not None:
                    written.append(dcase_files.write_decisions(
                        folder, machine, section, names, metrics.decisions(r.scores[sel], r.threshold)))
    return written


# ---------------------------------------------------------------------------------------------------- reports
def write_reports(results: Sequence[EvalResult], out_dir: str | os.PathLike, primary: str | None = None) -> list[Path]:
    """Table 2 (markdown + CSV, raw and DN) and plots for several checkpoints side by side; each table's first
    column says which figure it holds, which one is primary (`primary`, default: the results' own) and what the
    scores were computed on (corpus, split, set sizes)."""
    from retain_asd.eval import report

    out_dir = Path(out_dir)
    paths = []
    scored_on = next((r.scored_on for r in results if r.scored_on), {})
    on = f"; {scored_on_line(scored_on)}" if scored_on else ""
    for dn in (False, True):
        table = {r.name: r.official_by_set(domain_norm=dn) for r in results if r.official_by_set(domain_norm=dn)}
        if not table:
            continue
        tag = "_dn" if dn else ""
        first = primary or (results[0].primary if results else "dn")
        label = ("DN" if dn else "raw") + (", primary" if dn == (first == "dn") else "") + on
        paths += [report.write_table2_markdown(table, out_dir / f"table2{tag}.md", label=label),
                  report.write_table2_csv(table, out_dir / f"table2{tag}.csv", label=label),
                  report.plot_score_vs_snr(table, out_dir / f"score_vs_snr{tag}.png")]
    if any(len(r.layers) > 1 for r in results):
        per_layer = {}
        for r in results:  # Fig. 2: the hmean over every set, per layer (DN, GenRep's default)
            per_layer[r.name] = {layer: r.table2(layer, True)[-1].hmean_all for layer in r.layers}
        paths.append(report.plot_score_per_layer(per_layer, out_dir / "score_per_layer.png"))
    return paths
