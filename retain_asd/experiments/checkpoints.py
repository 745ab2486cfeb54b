"""Checkpoint resolution: what a --checkpoint value (or an experiment point's student) means as a file to score.

"frozen" is the config's initial encoder (model.checkpoint, or the stand-in foundation encoder, trained once and
cached, or a seeded random one); a .pt, a pre-training out folder, an object-store URI or a registered model
version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) is a local file. This happens here, above training and
evaluation, so scoring a checkpoint (`retain_asd.eval`) never trains one.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from retain_asd import fsio, storage, tracking
from retain_asd.config import Config
from retain_asd.eval.builder import SOURCE_URI, ResolvedCheckpoint, provenance
from retain_asd.train.launch import initial_encoder


def resolve_checkpoints(cfg: Config, specs: Sequence[str], out_dir: str | os.PathLike) -> list[ResolvedCheckpoint]:
    """Every --checkpoint value resolved (`resolve_checkpoint`), before any is scored: a bad path fails first."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # a random "frozen" encoder is written there
    return [resolve_checkpoint(spec, cfg, Path(out_dir)) for spec in specs]


def resolve_checkpoint(spec: str, cfg: Config, out_dir: Path) -> ResolvedCheckpoint:
    """(row name, path, is_frozen) of a --checkpoint value: "frozen"; a .pt file; a pre-training out folder
    (its student_beats.pt) or another folder holding exactly one .pt; a URI of a .pt or of a pre-training run
    folder in data.storage (``s3://bucket/runs/<out>/<name>``, `fetch_checkpoint`); a registered model version
    (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, `fetch_registered`); any of these as NAME=PATH to name
    the row. Without NAME a registered student is named ``NAME-v<VERSION>``, another pre-trained student after its
    preset (config.yaml beside it), else the file.
    "frozen" is model.checkpoint, else (model.init = "foundation") the cached stand-in foundation encoder, the
    one every student of the config starts from (`train.launch.initial_encoder`; trained once and cached), else a
    random encoder."""
    from retain_asd.models.beats import beats_base, beats_tiny, write_random_checkpoint

    if spec == "frozen":
        if cfg.model.family == "eat" and not cfg.model.checkpoint:
            from retain_asd.models.eat import RELEASED

            wanted = RELEASED.get(cfg.name, "an EAT or SSLAM pre-trained checkpoint (fairseq .pt)")
            raise FileNotFoundError(f"model.checkpoint is empty: 'frozen' under model.family=eat needs {wanted}; "
                                    "download it and pass model.checkpoint=PATH")
        if cfg.model.checkpoint:
            if not Path(cfg.model.checkpoint).is_file():
                raise FileNotFoundError(f"model.checkpoint = {cfg.model.checkpoint!r}: file not found; 'frozen' "
                                        f"evaluates that checkpoint: pass an official {cfg.model.family} .pt")
            return ResolvedCheckpoint("frozen", cfg.model.checkpoint, True)
        if cfg.model.init == "foundation":  # the stand-in encoder every student of this config starts from
            return ResolvedCheckpoint("frozen", str(initial_encoder(cfg)), True)
        warnings.warn("model.checkpoint is empty and model.init = 'random': 'frozen' is a RANDOM encoder (fine "
                      "for smoke runs only)", stacklevel=2)
        path = out_dir / "frozen_random.pt"
        if not path.is_file():
            write_random_checkpoint(path, beats_tiny() if cfg.model.size == "tiny" else beats_base(), cfg.train.seed)
        return ResolvedCheckpoint("frozen", str(path), True)
    name, path = _split_name(spec)
    if isinstance(path, str) and tracking.is_model_uri(path):  # a registered student: named after its version
        path = fetch_registered(path, cfg)
        name = name or registered_uri(path).removeprefix("models:/").replace("/", "-v")
    elif isinstance(path, str):  # a URI: a local copy, with the config.yaml / mlflow_run.json beside it
        path = fetch_checkpoint(path, Path(cfg.data.work_dir) / "checkpoints")
    if path.is_dir():
        student = path / "student_beats.pt"  # a pre-training out folder: its exported student
        found = ([student] if student.is_file()
                 else [p for p in sorted(path.rglob("*.pt")) if not p.name.startswith(".")])
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: no student_beats.pt (the export of a finished `retain-asd pretrain`) "
                                    f"and {len(found)} other .pt files inside; pass a pre-training out folder or "
                                    "the .pt file itself")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; pass a BEATs .pt file, a pre-training out folder, "
                                "NAME=PATH or 'frozen'")
    if name is None:
        pretrained = provenance(path)
        name = pretrained["preset"] if pretrained else path.stem
    return ResolvedCheckpoint(name, str(path), False)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _split_name(spec: str) -> tuple[str | None, Path | str]:
    """'NAME=PATH' -> (NAME, PATH) (NAME names the row); a plain path -> (None, path); a URI stays a string."""
    name, sep, rest = spec.partition("=")
    if not sep or storage.is_uri(name) or tracking.is_model_uri(name) or Path(spec).exists():
        return None, _location(spec)
    if not _NAME.match(name):
        raise ValueError(f"--checkpoint {spec!r}: NAME in NAME=PATH must be letters, digits, '_', '.', '+', '-'")
    return name, _location(rest)


