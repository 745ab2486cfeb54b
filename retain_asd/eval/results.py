"""Evaluation results and per-machine scoring, shared by both evaluation modes.

`score_machine` turns one machine's embeddings (references + tests) into kNN scores and DCASE figures
(`MachineResult`); cells (condition x SNR x layer x DN) collect them into an `EvalResult`, whose `metrics()`
gives the flat MLflow names. Used by the Factory A/B/Mismatch evaluation (`run.py`) and the DCASE-folder
mode (`dcase_mode.py`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from retain_asd.eval import knn, metrics


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
    threshold: float | None = None  # decision threshold: gamma fit (raw), normal 90% quantile (DN)


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
    primary: str = "dn"  # the reported figure (eval.primary): "dn" or "raw"; both are always computed
    layout: str = ""  # DCASE-folder mode: the tree's editions ("DCASE 2026", corpus/years.py)
    channel: str = ""  # DCASE-folder mode: the channel the clips were read on ("channel 0 (near mic)", "mono")
    run_id: str | None = None  # its MLflow run, when the evaluation was tracked
    scored_on: dict = field(default_factory=dict)  # eval.corpus / eval.split / eval.sizes (`EvalSets.scored_on`)

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
            cell = f"{pre}{cell_name(c)}"
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
                    if dn == (self.primary == "dn"):  # the primary figure, labelled: hmean_all_primary_dn
                        out[f"{where}hmean_low_primary_{self.primary}"] = row.hmean_low
                        out[f"{where}hmean_all_primary_{self.primary}"] = row.hmean_all
        return {k: float(v) for k, v in out.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------------- scoring
DN_THRESHOLD = 1.2815515655446004  # scipy.stats.norm.ppf(0.9)
def cell_name(c: Cell) -> str:
    return c.condition if math.isnan(c.snr_db) else f"{c.condition}/snr_{int(c.snr_db)}"


def _bank(machine: str, source: np.ndarray, target: np.ndarray, memmixup: int,
          memmixup_ratio: float = 0.9) -> knn.MemoryBank:
    if len(target) == 0:
        warnings.warn(f"{machine}: no target references; the source bank stands in for the target bank",
                      stacklevel=3)
        target = source
    as64 = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64))  # noqa: E731
    bank = knn.MemoryBank(machine, as64(source), as64(target))
    return bank.with_memmixup(memmixup, memmixup_ratio) if memmixup > 0 else bank


def score_machine(machine: str, ref_source: np.ndarray, ref_target: np.ndarray, test: np.ndarray, is_anomaly,
                  is_target, wav_names, sections, k: int, metric: str, domain_norm: bool, memmixup: int = 0,
                  threshold: bool = True, memmixup_ratio: float = 0.9) -> MachineResult | None:
    """kNN scores of one machine's tests against its banks and their DCASE figures (None if undefined)."""
    bank = _bank(machine, ref_source, ref_target, memmixup, memmixup_ratio)
    scores = bank.score(test, k=k, metric=metric, domain_norm=domain_norm)
    is_anomaly, is_target = np.asarray(is_anomaly, bool), np.asarray(is_target, bool)
    try:
        figures = metrics.machine_scores(scores, is_anomaly, is_target)
    except ValueError as err:
        warnings.warn(f"{machine}: no figures ({err})", stacklevel=2)
        return None
    thr = None
    if threshold and domain_norm:
        # DN scores are z-scores over the tests: the 90% quantile of a standard normal, the analogue of the
        # baseline's 90% gamma quantile (label-free, like the raw threshold).
        thr = DN_THRESHOLD
    elif threshold and len(ref_source) > k and len(ref_target) > k:
        # Decisions from the references' leave-one-out scores, never from test labels (DCASE baseline).
        thr = metrics.gamma_threshold(bank.reference_scores(k, metric))
    elif threshold and len(ref_source) > k and len(ref_target) == 0:  # source only (DCASE 2020)
        loo = knn.leave_one_out_distance(bank.source, k, metric)
        thr = metrics.gamma_threshold(np.asarray(loo, dtype=np.float64))
    return MachineResult(machine, list(wav_names), list(sections), scores, is_anomaly, is_target, figures, thr)
