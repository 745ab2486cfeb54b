"""Training-state files inside a Ray Train checkpoint directory, bit-exact state digests, and the RNGs of a
worker (`seed_rngs`, their states saved and restored with the train state).

A checkpoint directory (merged by Ray Train from every worker's report) holds::

    train_state.pt      rank 0: step, student encoder, tagging head, optimizer, data position
    rng_rank<r>.pt      every rank: its own torch / numpy / python / SpecAugment RNG states
    digest_rank<r>.json every rank: sha256 of its student and teacher weights (DDP sync check), its Ray node id

The teacher is never saved: it is re-made from the initial BEATs checkpoint, which is frozen by
construction. Everything is loaded with ``torch.load(weights_only=True)``.

With ``data.storage`` set, Ray Train keeps the checkpoint folders in an object store; the readers below then
take the folder's URI (``s3://bucket/runs/<out>/<name>/checkpoint_...``) and go through `retain_asd.storage`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from retain_asd import fsio, storage

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


def weights_digest(module: torch.nn.Module | None) -> str | None:
    """`state_digest` of a module's weights (None for no module)."""
    return state_digest(module.state_dict()) if module is not None else None


# -------------------------------------------------------------------------------------------- RNGs
@dataclass(frozen=True)
class WorkerRngs:
    """The random sources of one training worker, all derived from (seed, rank) by `seed_rngs`."""

    spec: torch.Generator  # SpecAugment masks
    np: np.random.Generator  # mixup ratios, snr_mixup SNRs
    stream_seed: int  # this rank's micro-batch iterator (`stream.iter_train_batches`)


def seed_rngs(seed: int, rank: int) -> WorkerRngs:
    """Seed every RNG of worker `rank`: torch's global RNG (dropout, layerdrop: they differ per rank), and
    the returned SpecAugment generator, numpy generator and stream seed. Call after building the models
    (`student.build_models` seeds their init with `seed` alone, so every rank starts from the same weights)."""
    worker_seed = seed * 1000 + rank
    spec = torch.Generator().manual_seed(worker_seed)
    np_rng = np.random.default_rng([seed, rank])
    torch.manual_seed(worker_seed)
    return WorkerRngs(spec, np_rng, worker_seed)


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
                     teacher: torch.nn.Module | None = None, teacher_initial: str | None = None,
                     node_id: str | None = None) -> None:
    """Write this rank's files into ``directory`` (rank 0 also writes the shared ``train_state.pt``).

    The digest file holds sha256 of this rank's student (encoder + head) and teacher weights, and
    `teacher_initial` (the teacher's `weights_digest` before training), so a reader can check that DDP kept
    the ranks identical and that the teacher never moved, and `node_id`, the Ray node the rank ran on.
    """
    directory = Path(directory)
    head_state = head.state_dict() if head is not None else {}
    if rank == 0:
        torch.save({"step": step, "student": student.state_dict(), "head": head_state,
                    "optimizer": optimizer.state_dict(), "data": data}, directory / TRAIN_STATE)
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    digests = {"student": state_digest({"student": student.state_dict(), "head": head_state}),
               "teacher_initial": teacher_initial, "teacher": weights_digest(teacher), "node_id": node_id}
    (directory / f"digest_rank{rank}.json").write_text(json.dumps({"step": step, **digests}))


class DiskFullError(OSError):
    """The checkpoint folder's file system has no room for the next checkpoint; names the folder and its free space."""


CHECKPOINT_MARGIN_BYTES = 1 << 20  # the completeness marker and Ray Train's own records beside the files


def checkpoint_room(storage_dir: str | os.PathLike | None, local_dir: str | os.PathLike, step: int,
                    device: str | torch.device = "cpu") -> str | None:
    """Before a checkpoint is persisted: None when ``storage_dir`` (where Ray Train copies it; None for an object
    store) has room for every rank's files, else the message of a clean stop (the folder, its free space, what
    is needed). Every rank of a process group (on `device`) calls it and gets the same answer (sizes summed, free
    space the least any rank saw), so they all stop together and the newest complete checkpoint stays the latest."""
    if storage_dir is None:
        return None
    import shutil

    import torch.distributed as dist

    mine = sum(p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file())
    os.makedirs(storage_dir, exist_ok=True)
    free = shutil.disk_usage(storage_dir).free
    if dist.is_available() and dist.is_initialized():
        sizes = torch.tensor([float(mine)], dtype=torch.float64, device=device)  # the group's device (NCCL: GPU)
        frees = torch.tensor([float(free)], dtype=torch.float64, device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
        dist.all_reduce(frees, op=dist.ReduceOp.MIN)
        mine, free = int(sizes.item()), int(frees.item())
    needed = mine + CHECKPOINT_MARGIN_BYTES
    if free >= needed:
        return None
    return (f"{storage_dir}: disk full: {free / 2**20:.1f} MiB free, the step-{step} checkpoint needs "
            f"{needed / 2**20:.1f} MiB; nothing of it was written and the newest complete checkpoint stays the "
            "latest. Free some space and run the same command again to resume")


def read_train_state(directory: str | os.PathLike) -> dict:
    """The rank-0 state of a checkpoint folder, local or in an object store (a URI)."""
    if storage.is_uri(directory):
        uri = storage.join(directory, TRAIN_STATE)
        if not storage.is_file(uri):
            raise FileNotFoundError(f"{uri}: not a retain-asd training checkpoint (no {TRAIN_STATE})")
        try:
            return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True, map_location="cpu")
        except Exception as err:  # a foreign or truncated object; pickle payloads refused
            raise fsio.CorruptFileError(uri, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                        f"delete the folder {directory} to resume from an earlier checkpoint") from None
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a retain-asd training checkpoint (no {TRAIN_STATE})")
    return fsio.load_torch(path, fix=f"delete the folder {path.parent} to resume from an earlier checkpoint")


