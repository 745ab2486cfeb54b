"""Encoder families behind one loader (`models/registry.py`): BEATs (`beats.py`) and EAT / SSLAM (`eat.py`).

The family is read from the checkpoint itself: each family's module says whether a loaded checkpoint is its own
(`is_checkpoint`: BEATs stores a flat BEATs cfg with `encoder_layers`, EAT / SSLAM the fairseq cfg with
`model._name = data2vec_multi`) and builds the model from it (`from_checkpoint`, strict load). Every model offers
the `registry.Encoder` reading API: `extract_layers(waveforms, layers=...) -> ([(B, T*F, D)] per block, (T, F))`,
`num_layers`, `embed_dim`, plus `grid(num_samples)`, `freeze()` and `cfg.to_dict()` (the embedding-cache identity).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from retain_asd.models.ckpt_io import (
    CheckpointError,
    atomic_save,
    checkpoint_family,
    detect_family,
    numpy_safe_globals,
    read_checkpoint,
)
from retain_asd.models.registry import FAMILIES, Encoder, family_module


def load_encoder(path: str | os.PathLike, family: str | None = None,
                 map_location: str | torch.device | None = "cpu") -> Encoder:
    """The encoder of a checkpoint, its family detected from the content (`registry.FAMILIES`).

    `family` (e.g. `model.family` of the config): a checkpoint of another family is an error naming the file and
    both families. Returns the model in eval mode.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"encoder family {family!r}: expected one of {list(FAMILIES)}")
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    found = detect_family(ckpt)
    if found is None:
        raise CheckpointError(f"{path}: neither a BEATs checkpoint (flat cfg with encoder_layers) nor an EAT / "
                              "SSLAM one (fairseq cfg with model._name = data2vec_multi)")
    if family is not None and found != family:
        raise CheckpointError(f"{path}: a {found} checkpoint, but model.family = {family!r}; set "
                              f"model.family={found} or pass a {family} checkpoint")
    return family_module(found).from_checkpoint(ckpt, path, map_location)


__all__ = ["FAMILIES", "CheckpointError", "Encoder", "atomic_save", "checkpoint_family", "detect_family",
           "load_encoder", "numpy_safe_globals", "read_checkpoint"]
