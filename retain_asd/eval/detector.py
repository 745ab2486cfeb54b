"""The deployable detector behind `retain-asd score` (pipelines/score.py).

Owns building a reference bank from a folder of normal clips (`build_reference_bank`: embeddings + a gamma-fit
decision threshold) and scoring a folder of clips against it (`score_with_bank`). Audio is read with
`audio.load_clips`, so an unreadable file is reported, never fatal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from retain_asd.audio import load_clips
from retain_asd.eval import knn, metrics
from retain_asd.eval.embed import Embedder


def _audio_paths(folder) -> list[str]:
    from retain_asd.corpus.names import is_audio_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of audio files")
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_audio_file(p))


def build_reference_bank(checkpoint: str | os.PathLike, normal_dir, *, layer: int, pooling: str = "genrep",
                         k: int = 1, metric: str = "euclidean", clip_s: float = 10.0, percentile: float = 0.9,
                         batch_size: int = 16) -> tuple[knn.MemoryBank, list[tuple[str, str]]]:
    """A deployable detector: embeddings of a folder of normal clips + a decision threshold.

    Threshold = `metrics.gamma_threshold` (90th percentile of a gamma fit) of the references' own
    leave-one-out kNN scores. Returns the bank and (path, reason) of the files that could not be read.
    """
    paths = _audio_paths(normal_dir)
    clips, bad = load_clips(paths, clip_s)
    good = [p for p in paths if p not in {b for b, _ in bad}]
    if len(good) <= k + 1:
        raise ValueError(f"{normal_dir}: {len(good)} readable normal clips; a bank needs more than k + 1 = {k + 1}")
    embedder = Embedder(checkpoint, pooling=pooling, batch_size=batch_size)
    emb = torch.from_numpy(embedder.embed_waveforms(clips, [layer])[layer].astype(np.float64))
    # One folder = one domain: the target bank is the source bank, so the score is d_source.
    ref_scores = knn.leave_one_out_distance(emb, k, metric)
    meta = {"files": [Path(p).name for p in good], "layer": layer, "pooling": pooling, "k": k, "metric": metric,
            "clip_s": clip_s, "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_hash": embedder.checkpoint_hash, "percentile": percentile,
            "threshold": metrics.gamma_threshold(ref_scores, percentile)}
    return knn.MemoryBank(Path(normal_dir).name, emb, emb, meta), bad


def score_with_bank(bank: knn.MemoryBank, clips_dir, checkpoint: str | os.PathLike | None = None,
                    batch_size: int = 16) -> tuple[list[tuple[str, float, int]], list[tuple[str, str]]]:
    """(file name, anomaly score, decision 0/1) per readable clip of `clips_dir`, and the unreadable files."""
    meta = bank.meta
    checkpoint = checkpoint or meta["checkpoint"]
    embedder = Embedder(checkpoint, pooling=meta["pooling"], batch_size=batch_size)
    if embedder.checkpoint_hash != meta["checkpoint_hash"]:
        raise ValueError(f"{checkpoint}: weights differ from the checkpoint the bank was built with "
                         f"({meta['checkpoint']}); rebuild the bank with `retain-asd score bank`")
    paths = _audio_paths(clips_dir)
    clips, bad = load_clips(paths, meta["clip_s"])
    good = [p for p in paths if p not in {b for b, _ in bad}]
    if not good:
        return [], bad
    emb = embedder.embed_waveforms(clips, [meta["layer"]])[meta["layer"]]
    scores = bank.score(emb, k=meta["k"], metric=meta["metric"])
    flags = metrics.decisions(scores, meta["threshold"])
    return [(Path(p).name, float(s), int(d)) for p, s, d in zip(good, scores, flags)], bad
