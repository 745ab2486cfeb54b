"""Memory banks and kNN anomaly scoring (GenRep, Saengthong et al.; code Phuriches/GenRepASD).

Scoring as in GenRep `run_genrep_dcase2023.py`: one bank of source references and one of target
references per machine; Euclidean distance; d_bank = mean of the k smallest distances; score =
min(d_source, d_target). Domain normalisation (DN, GenRep's default) z-scores each bank's distances
over the machine's test clips (np.std, ddof=0) before the min. MemMixup appends
``alpha * t + (1 - alpha) * s_j`` (alpha = 0.9) to the target bank for every target reference t and
its K nearest source references s_j (Euclidean), target-major, nearest first.

The kNN is exact and chunked over queries (on the CPU the chunks run in parallel threads, one BLAS
thread each, as sklearn's pairwise-distance reductions do): Euclidean inputs are centred (the distance is
translation-invariant, and the offset is what makes ||q||^2 + ||b||^2 - 2 q.b cancel), candidates come
from that formula as one float32 matrix product, kept wherever a rigorous rounding-error bound says they
could still be among the k nearest, and re-measured in float64 from explicit differences.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from retain_asd import fsio

METRICS = ("euclidean", "cosine")


def _as_tensor(x, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _as_float_tensor(x, device: torch.device) -> torch.Tensor:
    """A float32 or float64 tensor on `device` (other dtypes become float64); no copy when already so."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device, dtype=t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float64)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


# Unit roundoff of each candidate-search dtype: the bound on the dot-product error scales with it.
_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def _compute_device(queries, bank) -> torch.device:
    """CUDA when either input is a CUDA tensor (the kNN then runs there), else the CPU."""
    for x in (bank, queries):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


