"""Encoder families behind one loader: BEATs (`beats.py`) and EAT / SSLAM (`eat.py`).

The family is read from the checkpoint itself: BEATs stores a flat BEATs cfg (`encoder_layers`,
`input_patch_size`, ...), EAT / SSLAM the fairseq cfg with `model._name = data2vec_multi`. Both models
offer the same reading API: `extract_layers(waveforms, layers=...) -> ([(B, T*F, D)] per block, (T, F))`,
`num_layers`, `grid(num_samples)`, `freeze()`, and `cfg.to_dict()` for the embedding-cache identity.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from retain_asd.models.ckpt_io import (
    FAMILIES,
    CheckpointError,
    atomic_save,
    checkpoint_family,
    detect_family,
    numpy_safe_globals,
    read_checkpoint,
)


def load_encoder(path: str | os.PathLike, family: str | None = None,
                 map_location: str | torch.device | None = "cpu") -> nn.Module:
    """BEATs or EAT from a checkpoint, the family detected from its content.

    `family` ("beats" | "eat", e.g. `model.family` of the config): a checkpoint of the other family is
    an error naming the file and both families. Returns the model in eval mode.
    """
    from retain_asd.models import beats, eat

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
    if found == "eat":
        model = eat.model_from_checkpoint(ckpt, path)
        if isinstance(map_location, str | torch.device):
            model.to(map_location)
        return model
    try:
        return beats.load_beats(path, map_location)
    except beats.BEATsCheckpointError as err:
        raise CheckpointError(str(err)) from err


__all__ = ["FAMILIES", "CheckpointError", "atomic_save", "checkpoint_family", "detect_family", "load_encoder",
           "numpy_safe_globals", "read_checkpoint"]
