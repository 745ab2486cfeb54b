"""Encoder families behind one loader: BEATs (`beats.py`) and EAT / SSLAM (`eat.py`).

The family is read from the checkpoint itself: BEATs stores a flat BEATs cfg (`encoder_layers`,
`input_patch_size`, ...), EAT / SSLAM the fairseq cfg with `model._name = data2vec_multi`. Both models
offer the same reading API: `extract_layers(waveforms, layers=...) -> ([(B, T*F, D)] per block, (T, F))`,
`num_layers`, `grid(num_samples)`, `freeze()`, and `cfg.to_dict()` for the embedding-cache identity.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FAMILIES = ("beats", "eat")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong encoder family; names the file."""


def numpy_safe_globals() -> list:
    """numpy scalars / dtypes that fairseq writes into `extra_state` (meters): plain data, no code."""
    core = getattr(np, "_core", None) or np.core
    out: list = [np.dtype, (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                 (core.multiarray.scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            out.append(getattr(np.dtypes, name))
    return out


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu",
                    what: str = "an encoder checkpoint") -> Any:
    """`torch.load(path, weights_only=True)` (numpy scalars allowed), errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass the path of {what}")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        hint = (" (it holds Python objects a weights-only load refuses, e.g. a pickled class: only plain "
                "tensors and containers are accepted)" if "weights_only" in str(err) or "GLOBAL" in str(err)
                else "")
        raise CheckpointError(f"{path}: not a readable torch checkpoint{hint} ({type(err).__name__}: {first})"
                              ) from err


def detect_family(ckpt: Any) -> str | None:
    """'beats', 'eat', or None for a loaded checkpoint dict."""
    from retain_asd.models.eat import is_eat_checkpoint

    if is_eat_checkpoint(ckpt):
        return "eat"
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("cfg"), Mapping) and "model" in ckpt and \
            "encoder_layers" in ckpt["cfg"]:
        return "beats"
    return None


def checkpoint_family(path: str | os.PathLike) -> str:
    """The family of the checkpoint at `path`; CheckpointError if it is neither."""
    ckpt = read_checkpoint(path, "cpu")
    family = detect_family(ckpt)
    if family is None:
        raise CheckpointError(f"{path}: neither a BEATs checkpoint (flat cfg with encoder_layers) nor an EAT / "
                              "SSLAM one (fairseq cfg with model._name = data2vec_multi)")
    return family


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


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["FAMILIES", "CheckpointError", "atomic_save", "checkpoint_family", "detect_family", "load_encoder",
           "numpy_safe_globals", "read_checkpoint"]
