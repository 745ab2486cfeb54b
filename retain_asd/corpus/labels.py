"""The class vocabulary: machine-attribute classes then noise categories, multi-hot targets, sampling weights.

The paper tags each training mixture with its machine-attribute class and its noise category (231 + 4 =
235 outputs). Index order is fixed: machine classes sorted (0..C-1), then noise classes sorted
(C..C+N-1), so a vocabulary saved beside the shards gives the same indices on every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retain_asd import storage
from retain_asd.corpus.layouts import ClipRecord, close_matches

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LabelVocab:
    """Machine-attribute and noise classes with their train-split clip counts."""

    machine_classes: tuple[str, ...]  # sorted
    noise_classes: tuple[str, ...]  # sorted
    counts: dict[str, int] = field(default_factory=dict)  # clips per class (train split)

    def __post_init__(self) -> None:
        kinds = (("machine_classes", self.machine_classes), ("noise_classes", self.noise_classes))
        for kind, classes in kinds:
            if list(classes) != sorted(set(classes)):
                raise ValueError(f"LabelVocab.{kind} must be sorted and unique, got {list(classes)[:5]}...")
        both = set(self.machine_classes) & set(self.noise_classes)
        if both:
            raise ValueError(f"LabelVocab: classes {sorted(both)} are both machine and noise classes")
        unknown = set(self.counts) - set(self.machine_classes) - set(self.noise_classes)
        if unknown:
            raise ValueError(f"LabelVocab.counts has classes not in the vocabulary: {sorted(unknown)}")
        # Cached name -> index map; object.__setattr__ because the dataclass is frozen.
        names = self.machine_classes + self.noise_classes
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(names)})

    @property
    def num_machine(self) -> int:
        return len(self.machine_classes)

    @property
    def num_noise(self) -> int:
        return len(self.noise_classes)

    @property
    def num_classes(self) -> int:
        return self.num_machine + self.num_noise

    @property
    def class_names(self) -> tuple[str, ...]:
        """All classes in index order."""
        return self.machine_classes + self.noise_classes

    def index(self, class_name: str) -> int:
        """Index of a class: machine classes 0..C-1, noise classes C..C+N-1."""
        try:
            return self._index[class_name]
        except KeyError:
            hint = close_matches(class_name, self._index)
            raise KeyError(f"class {class_name!r} is not in the vocabulary ({self.num_machine} machine, "
                           f"{self.num_noise} noise classes); close matches: {hint or 'none'}") from None

    def encode(self, machine_class: str | None, noise_class: str | None = None) -> np.ndarray:
        """Multi-hot target ``(C+N,)`` float32 with a 1 at the machine class and one at the noise class."""
        target = np.zeros(self.num_classes, dtype=np.float32)
        if machine_class is not None:
            i = self.index(machine_class)
            if i >= self.num_machine:
                raise ValueError(f"{machine_class!r} is a noise class, passed as the machine class")
            target[i] = 1.0
        if noise_class is not None:
            j = self.index(noise_class)
            if j < self.num_machine:
                raise ValueError(f"{noise_class!r} is a machine class, passed as the noise class")
            target[j] = 1.0
        return target

    def encode_batch(self, machine_idx: np.ndarray, noise_idx: np.ndarray) -> np.ndarray:
        """Vectorised ``encode`` on vocabulary indices (as ``index`` returns them); -1 means absent.

        machine_idx: (B,) in 0..C-1 or -1; noise_idx: (B,) in C..C+N-1 or -1 -> (B, C+N) float32.
        """
        machine_idx = np.asarray(machine_idx, dtype=np.int64)
        noise_idx = np.asarray(noise_idx, dtype=np.int64)
        if machine_idx.ndim != 1 or machine_idx.shape != noise_idx.shape:
            raise ValueError(f"encode_batch: machine_idx {machine_idx.shape} and noise_idx {noise_idx.shape} "
                             "must be 1-D of the same length")
        bad_m = (machine_idx != -1) & ((machine_idx < 0) | (machine_idx >= self.num_machine))
        bad_n = (noise_idx != -1) & ((noise_idx < self.num_machine) | (noise_idx >= self.num_classes))
        if bad_m.any() or bad_n.any():
            raise ValueError(
                f"encode_batch: machine_idx must be -1 or in [0, {self.num_machine}), noise_idx -1 or in "
                f"[{self.num_machine}, {self.num_classes}); bad machine {machine_idx[bad_m][:5].tolist()}, "
                f"bad noise {noise_idx[bad_n][:5].tolist()}")
        target = np.zeros((machine_idx.shape[0], self.num_classes), dtype=np.float32)  # (B, C+N)
        rows = np.arange(machine_idx.shape[0])
        has_m, has_n = machine_idx >= 0, noise_idx >= 0
        target[rows[has_m], machine_idx[has_m]] = 1.0
        target[rows[has_n], noise_idx[has_n]] = 1.0
        return target

    def sampling_weights(self, class_names: Sequence[str]) -> np.ndarray:
        """Per-clip weights for class-weighted sampling: ``w_i = (1 / count(c_i)) / sum_j (1 / count(c_j))``.

        Every class then gets equal total probability among the clips given (float64, sums to 1).
        """
        if len(class_names) == 0:
            raise ValueError("sampling_weights: no clips given")
        inverse = np.empty(len(class_names), dtype=np.float64)
        for i, name in enumerate(class_names):
            self.index(name)  # KeyError with close matches for an unknown class
            count = self.counts.get(name, 0)
            if count <= 0:
                raise ValueError(f"sampling_weights: class {name!r} has no train clips in the vocabulary "
                                 "counts")
            inverse[i] = 1.0 / count
        return inverse / inverse.sum()

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "machine_classes": list(self.machine_classes),
                "noise_classes": list(self.noise_classes),
                "counts": {name: self.counts[name] for name in self.class_names if name in self.counts}}

    def to_json(self, path: str | Path) -> None:
        """Write atomically (a local file: temporary file in the same folder, then rename; a URI: one PUT)."""
        storage.write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> LabelVocab:
        """Read a local file or a URI (``s3://bucket/corpus_pretrain/labels.json``)."""
        path = storage.as_location(path)
        if not storage.is_file(path):
            raise FileNotFoundError(f"{path}: no label vocabulary; run `retain-asd ingest` first")
        data = storage.read_json(path, fix="re-run `retain-asd ingest --force` to rebuild it")
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: label vocabulary schema_version {version!r}, expected "
                             f"{SCHEMA_VERSION}; re-run ingestion to rebuild it")
        missing = {"machine_classes", "noise_classes", "counts"} - set(data)
        if missing:
            raise ValueError(f"{path}: label vocabulary lacks {sorted(missing)}")
        counts = {str(k): int(v) for k, v in data["counts"].items()}
        return cls(tuple(data["machine_classes"]), tuple(data["noise_classes"]), counts)


def build_vocab(machine_records: Iterable[ClipRecord], noise_records: Iterable[ClipRecord]) -> LabelVocab:
    """Vocabulary from the train-split records (test clips never define or count a class)."""
    machine = Counter(r.class_name for r in machine_records if r.kind == "machine" and r.split == "train")
    noise = Counter(r.class_name for r in noise_records if r.kind == "noise" and r.split == "train")
    return LabelVocab(machine_classes=tuple(sorted(machine)), noise_classes=tuple(sorted(noise)),
                      counts=dict(sorted((machine + noise).items())))
