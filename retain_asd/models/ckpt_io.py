"""Checkpoint reading shared by the encoder families (no model code here, so beats.py and eat.py can both
import it): weights-only loading with errors naming the file, family detection, atomic saving."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retain_asd import fsio
from retain_asd.models.registry import FAMILIES, family_module

EAT_MODEL_NAME = "data2vec_multi"  # fairseq `cfg.model._name` of EAT / SSLAM checkpoints


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong encoder family; names the file."""


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(model: torch.nn.Module, state_dict: Any, source: str | os.PathLike = "state dict", *,
                     family: str = "encoder", error: type[Exception] = CheckpointError) -> None:
    """The strict check of every family before `load_state_dict(strict=True)`: raise `error` naming `source` and the
    first missing, unexpected, non-tensor or wrongly shaped keys against the `family` model built from its cfg."""
    if not isinstance(state_dict, Mapping):
        raise error(f"{source}: 'model' must be a state dict, got {type(state_dict).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    shapes = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and k not in not_tensors and state_dict[k].shape != v.shape]
    if missing or unexpected or not_tensors or shapes:
        parts = [f"{name}: {_first(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("not a tensor", not_tensors),
                  ("shape (checkpoint != cfg)", shapes)) if keys]
        raise error(f"{source}: state dict does not match the {family} built from its cfg; " + "; ".join(parts))


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
    problem = fsio.torch_file_problem(path)  # before any memory is allocated
    if problem:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (refused before loading: {problem})")
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


def is_eat_checkpoint(ckpt: Any) -> bool:
    """True for the fairseq layout of an EAT / SSLAM (data2vec_multi) checkpoint."""
    cfg = ckpt.get("cfg") if isinstance(ckpt, Mapping) else None
    return isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) and \
        cfg["model"].get("_name") == EAT_MODEL_NAME


def detect_family(ckpt: Any) -> str | None:
    """The family (`registry.FAMILIES`: 'beats', 'eat') whose module claims a loaded checkpoint dict, or None."""
    return next((name for name in FAMILIES if family_module(name).is_checkpoint(ckpt)), None)


def checkpoint_family(path: str | os.PathLike) -> str:
    """The family of the checkpoint at `path`; CheckpointError if it is neither."""
    ckpt = read_checkpoint(path, "cpu")
    family = detect_family(ckpt)
    if family is None:
        raise CheckpointError(f"{path}: neither a BEATs checkpoint (flat cfg with encoder_layers) nor an EAT / "
                              "SSLAM one (fairseq cfg with model._name = data2vec_multi)")
    return family


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
