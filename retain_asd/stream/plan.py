"""The epoch plan of the training stream: what is drawn, a pure function of (seed, epoch), and the driver-side
state it is drawn from.

* The driver reads only the small metadata columns of the clean shards (clip_id, class_name, split) and the
  noise shards in full (the noise bank: a few minutes of audio), checks them against the label vocabulary,
  and builds one `StreamState` (clean index + noise bank + sampler), which `stream.tasks` puts in the
  object store once.
* The plan of an epoch (which clean clip, which noise clip, where in the noise, at which SNR) is a pure
  function of (seed, epoch) (`plan_epoch`), a few numbers per draw, so every task can recompute the plan of
  its epoch from the shared state instead of the driver storing num_epochs plans.

No Ray here: the read/mix tasks (`stream.tasks`) and the consumer (`stream.consumer`) import this module,
never the reverse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retain_asd import mixing, storage
from retain_asd.corpus import shards
from retain_asd.corpus.labels import LabelVocab


class StreamError(ValueError):
    """The corpus cannot feed the training stream (empty bank, unknown class, length mismatch)."""


# ------------------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class CleanIndex:
    """Where each clean clip of the split lives, and its class. Small: a few numbers per clip."""

    files: tuple[str, ...]  # shard paths
    file_idx: np.ndarray  # (n,) int64 index into files
    row_in_file: np.ndarray  # (n,) int64 row position in the shard file (all splits counted)
    clip_ids: np.ndarray  # (n,) unicode
    machine_idx: np.ndarray  # (n,) int64 vocabulary index of the machine-attribute class
    weights: np.ndarray  # (n,) float64 class-weighted sampling probability, sums to 1
    num_samples: int  # clip length S
    filesystem: Any = None  # pyarrow filesystem of `files` for a corpus in an object store (pickled with its keys)

    def __len__(self) -> int:
        return len(self.clip_ids)


@dataclass(frozen=True)
class NoiseBank:
    """Every noise recording once, concatenated: recording j is audio[starts[j] : starts[j] + lengths[j]]."""

    audio: np.ndarray  # (total,) float32
    starts: np.ndarray  # (M,) int64
    lengths: np.ndarray  # (M,) int64
    noise_ids: np.ndarray  # (M,) unicode clip ids
    noise_idx: np.ndarray  # (M,) int64 vocabulary index of the noise class

    def __len__(self) -> int:
        return len(self.noise_ids)

    def recording(self, j: int) -> np.ndarray:
        """Recording j as a view of the bank."""
        start = int(self.starts[j])
        return self.audio[start : start + int(self.lengths[j])]


@dataclass(frozen=True)
class StreamState:
    """Everything a task needs; put once in the object store."""

    clean: CleanIndex
    bank: NoiseBank
    num_classes: int
    snr_sampler: mixing.SNRSampler
    seed: int
    class_weighted: bool
    level: str = "unit_noise"  # mixing.level_gains: Eq. 3 as written, or the clean part at its stored power


@dataclass(frozen=True)
class EpochPlan:
    """The draws of one epoch, in output order. Index d: clean[d] is mixed with noise[d] at snr_db[d]."""

    epoch: int
    clean: np.ndarray  # (D,) int64 index into CleanIndex
    noise: np.ndarray  # (D,) int64 index into NoiseBank
    noise_offset: np.ndarray  # (D,) int64 first sample of the noise segment in its recording
    snr_db: np.ndarray  # (D,) float64
    file_order: np.ndarray  # (F,) int64 order in which the epoch's shard files are streamed


# ------------------------------------------------------------------------------------------ plan
def noise_permutation(bank_size: int, num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Noise clip per draw: fresh permutations of the bank back to back (no repeat before all are used)."""
    if bank_size <= 0:
        raise StreamError("the noise bank is empty: ingest at least one noise recording")
    rounds = -(-num_draws // bank_size)  # ceil
    return np.concatenate([rng.permutation(bank_size) for _ in range(rounds)])[:num_draws].astype(np.int64)


def noise_offsets(lengths: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Random segment start per draw: in [0, L - S] for a recording longer than the clip (a crop), in
    [0, L) for a shorter one (tiled from there by `mixing.noise_segment`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    high = np.where(lengths >= num_samples, lengths - num_samples + 1, lengths)
    return rng.integers(0, high).astype(np.int64)


def plan_epoch(state: StreamState, epoch: int) -> EpochPlan:
    """The epoch's draws, a pure function of (state.seed, epoch).

    Class-weighted: len(clean) draws with replacement, P(clip) = 1 / count(class) normalised (every class
    equally likely); otherwise each clip once, in random order. Independent generators per decision, so
    changing the SNR sampler does not change the pairings.
    """
    clean, bank = state.clean, state.bank
    rng_clip, rng_noise, rng_offset, rng_snr, rng_files = (
        np.random.default_rng(s) for s in np.random.SeedSequence([state.seed, epoch]).spawn(5))
    n = len(clean)
    if state.class_weighted:
        draws = rng_clip.choice(n, size=n, replace=True, p=clean.weights).astype(np.int64)
    else:
        draws = rng_clip.permutation(n).astype(np.int64)
    noise = noise_permutation(len(bank), n, rng_noise)
    offset = noise_offsets(bank.lengths[noise], clean.num_samples, rng_offset)
    snr_db = np.asarray(state.snr_sampler.sample(rng_snr, n), dtype=np.float64)
    file_order = rng_files.permutation(len(clean.files)).astype(np.int64)
    return EpochPlan(epoch, draws, noise, offset, snr_db, file_order)


# ------------------------------------------------------------------------------------------ driver side
def _read_clean_index(machine_dir: Path | str, vocab: LabelVocab, split: str,
                      clip_samples: int | None) -> CleanIndex:
    manifest = shards.read_manifest(machine_dir)
    if manifest is None:
        raise FileNotFoundError(f"{machine_dir}: no {shards.MANIFEST}; run `retain-asd ingest` first")
    files, file_idx, rows, clip_ids, classes = [], [], [], [], []
    num_samples = None
    filesystem = None
    for name in manifest["shards"]:
        path, filesystem = shards.shard_source(machine_dir, name)
        pf = pq.ParquetFile(path, filesystem=filesystem)
        try:
            samples = shards.clip_samples(pf.schema_arrow)
        except ValueError as err:
            raise StreamError(f"{path}: {err}") from None
        if samples is None:
            raise StreamError(f"{path}: full-length recordings, expected fixed-length machine clips")
        if num_samples is None:
            num_samples = samples
        elif samples != num_samples:
            raise StreamError(f"{path}: clips of {samples} samples, other shards have "
                              f"{num_samples}; re-ingest with one clip_s")
        meta = pf.read(columns=["clip_id", "class_name", "split"])
        keep = np.flatnonzero(pc.equal(meta.column("split"), split).to_numpy(zero_copy_only=False))
        if len(keep) == 0:
            continue
        files.append(path)
        file_idx.append(np.full(len(keep), len(files) - 1, dtype=np.int64))
        rows.append(keep.astype(np.int64))
        clip_ids.extend(meta.column("clip_id").take(keep).to_pylist())
        classes.extend(meta.column("class_name").take(keep).to_pylist())
    if not clip_ids:
        raise StreamError(f"{machine_dir}: no clips of split {split!r} in {len(manifest['shards'])} shards")
    if clip_samples is not None and clip_samples != num_samples:
        raise StreamError(f"{machine_dir}: clips have {num_samples} samples, the stream was asked for "
                          f"{clip_samples} (clip_s x sample_rate_hz); re-ingest or fix data.clip_s")
    unknown = sorted(set(classes) - set(vocab.machine_classes))
    if unknown:
        raise StreamError(f"{machine_dir}: machine classes {unknown[:5]} are not in the label vocabulary "
                          f"({vocab.num_machine} machine classes); labels.json is stale, re-run ingest")
    return CleanIndex(files=tuple(files), file_idx=np.concatenate(file_idx), row_in_file=np.concatenate(rows),
                      clip_ids=np.asarray(clip_ids, dtype=str),
                      machine_idx=np.asarray([vocab.index(c) for c in classes], dtype=np.int64),
                      weights=vocab.sampling_weights(classes), num_samples=int(num_samples), filesystem=filesystem)


def read_noise_bank(noise_dir: str | os.PathLike, vocab: LabelVocab) -> NoiseBank:
    """All train-split noise recordings as one float32 array (read with pyarrow on the driver)."""
    noise_dir = storage.as_location(noise_dir)
    manifest = shards.read_manifest(noise_dir)
    if manifest is not None and not manifest["shards"]:
        raise StreamError(f"{noise_dir}: the noise bank is empty (no noise shards; see "
                          f"{shards.child(noise_dir, shards.REJECTS)}); ingest at least one noise recording")
    table = shards.read_table(noise_dir, columns=["path", "clip_id", "class_name", "split", "audio"])
    table = table.filter(pc.equal(table.column("split"), "train"))
    if table.num_rows == 0:
        raise StreamError(f"{noise_dir}: the noise bank is empty (no train-split noise recordings)")
    classes = table.column("class_name").to_pylist()
    unknown = sorted(set(classes) - set(vocab.noise_classes))
    if unknown:
        raise StreamError(f"{noise_dir}: noise classes {unknown[:5]} are not in the label vocabulary "
                          f"({list(vocab.noise_classes)}); labels.json is stale, re-run ingest")
    clips = shards.audio_list(table)
    lengths = np.asarray([len(c) for c in clips], dtype=np.int64)
    ids = table.column("clip_id").to_pylist()
    for clip, clip_id in zip(clips, ids, strict=True):
        if not (len(clip) > 0 and np.isfinite(clip).all() and mixing.power(clip) > 0):
            raise StreamError(f"{noise_dir}: noise recording {clip_id} is empty, silent or non-finite; "
                              "remove it and re-ingest")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return NoiseBank(audio=np.concatenate(clips).astype(np.float32), starts=starts, lengths=lengths,
                     noise_ids=np.asarray(ids, dtype=str),
                     noise_idx=np.asarray([vocab.index(c) for c in classes], dtype=np.int64))


def build_stream_state(machine_dir: str | os.PathLike, noise_dir: str | os.PathLike,
                       labels_path: str | os.PathLike, *, snr_sampler: dict, seed: int,
                       class_weighted: bool = True, split: str = "train",
                       clip_samples: int | None = None, level: str = "unit_noise") -> StreamState:
    """Driver side of the stream (no Ray): metadata, noise bank, vocabulary checks."""
    if not storage.is_file(labels_path):
        raise FileNotFoundError(f"{labels_path}: label vocabulary not found; run `retain-asd ingest` first")
    if level not in mixing.LEVELS:
        raise ValueError(f"level = {level!r}: expected one of {mixing.LEVELS} (mixing.level)")
    vocab = LabelVocab.from_json(labels_path)
    clean = _read_clean_index(storage.as_location(machine_dir), vocab, split, clip_samples)
    bank = read_noise_bank(noise_dir, vocab)
    return StreamState(clean=clean, bank=bank, num_classes=vocab.num_classes,
                       snr_sampler=mixing.make_snr_sampler(**snr_sampler), seed=int(seed),
                       class_weighted=bool(class_weighted), level=level)

