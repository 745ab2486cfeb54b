"""The encoder families: per family, the model module that detects its checkpoints and loads them.

A family's module (`beats.py`, `eat.py`) defines `is_checkpoint(ckpt) -> bool` for a loaded checkpoint dict and
`from_checkpoint(ckpt, source, map_location) -> Encoder`; its model offers the `Encoder` reading API. Adding a
family = one model file + one line here (`model.family` accepts the names below). Modules are imported only when
a checkpoint is read, so this file (and the config that checks `model.family`) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, runtime_checkable

FAMILIES: dict[str, str] = {  # model.family -> its model module
    "beats": "retain_asd.models.beats",  # BEATs (official layout: flat cfg + 'model')
    "eat": "retain_asd.models.eat",  # EAT / SSLAM (fairseq data2vec_multi layout)
}


@runtime_checkable
class Encoder(Protocol):
    """What evaluation reads from any family: the hidden states of every block, and the model's shape."""

    @property
    def num_layers(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def extract_layers(self, waveforms, layers=None):  # -> ([(B, T*F, D)] per block 1..layers, (T, F))
        ...


def family_module(family: str) -> ModuleType:
    """The model module of `family` (ValueError naming the families for an unknown one)."""
    if family not in FAMILIES:
        raise ValueError(f"encoder family {family!r}: expected one of {list(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


__all__ = ["FAMILIES", "Encoder", "family_module"]
