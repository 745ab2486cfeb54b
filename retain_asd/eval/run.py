"""Evaluate checkpoints end to end: eval sets -> embeddings -> kNN scores -> DCASE metrics -> Table 2.

Owns the Factory A/B/Mismatch evaluation (`evaluate_checkpoint`), its result types (`EvalResult`, `Cell`,
`MachineResult`), per-machine scoring (`score_machine`), score files, reports and the config builder
(`evaluate_from_config`, what pipelines/evaluate.py and tune/ call). The DCASE-folder mode lives in
`dcase_mode.py`, the deployable detector (pipelines/score.py) in `detector.py`. Metrics come from `metrics.py`,
kNN from `knn.py`, tables and plots from `report.py`, evaluator-format files from `dcase_files.py`.

Metric names (MLflow): ``<condition>/snr_<dB>/official`` (raw kNN scores) and ``..._dn`` (GenRep domain
normalisation), per machine ``<condition>/snr_<dB>/<machine>/{auc_source,auc_target,pauc}[_dn]``, per
condition ``<condition>/hmean_{low,all}[_dn]`` and overall ``hmean_low``, ``hmean_all`` (raw) and
``hmean_low_dn``, ``hmean_all_dn``. Layers other than the primary one get a ``layer_<k>/`` prefix.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retain_asd import fsio
from retain_asd.eval import dcase_files, knn, metrics
from retain_asd.eval.embed import Embedder
from retain_asd.eval.evalsets import EvalSets, MixtureSource, row_key


@dataclass(frozen=True)
class MachineResult:
    """Scores and figures of one machine in one cell (condition x SNR x layer x DN)."""

    machine: str  # machine type, as in the evaluator file names
    wav_names: list[str]
    sections: list[str]
    scores: np.ndarray  # (N,) higher = more anomalous
    is_anomaly: np.ndarray  # (N,) bool
    is_target: np.ndarray  # (N,) bool
    figures: metrics.MachineScore
    threshold: float | None = None  # gamma-fit decision threshold (raw scores only)


@dataclass(frozen=True)
class Cell:
    condition: str
    snr_db: float
    layer: int
    domain_norm: bool
    machines: dict[str, MachineResult]
    official: float


@dataclass
class EvalResult:
    """All cells of one checkpoint."""

    name: str
    checkpoint_hash: str
    primary_layer: int
    cells: list[Cell] = field(default_factory=list)

    def official_by_set(self, layer: int | None = None, domain_norm: bool = False) -> dict[tuple[str, int], float]:
        layer = self.primary_layer if layer is None else layer
        return {(c.condition, int(c.snr_db)): c.official for c in self.cells
                if c.layer == layer and c.domain_norm == domain_norm and not math.isnan(c.snr_db)}

    def table2(self, layer: int | None = None, domain_norm: bool = False) -> list[metrics.Table2Row]:
        return metrics.table2(self.official_by_set(layer, domain_norm))

    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.cells})

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics (see the module docstring); NaN figures are left out."""
        out: dict[str, float] = {}
        for c in self.cells:
            pre = "" if c.layer == self.primary_layer else f"layer_{c.layer}/"
            dn = "_dn" if c.domain_norm else ""
            cell = f"{pre}{_cell_name(c)}"
            out[f"{cell}/official{dn}"] = c.official
            for m, r in c.machines.items():
                for name in ("auc_source", "auc_target", "pauc"):
                    out[f"{cell}/{m}/{name}{dn}"] = getattr(r.figures, name)
        for layer in self.layers:
            pre = "" if layer == self.primary_layer else f"layer_{layer}/"
            for dn in (False, True):
                if not self.official_by_set(layer, dn):
                    continue
                suffix = "_dn" if dn else ""
                for row in self.table2(layer, dn):
                    where = pre if row.condition == "all" else f"{pre}{row.condition}/"
                    out[f"{where}hmean_low{suffix}"] = row.hmean_low
                    out[f"{where}hmean_all{suffix}"] = row.hmean_all
        return {k: float(v) for k, v in out.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------------- scoring
def _cell_name(c: Cell) -> str:
    return c.condition if math.isnan(c.snr_db) else f"{c.condition}/snr_{int(c.snr_db)}"


def _bank(machine: str, source: np.ndarray, target: np.ndarray, memmixup: int) -> knn.MemoryBank:
    if len(target) == 0:
        warnings.warn(f"{machine}: no target references; the source bank stands in for the target bank",
                      stacklevel=3)
        target = source
    as64 = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64))  # noqa: E731
    bank = knn.MemoryBank(machine, as64(source), as64(target))
    return bank.with_memmixup(memmixup) if memmixup > 0 else bank