def _location(spec: str) -> Path | str:
    return spec if tracking.is_model_uri(spec) else storage.as_location(spec)


def fetch_registered(model_uri: str, cfg: Config) -> Path:
    """The local copy of a registered student (`tracking.resolve_model_uri`) from the registry of
    tracking.tracking_uri (default: ``<data.work_dir>/mlflow.db``), cached under ``<data.work_dir>/checkpoints/
    models/``; beside it its version's URI (`SOURCE_URI`: the evaluation runs' ``checkpoint`` tag), the trial's
    config.yaml and run pointer (`provenance`)."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.data.work_dir, create=False)
    path = tracking.resolve_model_uri(model_uri, uri, Path(cfg.data.work_dir) / "checkpoints" / "models")
    fsio.write_json(path.parent / SOURCE_URI, {"uri": registered_uri(path)})
    return path


def registered_uri(path: Path) -> str:
    """``models:/NAME/VERSION`` of a copy `fetch_registered` made (its folder is ``.../NAME/VERSION/``): the
    version an alias pointed at when it was fetched."""
    return f"models:/{path.parent.parent.name}/{path.parent.name}"


def checkpoint_file(spec: str | os.PathLike, cfg: Config) -> tuple[str, str]:
    """(local file, registered version URI or "") of a checkpoint argument of a command that takes one file
    (`retain-asd score`): a registered model version is fetched (`fetch_registered`); anything else is as given."""
    if not tracking.is_model_uri(spec):
        return str(spec), ""
    path = fetch_registered(str(spec), cfg)
    return str(path), registered_uri(path)


def fetch_checkpoint(uri: str, cache_dir: str | os.PathLike) -> Path:
    """A local copy of a checkpoint in an object store: a ``.pt`` URI, or a pre-training run folder (its
    student_beats.pt). Its config.yaml and mlflow_run.json come along when they are beside it (`provenance`).

    Copied on every call (atomically) into ``<cache_dir>/<sha1 of the URI>/``, so a re-exported student is
    never scored from a stale copy; the weights are then loaded as any local file (``weights_only=True``).
    """
    import hashlib

    file_uri = uri if uri.endswith(".pt") else storage.join(uri, "student_beats.pt")
    if not storage.is_file(file_uri):
        raise FileNotFoundError(f"{file_uri}: checkpoint not found in the object store; pass the URI of a .pt or "
                                "of a pre-training run folder (<data.storage>/runs/<out name>/<preset>)")
    folder = Path(cache_dir).resolve() / hashlib.sha1(file_uri.encode()).hexdigest()[:16]
    parent = file_uri.rpartition("/")[0]
    for name in ("config.yaml", "mlflow_run.json"):
        if storage.is_file(storage.join(parent, name)):
            storage.download(storage.join(parent, name), folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    fsio.write_json(folder / SOURCE_URI, {"uri": file_uri})
    return storage.download(file_uri, folder / file_uri.rpartition("/")[2])
