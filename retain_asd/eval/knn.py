"""Memory banks and kNN anomaly scoring (GenRep, Saengthong et al.; code Phuriches/GenRepASD).

Scoring as in GenRep `run_genrep_dcase2023.py`: one bank of source references and one of target
references per machine; Euclidean distance; d_bank = mean of the k smallest distances; score =
min(d_source, d_target). Domain normalisation (DN, GenRep's default) z-scores each bank's distances
over the machine's test clips (np.std, ddof=0) before the min. MemMixup appends
``alpha * t + (1 - alpha) * s_j`` (alpha = 0.9) to the target bank for every target reference t and
its K nearest source references s_j (Euclidean), target-major, nearest first.

The kNN is exact and chunked over queries: Euclidean inputs are centred on the bank mean (the
distance is translation-invariant, and the offset is what makes ||q||^2 + ||b||^2 - 2 q.b cancel),
candidates come from that fast formula (float64 by default), and the chosen distances are
recomputed from explicit differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retain_asd import fsio

METRICS = ("euclidean", "cosine")


def _as_tensor(x, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


@torch.no_grad()
def knn_distance(
    queries,
    bank,
    k: int = 1,
    metric: str = "euclidean",
    chunk_size: int = 256,
    dtype: torch.dtype = torch.float64,
    refine: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in the bank.

    Args:
        queries: (Q, D) array or tensor. bank: (M, D).
        metric: "euclidean" (||q - b||) or "cosine" (1 - cos(q, b), sklearn's cosine distance).
        chunk_size: queries per chunk; memory is O(chunk_size * M).
        dtype: dtype of the candidate search (float64 default; float32 is faster on GPU). The
            returned distances are always recomputed in float64 from explicit differences.
        refine: extra candidates re-ranked exactly beyond k; default 0 for float64, 4 otherwise
            (float32 can swap near-ties).
    Returns:
        distances (Q, k) float64 ascending and indices (Q, k) int64 into `bank`, on the queries' device.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    q = _as_tensor(queries, torch.float64)
    b = _as_tensor(bank, torch.float64, q.device)
    for name, x in (("queries", q), ("bank", b)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D (N, D) array, got shape {tuple(x.shape)}")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have D={q.shape[1]} but bank has D={b.shape[1]}")
    if not 1 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [1, {b.shape[0]}] (bank size), got {k}")
    if refine is None:
        refine = 0 if dtype == torch.float64 else 4
    if metric == "euclidean":
        # Translation-invariant: centring on the bank mean removes the common offset that makes
        # ||q||^2 + ||b||^2 - 2 q.b cancel catastrophically for embeddings far from the origin.
        centre = b.mean(0)
        q, b = q - centre, b - centre
    q_norm, b_norm = torch.linalg.vector_norm(q, dim=1), torch.linalg.vector_norm(b, dim=1)  # (Q,), (M,)
    # A NaN/inf anywhere in a row makes its norm non-finite: one cheap check per input.
    for name, norm in (("queries", q_norm), ("bank", b_norm)):
        if not torch.isfinite(norm).all():
            rows = torch.nonzero(~torch.isfinite(norm))[:3, 0].tolist()
            raise ValueError(f"{name} contain NaN or inf (rows {rows}...)")
    if metric == "cosine":
        # Zero vectors stay zero (distance 1 to everything), as sklearn's normalize does.
        q = q / q_norm.clamp_min(1e-300)[:, None]
        b = b / b_norm.clamp_min(1e-300)[:, None]
        q_norm, b_norm = torch.ones_like(q_norm), torch.ones_like(b_norm)
    b_fast = b.to(dtype)
    b_sq = b_norm.to(dtype) ** 2  # (M,)
    n_cand = min(b.shape[0], k + refine)
    dists, idxs = [], []
    for q_chunk, q_sq in zip(q.split(chunk_size), (q_norm.to(dtype) ** 2).split(chunk_size)):
        dot = q_chunk.to(dtype) @ b_fast.T  # (C, M)
        if metric == "euclidean":
            approx = q_sq[:, None] + b_sq[None, :] - 2 * dot  # squared distances, (C, M)
        else:
            approx = -dot
        cand = approx.topk(n_cand, dim=1, largest=False, sorted=True).indices  # (C, n_cand)
        exact = torch.empty(cand.shape, dtype=torch.float64, device=q.device)
        for j in range(n_cand):  # (C, D) at a time: no (C, n_cand, D) temporary
            ref = b[cand[:, j]]
            if metric == "euclidean":
                exact[:, j] = torch.linalg.vector_norm(q_chunk - ref, dim=1)
            else:
                exact[:, j] = (1 - (q_chunk * ref).sum(1)).clamp(0, 2)  # sklearn clips to [0, 2]
        order = exact.argsort(dim=1, stable=True)[:, :k]
        dists.append(exact.gather(1, order))
        idxs.append(cand.gather(1, order))
    return torch.cat(dists), torch.cat(idxs)


def bank_distance(test_emb, bank, k: int = 1, metric: str = "euclidean", chunk_size: int = 256) -> np.ndarray:
    """d_bank per test clip: mean of the k smallest distances to the bank (GenRep). (N,) float64."""
    dist, _ = knn_distance(test_emb, bank, k=k, metric=metric, chunk_size=chunk_size)
    return dist.mean(1).cpu().numpy()


def domain_normalise(distances, test_group=None) -> np.ndarray:
    """GenRep DN: z-score the distances over each group's test clips, (d - mean) / std (ddof=0).

    `test_group` (N,) labels which machine each clip belongs to; None = one group (one machine).
    """
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    groups = np.zeros(d.shape, dtype=np.int64) if test_group is None else np.asarray(test_group).reshape(-1)
    if groups.shape != d.shape:
        raise ValueError(f"test_group has {groups.size} entries but there are {d.size} test clips")
    out = np.empty_like(d)
    for g in np.unique(groups):
        sel = groups == g
        std = d[sel].std()  # population std, as GenRep's np.std
        if not std > 0:
            raise ValueError(f"domain normalisation: distances of test group {g!r} have zero spread "
                             f"({int(sel.sum())} clips); DN needs at least two distinct distances")
        out[sel] = (d[sel] - d[sel].mean()) / std
    return out


def score_clips(
    test_emb,
    source_bank,
    target_bank,
    k: int = 1,
    metric: str = "euclidean",
    domain_norm: bool = False,
    test_group=None,
    chunk_size: int = 256,
) -> np.ndarray:
    """Anomaly score per test clip: min(d_source, d_target), optionally after DN. (N,) float64."""
    d_source = bank_distance(test_emb, source_bank, k, metric, chunk_size)
    d_target = bank_distance(test_emb, target_bank, k, metric, chunk_size)
    if domain_norm:
        d_source = domain_normalise(d_source, test_group)
        d_target = domain_normalise(d_target, test_group)
    return np.minimum(d_source, d_target)


@torch.no_grad()
def memmixup(source_bank, target_bank, K: int, ratio: float = 0.9) -> torch.Tensor:
    """Target bank augmented by MemMixup: [targets; ratio * t_i + (1 - ratio) * s_ij for j < K].

    s_ij is the j-th nearest source reference of t_i (Euclidean). Returns (Mt * (1 + K), D) float64.
    """
    if K < 1:
        raise ValueError(f"MemMixup K must be >= 1, got {K}")
    s = _as_tensor(source_bank, torch.float64)
    t = _as_tensor(target_bank, torch.float64, s.device)
    _, nearest = knn_distance(t, s, k=K)  # (Mt, K)
    mixed = ratio * t[:, None, :] + (1 - ratio) * s[nearest]  # (Mt, K, D)
    return torch.cat([t, mixed.reshape(-1, t.shape[1])])


def leave_one_out_distance(bank: torch.Tensor, k: int, metric: str) -> np.ndarray:
    """Mean of the k smallest distances of each bank entry to the *other* entries. (M,)"""
    if bank.shape[0] <= k:
        raise ValueError(f"leave-one-out kNN needs more than k={k} references, got {bank.shape[0]}")
    dist, idx = knn_distance(bank, bank, k=k + 1, metric=metric)
    own = idx == torch.arange(bank.shape[0], device=idx.device)[:, None]  # (M, k+1)
    # Drop the self match; with exact duplicates it may be absent, then drop the farthest.
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(idx[:, 0], k))
    keep = torch.ones_like(own)
    keep[torch.arange(bank.shape[0]), drop] = False
    return dist[keep].reshape(-1, k).mean(1).cpu().numpy()


@dataclass(frozen=True)
class MemoryBank:
    """Source and target reference embeddings of one machine, plus free-form provenance."""

    machine: str
    source: torch.Tensor  # (Ms, D)
    target: torch.Tensor  # (Mt, D)
    meta: dict[str, Any] = field(default_factory=dict)  # layer, pooling, checkpoint hash, ...

    def __post_init__(self):
        for name in ("source", "target"):
            _check_2d(f"MemoryBank({self.machine}).{name}", getattr(self, name))
        if self.source.shape[1] != self.target.shape[1]:
            raise ValueError(f"MemoryBank({self.machine}): source D={self.source.shape[1]} "
                             f"!= target D={self.target.shape[1]}")

    def score(self, test_emb, k: int = 1, metric: str = "euclidean", domain_norm: bool = False,
              test_group=None) -> np.ndarray:
        return score_clips(test_emb, self.source, self.target, k, metric, domain_norm, test_group)

    def with_memmixup(self, K: int, ratio: float = 0.9) -> MemoryBank:
        target = memmixup(self.source, self.target, K, ratio).to(self.target.dtype)
        return MemoryBank(self.machine, self.source, target, {**self.meta, "memmixup": [K, ratio]})

    def reference_scores(self, k: int = 1, metric: str = "euclidean") -> np.ndarray:
        """Leave-one-out scores of the references themselves (no DN): input to a decision threshold.

        A source reference's d_source excludes itself; its d_target uses the whole target bank
        (and the other way round), so each is scored as a held-out normal clip would be.
        """
        d_src_self = leave_one_out_distance(self.source, k, metric)
        d_tgt_self = leave_one_out_distance(self.target, k, metric)
        d_src_other = bank_distance(self.source, self.target, k, metric)
        d_tgt_other = bank_distance(self.target, self.source, k, metric)
        return np.concatenate([np.minimum(d_src_self, d_src_other), np.minimum(d_tgt_self, d_tgt_other)])

    def save(self, path) -> Path:
        return fsio.save_torch({"machine": self.machine, "source": self.source.cpu(),
                                "target": self.target.cpu(), "meta": self.meta}, path)

    @staticmethod
    def load(path) -> MemoryBank:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such bank file; write one with `retain-asd score bank`")
        blob = fsio.load_torch(path, fix="write it again with `retain-asd score bank`")
        missing = {"machine", "source", "target"} - set(blob if isinstance(blob, dict) else {})
        if missing:
            raise ValueError(f"{path}: not a MemoryBank file (missing {sorted(missing)})")
        return MemoryBank(blob["machine"], blob["source"], blob["target"], blob.get("meta", {}))