def load_train_state(directory: str | os.PathLike, *, rank: int, student: torch.nn.Module,
                     head: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Restore model, head and optimizer in place; returns (train_state, this rank's RNG state or None).

    train_state["optimizer_sha256"] is the digest of the optimizer state as loaded (logged at resume). The RNG
    file is None when the run restarts with more ranks than saved; the caller then reseeds.
    """
    state = read_train_state(directory)
    student.load_state_dict(state["student"], strict=True)
    if head is not None:
        head.load_state_dict(state["head"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    state["optimizer_sha256"] = state_digest(optimizer.state_dict())
    rng_path = Path(directory) / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    return state, rng


def read_digests(directory: str | os.PathLike) -> dict[int, dict]:
    """{rank: {"step", "student", "teacher", "teacher_initial", "node_id"}} from a checkpoint directory."""
    out = {}
    for path in sorted(Path(directory).glob("digest_rank*.json")):
        out[int(path.stem.removeprefix("digest_rank"))] = json.loads(path.read_text())
    return out


# -------------------------------------------------------------------------------------------- completeness
# Ray Train writes a checkpoint folder rank by rank and records it in its run snapshot; a kill can leave a
# folder with some ranks' files, or a complete folder the snapshot never recorded. A folder counts as complete
# only when its marker, written last (after every rank's files were persisted), lists every file with its size
# and sha256 and they all match.
COMPLETE = "complete.json"
CHECKPOINT_GLOB = "checkpoint_*"


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mark_complete(directory: str | os.PathLike, step: int, filesystem=None) -> Path | str:
    """Write the completeness marker of a persisted checkpoint folder (atomically, as its last file).

    `filesystem`: Ray Train's pyarrow filesystem of the folder (`Checkpoint.filesystem`). In an object store the
    marker lists each file's size only (reading a checkpoint back to hash it would double its traffic; a PUT is
    atomic per object, so a present object is never torn) and is written last, in one PUT.
    """
    if filesystem is not None and not isinstance(filesystem, pafs.LocalFileSystem):
        base = str(directory).rstrip("/")
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
        files = {i.path[len(base):].lstrip("/"): {"bytes": i.size} for i in infos
                 if i.type == pafs.FileType.File and i.base_name != COMPLETE}
        if TRAIN_STATE not in files:
            raise FileNotFoundError(f"{base}: no {TRAIN_STATE}; not a complete training checkpoint")
        with filesystem.open_output_stream(f"{base}/{COMPLETE}") as f:
            f.write(json.dumps({"step": int(step), "files": dict(sorted(files.items()))}).encode())
        return f"{base}/{COMPLETE}"
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != COMPLETE and not fsio.is_temp(p)}
    if TRAIN_STATE not in files:
        raise FileNotFoundError(f"{directory}: no {TRAIN_STATE}; not a complete training checkpoint")
    return fsio.write_json(directory / COMPLETE, {"step": int(step), "files": files})


def complete_step(directory: str | os.PathLike, verify: bool = True) -> int | None:
    """The step of a complete checkpoint folder (marker present, every listed file there with its size and,
    with `verify`, its sha256 when the marker has one); None for an incomplete, torn or foreign one."""
    if storage.is_uri(directory):
        try:
            marker = json.loads(storage.read_bytes(storage.join(directory, COMPLETE)))
            sizes = storage.file_sizes(directory)
            if any(sizes.get(name) != meta["bytes"] for name, meta in marker["files"].items()):
                return None
            return int(marker["step"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    directory = Path(directory)
    try:
        marker = json.loads((directory / COMPLETE).read_text())
        for name, meta in marker["files"].items():
            path = directory / name
            if path.stat().st_size != meta["bytes"] or (verify and _file_digest(path) != meta["sha256"]):
                return None
        return int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _folders(run_dir: str | os.PathLike) -> list[Path | str]:
    if not storage.is_uri(run_dir):
        return [f for f in sorted(Path(run_dir).glob(CHECKPOINT_GLOB)) if f.is_dir()]
    return [storage.join(run_dir, name) for name in storage.list_names(run_dir)
            if fnmatch.fnmatch(name, CHECKPOINT_GLOB)]


def folder_name(folder: str | os.PathLike) -> str:
    """The last part of a local folder or a URI."""
    return str(folder).rstrip("/").rpartition("/")[2]


def complete_checkpoints(run_dir: str | os.PathLike, verify: bool = True) -> tuple[list[tuple[int, Path | str]],
                                                                                    list[Path | str]]:
    """([(step, folder)] of the complete checkpoints by step, [incomplete folders]) under a Ray Train run folder
    (a local folder: Paths; a URI: URIs)."""
    complete, incomplete = [], []
    for folder in _folders(run_dir):
        step = complete_step(folder, verify)
        (incomplete.append(folder) if step is None else complete.append((step, folder)))
    return sorted(complete, key=lambda sf: (sf[0], folder_name(sf[1]))), incomplete


def clean_checkpoints(run_dir: str | os.PathLike, keep: int) -> tuple[tuple[int, Path | str] | None,
                                                                      list[Path | str]]:
    """Remove incomplete checkpoint folders and the complete ones older than the newest `keep`.

    Returns ((step, folder) of the newest complete checkpoint or None, the removed folders). Call only while
    no run writes into `run_dir` (at the start or the end of `pretrain`).
    """
    complete, removed = complete_checkpoints(run_dir)
    removed += [folder for _, folder in complete[:-max(keep, 1)]]
    for folder in removed:
        storage.remove(folder)
    return (complete[-1] if complete else None), removed