def score_machine(machine: str, ref_source: np.ndarray, ref_target: np.ndarray, test: np.ndarray, is_anomaly,
                  is_target, wav_names, sections, k: int, metric: str, domain_norm: bool, memmixup: int = 0,
                  threshold: bool = True) -> MachineResult | None:
    """kNN scores of one machine's tests against its banks and their DCASE figures (None if undefined)."""
    bank = _bank(machine, ref_source, ref_target, memmixup)
    scores = bank.score(test, k=k, metric=metric, domain_norm=domain_norm)
    is_anomaly, is_target = np.asarray(is_anomaly, bool), np.asarray(is_target, bool)
    try:
        figures = metrics.machine_scores(scores, is_anomaly, is_target)
    except ValueError as err:
        warnings.warn(f"{machine}: no figures ({err})", stacklevel=2)
        return None
    thr = None
    if threshold and not domain_norm and len(ref_source) > k and len(ref_target) > k:
        # Decisions from the references' leave-one-out scores, never from test labels (DCASE baseline).
        thr = metrics.gamma_threshold(bank.reference_scores(k, metric))
    return MachineResult(machine, list(wav_names), list(sections), scores, is_anomaly, is_target, figures, thr)


def evaluate_checkpoint(model_or_path, evalsets: EvalSets, layers: int | Sequence[int] = 6, *, k: int = 1,
                        metric: str = "euclidean", domain_norm: Sequence[bool] = (False, True), memmixup: int = 0,
                        pooling: str = "genrep", conditions: Sequence[str] | None = None,
                        cache_dir: str | os.PathLike | None = None, batch_size: int = 16, use_ray: bool = False,
                        name: str = "model", embedder: Embedder | None = None) -> EvalResult:
    """Every (condition, SNR) set x layer x DN on/off -> per-machine figures and the official score.

    `layers`: one 1-based layer or several (all from one forward per clip); the first is the primary.
    `memmixup`: 0 = off, K > 0 = MemMixup with the K nearest source references of each target reference.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    embedder = embedder or Embedder(model_or_path, pooling=pooling, cache_dir=cache_dir, batch_size=batch_size)
    source = MixtureSource(evalsets.corpus_root)
    result = EvalResult(name, embedder.checkpoint_hash, layers[0])
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
                            [r["section"] for r in tests], k, metric, dn, memmixup)
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
        folder = Path(out_dir) / _cell_name(c)
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
def write_reports(results: Sequence[EvalResult], out_dir: str | os.PathLike) -> list[Path]:
    """Table 2 (markdown + CSV, raw and DN) and plots for several checkpoints side by side."""
    from retain_asd.eval import report

    out_dir = Path(out_dir)
    paths = []
    for dn in (False, True):
        table = {r.name: r.official_by_set(domain_norm=dn) for r in results if r.official_by_set(domain_norm=dn)}
        if not table:
            continue
        tag = "_dn" if dn else ""
        paths += [report.write_table2_markdown(table, out_dir / f"table2{tag}.md"),
                  report.write_table2_csv(table, out_dir / f"table2{tag}.csv"),
                  report.plot_score_vs_snr(table, out_dir / f"score_vs_snr{tag}.png")]
    if any(len(r.layers) > 1 for r in results):
        per_layer = {}
        for r in results:  # Fig. 2: the hmean over every set, per layer (DN, GenRep's default)
            per_layer[r.name] = {layer: r.table2(layer, True)[-1].hmean_all for layer in r.layers}
        paths.append(report.plot_score_per_layer(per_layer, out_dir / "score_per_layer.png"))
    return paths


# ---------------------------------------------------------------------------------------------------- builders
def resolve_checkpoint(spec: str, cfg, out_dir: Path) -> tuple[str, str, bool]:
    """(name, path, is_frozen) of a --checkpoint value: a BEATs .pt, a folder holding one, or "frozen"."""
    from retain_asd.models.beats import beats_base, beats_tiny, write_random_checkpoint

    if spec == "frozen":
        if cfg.model.checkpoint:
            if not Path(cfg.model.checkpoint).is_file():
                raise FileNotFoundError(f"model.checkpoint = {cfg.model.checkpoint!r}: file not found; 'frozen' "
                                        "evaluates that checkpoint: pass an official BEATs .pt")
            return "frozen", cfg.model.checkpoint, True
        warnings.warn("model.checkpoint is empty: 'frozen' is a RANDOM encoder (fine for smoke runs only)",
                      stacklevel=2)
        path = out_dir / "frozen_random.pt"
        if not path.is_file():
            write_random_checkpoint(path, beats_tiny() if cfg.model.size == "tiny" else beats_base(), cfg.train.seed)
        return "frozen", str(path), True
    path = Path(spec)
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*.pt")) if not p.name.startswith(".")]
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one BEATs .pt file inside, found {len(found)}; "
                                    "pass the file itself")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; pass a BEATs .pt file or 'frozen'")
    return path.stem, str(path), False


def check_checkpoints(resolved: Sequence[tuple[str, str, bool]], layer: int,
                      layers: Sequence[int] | None = None) -> dict[str, int]:
    """Open every checkpoint before any is used: {path: number of encoder layers}.

    A torn or foreign file raises BEATsCheckpointError naming it; ``eval.layer`` (students) and every extra
    ``layers`` entry must exist in each encoder (ConfigError naming the checkpoint and its depth).
    """
    from retain_asd.config import check_layer
    from retain_asd.models.beats import load_beats

    depths = {}
    for _, path, frozen in resolved:
        if path not in depths:
            depths[path] = load_beats(path).num_layers
        if not frozen:  # the frozen baseline uses layer 12, clamped to a smaller encoder's depth
            check_layer(layer, depths[path], "eval.layer", path)
        for extra in layers or ():
            check_layer(extra, depths[path], "--layers", path)
    return depths


def evaluate_from_config(cfg, checkpoints: Sequence[str], out_dir: str | os.PathLike,
                         layers: Sequence[int] | None = None, use_ray: bool = False,
                         dcase_root: str | os.PathLike | None = None,
                         ground_truth_dir: str | os.PathLike | None = None) -> list[EvalResult]:
    """Builder: evaluate each checkpoint (or "frozen") on the config's eval sets (or a DCASE folder),
    write tables, plots and score files under `out_dir/<name>/`, and log one MLflow run per checkpoint."""
    import mlflow

    from retain_asd.config import load_config, to_dict
    from retain_asd.eval.dcase_mode import evaluate_dcase  # lazy: dcase_mode imports this module
    from retain_asd.eval.evalsets import evalsets_from_config
    from retain_asd.tracking import log_metrics, mlflow_run, resolve_tracking_uri

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fsio.remove_stale_temps(out_dir, recursive=True)  # temp files of an evaluate that was killed
    e = cfg.eval
    resolved = [resolve_checkpoint(spec, cfg, out_dir) for spec in checkpoints]  # a bad path fails first
    depths = check_checkpoints(resolved, e.layer, layers)  # then a torn / foreign file, or a missing layer
    sets = None if dcase_root else evalsets_from_config(cfg)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir)
    cache_dir = Path(cfg.data.work_dir) / "embeddings"
    results, seen = [], {}
    for name, path, frozen in resolved:
        seen[name] = seen.get(name, 0) + 1
        name = name if seen[name] == 1 else f"{name}_{seen[name]}"
        num_layers = depths[path]
        primary = load_config("frozen").eval.layer if frozen else e.layer  # SSL baselines: layer 12
        if primary > num_layers:
            warnings.warn(f"{name}: layer {primary} > the encoder's {num_layers} blocks; using {num_layers}",
                          stacklevel=2)
            primary = num_layers
        use_layers = [primary] + [x for x in (layers or []) if x != primary and x <= num_layers]
        embedder = Embedder(path, pooling=e.pooling, cache_dir=cache_dir, batch_size=e.batch_size)
        run_dir = out_dir / name
        if dcase_root:
            result = evaluate_dcase(embedder, dcase_root, use_layers, ground_truth_dir=ground_truth_dir, k=e.k,
                                    metric=e.metric, clip_s=cfg.data.clip_s, name=name)
        else:
            result = evaluate_checkpoint(path, sets, use_layers, k=e.k, metric=e.metric,
                                         memmixup=5 if e.memmixup else 0, conditions=e.conditions,
                                         use_ray=use_ray, name=name, embedder=embedder)
        write_score_files(result, run_dir / "scores")
        if not dcase_root:
            write_reports([result], run_dir)
        params = {"config": to_dict(cfg), "checkpoint": path, "checkpoint_hash": result.checkpoint_hash,
                  "layers": use_layers, "mode": "dcase" if dcase_root else "evalsets"}
        with mlflow_run(uri, cfg.tracking.experiment, f"evaluate-{name}", params, {"kind": "evaluate"}):
            log_metrics(result.metrics())
            mlflow.log_artifacts(str(run_dir), artifact_path="evaluate")
        results.append(result)
    if not dcase_root and len(results) > 1:
        write_reports(results, out_dir)
    return results
