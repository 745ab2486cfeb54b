"""Training-state files inside a Ray Train checkpoint directory, and bit-exact state digests.

A checkpoint directory (merged by Ray Train from every worker's report) holds::

    train_state.pt      rank 0: step, student encoder, tagging head, optimizer, data position
    rng_rank<r>.pt      every rank: its own torch / numpy / python / SpecAugment RNG states
    digest_rank<r>.json every rank: sha256 of its student and teacher weights (DDP sync check), its Ray node id

The teacher is never saved: it is re-made from the initial BEATs checkpoint, which is frozen by
construction. Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAIN_STATE = "train_state.pt"


def state_digest(state: Any) -> str:
    """sha256 over a nested state (dicts sorted by key, lists, tensors' dtype/shape/bytes, scalars).

    Two states have the same digest iff their tensors are bit-identical (up to sha256 collisions).
    """
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for key in sorted(x, key=str):
                h.update(repr(key).encode())
                walk(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                walk(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- RNG states
def rng_state(spec_generator: torch.Generator, np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state, "python": random.getstate(),
            "specaug": spec_generator.get_state()}


def set_rng_state(state: dict, spec_generator: torch.Generator, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate(state["python"])
    spec_generator.set_state(state["specaug"])


# -------------------------------------------------------------------------------------------- save / load
def save_train_state(directory: str | os.PathLike, *, rank: int, step: int, student: torch.nn.Module,
                     head: torch.nn.Module | None, optimizer: torch.optim.Optimizer, data: dict, rng: dict,
                     digests: dict) -> None:
    """Write this rank's files into ``directory`` (rank 0 also writes the shared ``train_state.pt``)."""
    directory = Path(directory)
    if rank == 0:
        torch.save({"step": step, "student": student.state_dict(),
                    "head": head.state_dict() if head is not None else {},
                    "optimizer": optimizer.state_dict(), "data": data}, directory / TRAIN_STATE)
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    (directory / f"digest_rank{rank}.json").write_text(json.dumps({"step": step, **digests}))


def read_train_state(directory: str | os.PathLike) -> dict:
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a retain-asd training checkpoint (no {TRAIN_STATE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_train_state(directory: str | os.PathLike, *, rank: int, student: torch.nn.Module,
                     head: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Restore model, head and optimizer in place; returns (train_state, this rank's RNG state or None).

    The RNG file is None when the run restarts with more ranks than saved; the caller then reseeds.
    """
    state = read_train_state(directory)
    student.load_state_dict(state["student"], strict=True)
    if head is not None:
        head.load_state_dict(state["head"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    rng_path = Path(directory) / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    return state, rng


def read_digests(directory: str | os.PathLike) -> dict[int, dict]:
    """{rank: {"step", "student", "teacher", "teacher_initial", "node_id"}} from a checkpoint directory."""
    out = {}
    for path in sorted(Path(directory).glob("digest_rank*.json")):
        out[int(path.stem.removeprefix("digest_rank"))] = json.loads(path.read_text())
    return out