@torch.no_grad()
def knn_distance(
    queries,
    bank,
    k: int = 1,
    metric: str = "euclidean",
    chunk_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in the bank (sklearn ``NearestNeighbors(brute)``'s answer).

    Candidates come from one matrix product in `dtype` (squared distance = ||q||^2 + ||b||^2 - 2 q.b on
    centred inputs); every bank entry whose approximate distance could still beat the k-th best, given a
    rigorous bound on the product's rounding error (|fl(x.y) - x.y| <= D u ||x|| ||y|| / (1 - D u), Higham,
    *Accuracy and Stability*, Sec. 3.1), is then re-measured in float64 from explicit differences. The
    result is exact whatever `dtype`; float32 halves the product's cost. Exact ties go to the lower bank
    index. Runs on the GPU when either input is a CUDA tensor.

    Args:
        queries: (Q, D) array or tensor. bank: (M, D).
        metric: "euclidean" (||q - b||) or "cosine" (1 - cos(q, b), sklearn's cosine distance).
        chunk_size: queries per chunk; memory is O(chunk_size * M).
        dtype: dtype of the candidate search, float32 (default) or float64.
    Returns:
        distances (Q, k) float64 ascending and indices (Q, k) int64 into `bank`, on the compute device.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    device = _compute_device(queries, bank)
    q, b = _as_float_tensor(queries, device), _as_float_tensor(bank, device)  # float32 stays float32
    for name, x in (("queries", q), ("bank", b)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D (N, D) array, got shape {tuple(x.shape)}")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have D={q.shape[1]} but bank has D={b.shape[1]}")
    if not 1 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [1, {b.shape[0]}] (bank size), got {k}")
    if device.type == "cpu":
        return _knn_numpy(q.numpy(), b.numpy(), k, metric, chunk_size, _NUMPY_DTYPE[dtype])
    return _knn_torch(q, b, k, metric, chunk_size, dtype)


def _knn_torch(q: torch.Tensor, b: torch.Tensor, k: int, metric: str, chunk_size: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU path of `knn_distance`, in torch (it also runs on CPU tensors, which the tests use)."""
    if metric == "euclidean":
        # Translation-invariant: centring removes a common offset that would make the expansion cancel and
        # loosen the bound. Any centre is exact; the mean of <= 256 evenly spaced rows is cheap, and it is
        # applied only where the offset is large against the spread (it costs two passes over the bank).
        sample = b[:: max(1, b.shape[0] // 256)].to(torch.float64)
        centre = sample.mean(0)
        spread = torch.linalg.vector_norm(sample - centre, dim=1).mean()
        if torch.linalg.vector_norm(centre) > 0.25 * spread:  # exact distances still use q and b themselves
            q_low, b_low = _cast(q.to(torch.float64) - centre, dtype), _cast(b.to(torch.float64) - centre, dtype)
        else:
            q_low, b_low = _cast(q, dtype), _cast(b, dtype)  # x, y: the rows as the product sees them
    else:
        # Zero vectors stay zero (distance 1 to everything), as sklearn's normalize does.
        q, b = (x.to(torch.float64) / torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).clamp_min(1e-300)[:, None]
                for x in (q, b))
        q_low, b_low = _cast(q, dtype), _cast(b, dtype)
    q_sq, b_sq = _squared_norms(q_low), _squared_norms(b_low)  # (Q,) ||x||^2, (M,) ||y||^2, float64
    for name, sq in (("queries", q_sq), ("bank", b_sq)):  # a NaN/inf anywhere makes the norm so
        if not torch.isfinite(sq).all():
            rows = torch.nonzero(~torch.isfinite(sq))[:3, 0].tolist()
            raise ValueError(f"{name} contain NaN or inf (rows {rows}...)")
    q_norm, b_norm = q_sq.sqrt(), b_sq.sqrt()
    # |fl(x.y) - x.y| <= D u ||x|| ||y|| / (1 - D u) for the product, plus u (||x|| + ||y||) per distance
    # from rounding the centred rows to `dtype`: together <= (D + 8) u / 2 (||x|| + ||y||)^2, 2 % slack.
    u = _UNIT_ROUNDOFF[dtype]
    gamma = 1.02 * (q.shape[1] + 8) * u / 2 / (1 - q.shape[1] * u)
    with _highest_matmul_precision():
        dists, idxs = [], []
        for start in range(0, q.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            dot = _matmul_t(q_low[rows], b_low).to(torch.float64)  # (C, M)
            if metric == "euclidean":
                approx = q_sq[rows, None] + b_sq[None, :] - 2 * dot  # squared distances
            else:
                approx = 2 - 2 * dot  # ||x - y||^2 of unit vectors: the cosine order
            err = gamma * (q_norm[rows, None] + b_norm[None, :]) ** 2  # (C, M) bound on |approx - d^2|
            # Anything whose lower bound is within the k-th smallest upper bound may be a neighbour.
            threshold = (approx + err).topk(k, dim=1, largest=False).values[:, -1:]  # (C, 1)
            lower = approx - err
            n_cand = int((lower <= threshold).sum(1).max())
            cand = lower.topk(n_cand, dim=1, largest=False).indices.sort(dim=1).values  # (C, n), index order
            exact = _exact_distances(q[rows], b, cand, lower.gather(1, cand) <= threshold, metric)
            order = exact.argsort(dim=1, stable=True)[:, :k]  # stable on index order: ties to the lower index
            dists.append(exact.gather(1, order))
            idxs.append(cand.gather(1, order))
    return torch.cat(dists), torch.cat(idxs)


def _knn_numpy(q: np.ndarray, b: np.ndarray, k: int, metric: str, chunk_size: int,
               dtype: type) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path of `knn_distance`, all in numpy (one BLAS, no torch thread pool next to it).

    Same method and guarantee as the torch path; what differs is the cost: float32 input is searched
    without any cast of the bank (GenRep embeddings are float32), the squared norms are summed in the
    search dtype (their rounding error, <= D u ||x||^2 each, is added to the bound), and the (C, M) pass
    is done in place on one float64 matrix plus one for the bound.
    """
    if metric == "euclidean":
        # Translation-invariant: a centre c removes a common offset that would make the expansion cancel.
        # Any c is exact; it is applied only where the offset is large against the spread.
        sample = b[:: max(1, b.shape[0] // 64)]  # <= 127 evenly spaced rows, no copy
        centre = sample.mean(0, dtype=np.float64)
        spread = np.linalg.norm(sample - centre, axis=1).mean()
        if np.linalg.norm(centre) > 0.25 * spread:
            if q.dtype == dtype == b.dtype:  # x = fl(q - c) with c in `dtype`: one rounding, as a cast
                c = centre.astype(dtype)
                x, y = q - c, b - c
            else:
                x, y = (q.astype(np.float64) - centre).astype(dtype), (b.astype(np.float64) - centre).astype(dtype)
        else:
            x, y = q.astype(dtype, copy=False), b.astype(dtype, copy=False)  # no copy for float32 input
    else:
        # Zero vectors stay zero (distance 1 to everything), as sklearn's normalize does.
        q, b = (a / np.maximum(np.linalg.norm(a, axis=1), 1e-300)[:, None]
                for a in (q.astype(np.float64), b.astype(np.float64)))
        x, y = q.astype(dtype), b.astype(dtype)
    x_sq = np.einsum("nd,nd->n", x, x).astype(np.float64)  # (Q,) ||x||^2, summed in `dtype`
    y_sq = np.einsum("nd,nd->n", y, y).astype(np.float64)  # (M,)
    for name, sq in (("queries", x_sq), ("bank", y_sq)):  # a NaN/inf anywhere makes the norm so
        if not np.isfinite(sq).all():
            rows = np.flatnonzero(~np.isfinite(sq))[:3].tolist()
            raise ValueError(f"{name} contain NaN or inf, or values too large for a {np.dtype(dtype).name} "
                             f"search (rows {rows}...); for the latter pass dtype=torch.float64")
    x_norm, y_norm = np.sqrt(x_sq), np.sqrt(y_sq)
    # Bound on |approx - d^2|: D u ||x|| ||y|| / (1 - D u) twice for 2 x.y, D u / (1 - D u) ||.||^2 for each
    # norm summed in `dtype`, 2 u (||x|| + ||y||) d for rounding the rows to `dtype`; together
    # <= ((D + 8) u / (1 - D u)) (||x|| + ||y||)^2, with 2 % slack for the float64 arithmetic below.
    D, u = q.shape[1], float(np.finfo(dtype).eps) / 2
    gamma = 1.02 * (D + 8) * u / (1 - D * u)

    def chunk(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        approx = (x[rows] @ y.T).astype(np.float64)  # (C, M) x.y
        approx *= -2
        approx += y_sq
        approx += x_sq[rows, None]  # ~ squared distances
        err = np.add.outer(x_norm[rows], y_norm)
        err *= err
        err *= gamma  # (C, M) bound on |approx - d^2|
        err += approx  # upper bound on d^2
        # Anything whose lower bound is within the k-th smallest upper bound may be a neighbour.
        threshold = np.partition(err, k - 1, axis=1)[:, k - 1 : k]  # (C, 1)
        err -= approx
        approx -= err  # lower bound on d^2
        qi, cj = np.nonzero(approx <= threshold)  # (P,) pairs, query-major, index order within a query
        exact = _exact_pairs(q[rows], b, qi, cj, metric)
        order = np.lexsort((cj, exact, qi))  # per query: distance, then the lower bank index on ties
        first = np.searchsorted(qi[order], np.arange(approx.shape[0]))  # each query has >= k candidates
        pick = order[first[:, None] + np.arange(k)]  # (C, k)
        return exact[pick], cj[pick].astype(np.int64)

    # sklearn's scheme (pairwise-distance reductions): query chunks run in parallel, one BLAS thread each.
    # Measured on 2 shared cores: as fast as OpenBLAS's own 2 threads when idle, 2-3x faster under load,
    # where its threads spin-wait on each other inside every product.
    n_rows, workers = q.shape[0], _cpu_workers()
    n_chunks = max(-(-n_rows // chunk_size), min(workers, n_rows))
    bounds = np.linspace(0, n_rows, n_chunks + 1).round().astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with threadpool_limits(1, user_api="blas"):
        if workers == 1 or n_chunks == 1:
            parts = [chunk(rows) for rows in slices]
        else:
            with ThreadPoolExecutor(min(workers, n_chunks)) as pool:
                parts = list(pool.map(chunk, slices))
    return (torch.from_numpy(np.concatenate([d for d, _ in parts])),
            torch.from_numpy(np.concatenate([i for _, i in parts])))


def _cpu_workers() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _exact_pairs(q: np.ndarray, b: np.ndarray, qi: np.ndarray, cj: np.ndarray, metric: str) -> np.ndarray:
    """float64 distance of each (query qi, bank row cj) pair from explicit differences, in blocks. (P,)"""
    out = np.empty(qi.shape, np.float64)
    step = max(1, (1 << 18) // q.shape[1])  # pairs per block: 2 MB of float64 rows, cache-sized (3x faster
    # than 16 MB blocks for 221 pairs x 6,144 dims here)
    for s in range(0, qi.size, step):
        mine, ref = q[qi[s : s + step]].astype(np.float64), b[cj[s : s + step]].astype(np.float64, copy=False)
        if metric == "euclidean":
            mine -= ref
            out[s : s + step] = np.sqrt(np.einsum("pd,pd->p", mine, mine))
        else:  # unit vectors; sklearn clips to [0, 2]
            out[s : s + step] = np.clip(1 - np.einsum("pd,pd->p", mine, ref), 0, 2)
    return out


def _exact_distances(q: torch.Tensor, b: torch.Tensor, cand: torch.Tensor, keep: torch.Tensor,
                     metric: str) -> torch.Tensor:
    """float64 distance of each query to its kept candidates, from explicit differences; inf elsewhere. (C, n)

    Only the (query, candidate) pairs in `keep` are measured, all in one gather. Cosine inputs are unit vectors.
    """
    qi, cj = keep.nonzero(as_tuple=True)  # (P,) pairs
    ref = b[cand[qi, cj]].to(torch.float64)  # (P, D)
    mine = q[qi].to(torch.float64)
    if metric == "euclidean":
        pair = torch.linalg.vector_norm(mine - ref, dim=1)
    else:
        pair = (1 - (mine * ref).sum(1)).clamp(0, 2)  # sklearn clips to [0, 2]
    exact = torch.full(cand.shape, torch.inf, dtype=torch.float64, device=q.device)
    exact[qi, cj] = pair
    return exact


# The torch path below runs on CUDA tensors only (the CPU takes `_knn_numpy`).
_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N,) float64 sum of squares, accumulated in float64."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) ** 2


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T: (C, D) x (M, D) -> (C, M)."""
    return a @ b.T


class _highest_matmul_precision:
    """float32 products in IEEE float32 (no TF32/bf16 shortcuts), which the error bound assumes."""

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


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
