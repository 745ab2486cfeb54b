"""Training stream: clean machine shards + noise bank -> paired, mixed (Eq. 3), multi-hot labelled rows.

How it is built (one Ray Data dataset covering every epoch, iterated once by the training loop):

* The driver reads only the small metadata columns of the clean shards (clip_id, class_name, split) and the
  noise shards in full (the noise bank: a few minutes of audio), checks them against the label vocabulary,
  and puts one `StreamState` (clean index + noise bank + sampler) in the object store. Tasks receive its
  ObjectRef through `fn_kwargs` and `ray.get` it: numpy arrays come back zero-copy, read-only, backed by
  the shared-memory store, so the bank exists once per node however many tasks run.
* The plan of an epoch (which clean clip, which noise clip, where in the noise, at which SNR) is a pure
  function of (seed, epoch) (`plan_epoch`), a few numbers per draw. Each task recomputes the plan of its
  epoch from the shared state (milliseconds) instead of the driver storing num_epochs plans: the plans of a
  20k-step run would otherwise cost O(num_epochs x clips) object-store memory for no gain.
* Work unit = (epoch, `files_per_unit` clean shard files, enough for >= `UNIT_ROWS` clips). Units run
  epoch-major; within an epoch the file order is a seeded permutation, and a unit's draws (of all its
  files) come out in the plan's random order. Each task reads its shards with pyarrow (audio decoded
  once per unit, never on the driver), so the 10+ GB corpus streams. Shards are written with records
  shuffled across machine types (`shards.write_shards`), so a unit's rows, and a batch, are a sample of
  the whole epoch's class-weighted plan, not one machine type (`retain-asd inspect-stream` measures it
  against the iid expectation).
  Why not `ray.data.read_parquet` per epoch + `union`: a union of hundreds of epoch branches lets the
  executor interleave epochs arbitrarily and plans hundreds of operators; here the epoch is explicit in
  each unit and the dataset is a single fused read -> mix task per unit.
* What crosses the object store is compact: per row the clean clip as stored (int16: 320 kB for 10 s) and
  the mixing decision (the Eq. 3 gains a1, a2, the noise recording and offset), not three float32 arrays
  (1.9 MB). The tasks read, gather and compute the gains; the consumer forms clean = a1 x1, noise = a2 x2 and
  the mixture straight into its batch buffers (`form_audio`, `iter_train_batches`), from the noise bank it
  shares zero-copy through the object store. Half the bytes, one write per output array
  (benchmarks/stream.py).

Eq. 3 (gains from `mixing.row_powers` + `mixing.gains_at_snr`, i.e. `mixing.snr_gains`): noise segment
(`mixing.noise_segment`) to unit power, clean scaled so that P(a1 x1) / P(a2 x2) = R. Shards are decoded by
`shards.audio_matrix`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retain_asd import mixing, storage
from retain_asd.corpus import shards
from retain_asd.corpus.labels import LabelVocab

# Numeric columns the training loop gets as tensors; clip_id / noise_id (strings) stay in the dataset
# for inspection but cannot become tensors.
TORCH_COLUMNS = ("mixture", "clean", "noise", "label", "machine_idx", "noise_idx", "clip_idx", "snr_db",
                 "noise_offset", "epoch")
ID_COLUMNS = ("clip_id", "noise_id")
MIX_ROWS_PER_BLOCK = 64  # rows per output block: 64 x 320 kB = 20 MB for 10 s int16 clips (32: 1.08x the
# numpy loop, 64: 1.25x in the same benchmarks/stream.py run; Ray's per-block cost on the driver is ~5 ms)
AUDIO_COLUMNS = ("clean", "noise", "mixture")  # formed on the consumer (`form_audio`), float32 (S,) each
MIXING_COLUMNS = ("clean_stored", "clean_gain", "noise_gain", "noise_rec", "noise_offset")  # what `form_audio` reads
BUFFER_POOL_SETS = 8  # batches of audio buffers `iter_train_batches` keeps for reuse (see _BufferPool)
GEN_BUFFER_BLOCKS = 8  # output blocks a stream task may hold before the executor takes them (see build_train_stream)
UNIT_ROWS = 512  # clips a work unit draws from at least: files_per_unit = ceil(UNIT_ROWS / rows per shard), >= 2


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


# ------------------------------------------------------------------------------------------ task side
class _BufferPool:
    """Clip-length buffers ((batch, S) float32 on the consumer, (block, S) stored rows in a task), reused once
    nothing outside the pool refers to them any more.

    A fresh 41 MB array is paid in page faults at its first write: forming a batch of 64 10 s clips took
    0.36 ms per clip into fresh arrays and 0.19 ms into reused ones (2-core machine). A buffer is reused only
    when nothing outside the pool refers to it: a tensor from `torch.from_numpy` keeps its array referenced
    (so do its views and `.numpy()`), so a batch the loop still holds is never overwritten.
    """

    def __init__(self, limit: int = 3 * BUFFER_POOL_SETS):
        self._arrays: list[np.ndarray] = []
        self._limit = limit

    def get(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        for i in range(len(self._arrays)):
            # references: the list's, and getrefcount's argument
            if (self._arrays[i].shape == shape and self._arrays[i].dtype == dtype
                    and sys.getrefcount(self._arrays[i]) == 2):
                return self._arrays[i]
        array = np.empty(shape, dtype=dtype)
        if len(self._arrays) < self._limit:
            self._arrays.append(array)
        return array


_TASK_BUFFERS = _BufferPool()  # per process: a task's (block, S) stored rows


_PLANS: dict[tuple[int, int], EpochPlan] = {}  # per-process cache: (id(state), epoch) -> plan


def _cached_plan(state: StreamState, epoch: int) -> EpochPlan:
    key = (id(state), epoch)
    if key not in _PLANS:
        _PLANS.clear()  # units run epoch-major: one epoch's plan is enough
        _PLANS[key] = plan_epoch(state, epoch)
    return _PLANS[key]


def unit_files(plan: EpochPlan, unit: int, files_per_unit: int) -> np.ndarray:
    """Shard files of the epoch's `unit`-th work unit: `files_per_unit` consecutive files of the epoch's
    seeded file order (the last unit may have fewer)."""
    return plan.file_order[unit * files_per_unit : (unit + 1) * files_per_unit]


def _stored_rows(matrices: list[np.ndarray], file_pos: np.ndarray, rows: np.ndarray, num_samples: int) -> np.ndarray:
    """(b, S) clean rows from the unit's decoded files, as stored (int16 or float32): one row copy each (a
    fancy-indexed gather copied every row twice), into a buffer of the task's pool (`_BufferPool`: reused
    once Ray has copied the yielded block into the object store and let go of it)."""
    out = _TASK_BUFFERS.get((len(rows), num_samples), matrices[0].dtype)
    for i, (k, r) in enumerate(zip(file_pos.tolist(), rows.tolist(), strict=True)):
        out[i] = matrices[k][r]
    return out


def _noise_views(bank: NoiseBank, noise: np.ndarray, offset: np.ndarray, num_samples: int) -> list[np.ndarray]:
    """The rows' noise segments (`mixing.noise_segment`): views of the bank (a copy only for a tiled one)."""
    return [mixing.noise_segment(bank.recording(j), o, num_samples)
            for j, o in zip(noise.tolist(), offset.tolist(), strict=True)]


def default_files_per_unit(clean: CleanIndex, unit_rows: int = UNIT_ROWS) -> int:
    """Shard files per work unit so that a unit draws from >= `unit_rows` clips (and >= 2 files): a batch is
    then a sample of the epoch's plan over a few hundred random clips, whatever `data.rows_per_shard`."""
    rows_per_file = int(np.bincount(clean.file_idx).max())
    return max(2, -(-unit_rows // rows_per_file))


def mix_unit(state: StreamState, epoch: int, unit: int, rows_per_block: int = MIX_ROWS_PER_BLOCK,
             files_per_unit: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Rows of one work unit: the draws of `epoch` whose clean clip is in one of the unit's shard files,
    in the plan's random order, so a block interleaves the rows of all the unit's files.

    A row carries the clean clip as stored (`clean_stored`, int16 or float32) and its mixing decision: Eq. 3's
    gains (`clean_gain` a1, `noise_gain` a2, from the powers of the stored clip and of its noise segment) and
    the segment (`noise_rec` in the bank, `noise_offset`). `form_audio` turns them into clean = a1 x1,
    noise = a2 x2 and the mixture on the consumer, so no clip-length float array crosses the object store.
    int16 samples are not rescaled by 1/32768: Eq. 3 is scale-free in the clean clip (a1 x1 = sqrt(R / P(x1))
    x1 is the same for c x1), so a1 x1 equals the rescaled clip's to float32 rounding (within 2 ulp).
    """
    plan = _cached_plan(state, epoch)
    clean, bank = state.clean, state.bank
    files = unit_files(plan, unit, files_per_unit)
    draw_files = clean.file_idx[plan.clean]
    draws = np.flatnonzero(np.isin(draw_files, files))  # plan order = random output order
    if len(draws) == 0:
        return
    matrices, file_ids = [], []
    for f in files:
        table = pq.read_table(clean.files[int(f)], columns=["clip_id", "audio"], filesystem=clean.filesystem)
        matrices.append(shards.audio_matrix(table, dtype=None))  # (rows in file, S), int16 or float32
        file_ids.append(table.column("clip_id").to_numpy(zero_copy_only=False).astype(str))
    position = {int(f): k for k, f in enumerate(files)}
    for lo in range(0, len(draws), rows_per_block):
        d = draws[lo : lo + rows_per_block]
        ci = plan.clean[d]
        file_pos = np.asarray([position[int(f)] for f in draw_files[d]], dtype=np.int64)
        rows = clean.row_in_file[ci]
        for k in np.unique(file_pos):
            sel = file_pos == k
            if not np.array_equal(file_ids[k][rows[sel]], clean.clip_ids[ci[sel]]):
                raise StreamError(f"{clean.files[int(files[k])]}: rows changed since the stream was planned; "
                                  "rebuild the dataset")
        noise_rec, noise_offset = plan.noise[d], plan.noise_offset[d]
        stored = _stored_rows(matrices, file_pos, rows, clean.num_samples)
        segments = _noise_views(bank, noise_rec, noise_offset, clean.num_samples)
        scale = 1.0 / 32768.0 if stored.dtype.kind == "i" else 1.0  # the clean's power as decoded (`level`)
        a1, a2 = mixing.gains_at_snr(mixing.row_powers(stored), mixing.row_powers(segments), plan.snr_db[d],
                                     "mix_unit", state.level, scale)
        machine_idx = clean.machine_idx[ci]
        noise_idx = bank.noise_idx[noise_rec]
        label = np.zeros((len(d), state.num_classes), dtype=np.float32)  # (b, C+N) multi-hot (Eq. 4 target)
        label[np.arange(len(d)), machine_idx] = 1.0
        label[np.arange(len(d)), noise_idx] = 1.0
        yield {"clean_stored": stored, "clean_gain": a1, "noise_gain": a2, "noise_rec": noise_rec,
               "noise_offset": noise_offset, "label": label, "machine_idx": machine_idx, "noise_idx": noise_idx,
               "clip_idx": ci, "snr_db": plan.snr_db[d].astype(np.float32), "clip_id": clean.clip_ids[ci],
               "noise_id": bank.noise_ids[noise_rec], "epoch": np.full(len(d), epoch, dtype=np.int64)}


def _mix_units(batch: dict[str, np.ndarray], *, state_ref, units_per_epoch: int, rows_per_block: int,
               files_per_unit: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: unit ids -> mixed rows. `state_ref` resolves zero-copy from the object store."""
    import ray

    state = ray.get(state_ref)
    for unit in batch["id"]:
        epoch, position = divmod(int(unit), units_per_epoch)
        yield from mix_unit(state, epoch, position, rows_per_block, files_per_unit)


@dataclass(frozen=True)
class StreamPlan:
    """What `build_train_dataset` built: the dataset and its state (for inspection and tests)."""

    dataset: object  # ray.data.Dataset
    state_ref: object  # ray.ObjectRef[StreamState]
    state: StreamState
    num_epochs: int

    @property
    def rows_per_epoch(self) -> int:
        return len(self.state.clean)

    @property
    def num_rows(self) -> int:
        return self.rows_per_epoch * self.num_epochs


def build_train_stream(machine_dir: str | os.PathLike, noise_dir: str | os.PathLike,
                       labels_path: str | os.PathLike, *, snr_sampler: dict, seed: int, num_epochs: int,
                       class_weighted: bool = True, split: str = "train", clip_samples: int | None = None,
                       rows_per_block: int = MIX_ROWS_PER_BLOCK, files_per_unit: int | None = None,
                       max_tasks: int | None = None, level: str = "unit_noise") -> StreamPlan:
    """`build_train_dataset` returning the state too. Needs Ray initialised (`runtime.init_ray`).

    `files_per_unit`: shard files one work unit reads (None: `default_files_per_unit`); `max_tasks` caps the
    read/mix tasks running at once (None: as many as CPUs allow).
    """
    import ray

    if num_epochs < 1:
        raise ValueError(f"num_epochs = {num_epochs}: must be >= 1")
    if files_per_unit is not None and files_per_unit < 1:
        raise ValueError(f"files_per_unit = {files_per_unit}: must be >= 1")
    state = build_stream_state(machine_dir, noise_dir, labels_path, snr_sampler=snr_sampler, seed=seed,
                               class_weighted=class_weighted, split=split, clip_samples=clip_samples, level=level)
    files_per_unit = files_per_unit or default_files_per_unit(state.clean)
    state_ref = ray.put(state)
    units_per_epoch = -(-len(state.clean.files) // files_per_unit)
    num_units = num_epochs * units_per_epoch
    ds = ray.data.range(num_units, override_num_blocks=num_units).map_batches(
        _mix_units, batch_size=None, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=max_tasks),
        fn_kwargs={"state_ref": state_ref, "units_per_epoch": units_per_epoch, "rows_per_block": rows_per_block,
                   "files_per_unit": files_per_unit})
    ds.context.target_max_block_size = block_target_bytes(rows_per_block, state.clean.num_samples,
                                                          state.num_classes)
    # A task may run GEN_BUFFER_BLOCKS yields ahead of the executor taking them (Ray's default, 2, paused the
    # tasks in lock-step with the consumer: workers and driver both mostly waiting under py-spy; 8 gave
    # 661-851 clips/s against 466-629 in alternating runs on 2 cores, benchmarks/stream.py's corpus).
    ds.context._max_num_blocks_in_streaming_gen_buffer = GEN_BUFFER_BLOCKS
    return StreamPlan(ds, state_ref, state, num_epochs)


def block_target_bytes(rows_per_block: int, num_samples: int, num_classes: int) -> int:
    """This dataset's `target_max_block_size`: 3/4 of one `mix_unit` yield, so each yield leaves the task as its
    own block (a buffer over the target is emitted; one under 1.5x the target is not sliced). Sized for int16
    clips; a float32 corpus's yields are twice the target, still one block each.

    Ray's default (128 MiB) gathered a unit's yields into one block: an extra copy of every clip in the task
    and 130 MB blocks (remote CPU 2.9 -> 2.0 s for 2,496 clips, benchmarks/stream.py)."""
    row_bytes = 2 * num_samples + 4 * num_classes + 8 * 8  # clean_stored, label; the numeric columns
    return max(1, int(0.75 * rows_per_block * row_bytes))


def build_train_dataset(machine_dir: str | os.PathLike, noise_dir: str | os.PathLike,
                        labels_path: str | os.PathLike, *, snr_sampler: dict, seed: int, num_epochs: int,
                        class_weighted: bool = True, split: str = "train", clip_samples: int | None = None,
                        level: str = "unit_noise"):
    """The training stream: `num_epochs` epochs of mixed, labelled rows as one lazy `ray.data.Dataset`.

    Columns (compact: the audio is formed on the consumer, `iter_train_batches` / `with_audio`):
    clean_stored (S,) int16 or float32, the clean clip as stored; clean_gain, noise_gain float32, Eq. 3's a1
    and a2; noise_rec int64 (recording in the noise bank), noise_offset int64 (first sample of its segment);
    label float32 (C+N,) multi-hot; machine_idx, noise_idx int64 (vocabulary indices); clip_idx int64 (index
    of the clean clip in the stream's index); snr_db float32; clip_id, noise_id str; epoch int64.
    `snr_sampler` holds the kwargs of `mixing.make_snr_sampler`; `level` is `mixing.level_gains`'s.
    """
    return build_train_stream(machine_dir, noise_dir, labels_path, snr_sampler=snr_sampler, seed=seed,
                              num_epochs=num_epochs, class_weighted=class_weighted, split=split,
                              clip_samples=clip_samples, level=level).dataset


def noise_bank_of(source) -> NoiseBank:
    """The noise bank a stream's rows refer to, from a `NoiseBank`, a `StreamState`, or an ObjectRef of either
    (`StreamPlan.state_ref`, what the training workers receive: resolved zero-copy from the object store)."""
    if not isinstance(source, NoiseBank | StreamState):
        import ray

        if not isinstance(source, ray.ObjectRef):
            raise TypeError(f"noise_bank = {source!r}: pass the stream's StreamPlan.state_ref, its StreamState "
                            "or its NoiseBank (the rows carry only the noise recording and offset)")
        source = ray.get(source)
    return source.bank if isinstance(source, StreamState) else source


def form_audio(rows: dict, bank: NoiseBank, out: tuple[np.ndarray, ...] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 3 from compact rows (b of them): (b, S) float32 clean = a1 x1, noise = a2 x2, mixture = clean + noise,
    written into `out` (three (b, S) float32 arrays) when given. The noise segments are read from `bank`, the
    one the rows were drawn from. Exactly the products the tasks' old in-place scaling computed: the stored
    sample cast to float32 times the float32 gain."""
    stored = np.asarray(rows["clean_stored"])
    num_rows, num_samples = stored.shape
    noise_rec = np.asarray(rows["noise_rec"])
    if len(noise_rec) and not 0 <= int(noise_rec.min()) <= int(noise_rec.max()) < len(bank):
        raise StreamError(f"rows refer to noise recording {int(noise_rec.max())}, the bank has {len(bank)}: "
                          "the rows and the noise bank come from different streams")
    clean, noise, mixture = out if out is not None else [np.empty((num_rows, num_samples), dtype=np.float32)
                                                        for _ in AUDIO_COLUMNS]
    clean_gains = np.asarray(rows["clean_gain"], dtype=np.float32)
    noise_gains = np.asarray(rows["noise_gain"], dtype=np.float32)
    offsets = np.asarray(rows["noise_offset"]).tolist()
    for i, j in enumerate(noise_rec.tolist()):
        # cast, then scale in place: 0.05 ms per 10 s int16 clip, against 0.08 for one mixed-type multiply
        np.copyto(clean[i], stored[i], casting="unsafe")
        np.multiply(clean[i], clean_gains[i], out=clean[i])
        np.multiply(mixing.noise_segment(bank.recording(j), offsets[i], num_samples), noise_gains[i], out=noise[i])
        np.add(clean[i], noise[i], out=mixture[i])
    return clean, noise, mixture


def with_audio(rows: dict, noise_bank) -> dict:
    """A row (from `take`) or a numpy batch of the stream with its `clean`, `noise` and `mixture` formed
    (`form_audio`); `noise_bank` as for `noise_bank_of`."""
    bank = noise_bank_of(noise_bank)
    single = np.ndim(rows["clean_stored"]) == 1
    batch = {k: np.asarray(rows[k])[None] if single else np.asarray(rows[k]) for k in MIXING_COLUMNS}
    audio = form_audio(batch, bank)
    return {**rows, **{k: a[0] if single else a for k, a in zip(AUDIO_COLUMNS, audio, strict=True)}}


def iid_distinct_expectation(num_classes: int, batch_size: int) -> float:
    """Expected distinct classes in `batch_size` iid draws from `num_classes` equally likely classes:
    C (1 - (1 - 1/C)^b), the yardstick of a well-mixed batch (`retain-asd inspect-stream`)."""
    if num_classes < 1 or batch_size < 0:
        raise ValueError(f"num_classes = {num_classes}, batch_size = {batch_size}: need C >= 1, b >= 0")
    return num_classes * (1.0 - (1.0 - 1.0 / num_classes) ** batch_size)


def epochs_for_steps(total_steps: int, batch_size: int, grad_accum: int, rows_per_epoch: int) -> int:
    """Epochs the dataset must cover so the loop never runs dry: ceil(steps x batch x accum / rows)."""
    return max(1, -(-total_steps * batch_size * grad_accum // rows_per_epoch))


# ------------------------------------------------------------------------------------------ loop side
def _resolve_device(device):
    if device != "auto":
        return device
    try:
        from ray.train.torch import get_device

        return get_device()  # inside a Ray Train worker: its GPU or the CPU
    except RuntimeError:  # not in a training worker
        return "cpu"


def iter_train_batches(data_iterator, batch_size: int, seed: int, *, noise_bank, shuffle_buffer_rows: int = 0,
                       columns: Sequence[str] = TORCH_COLUMNS, device="auto", prefetch_blocks: int = 2):
    """Tensor batches for the training loop, from `ray.train.get_dataset_shard("train")` (or a Dataset's
    `iterator()`), with the audio formed here (`form_audio`) from the compact rows and `noise_bank` (the
    stream's `StreamPlan.state_ref`, or as for `noise_bank_of`).

    The stream's blocks are taken as they come and their rows written straight into the batch's buffers:
    no block concatenation, one write per output array. The (batch, S) buffers are reused once the loop has
    dropped every reference to a batch (`_BufferPool`); a batch the loop keeps is never overwritten.
    Rows already come in a seeded random order within each unit and units in a seeded random order per
    epoch, so the default uses no extra buffer: Ray's local shuffle buffer (`shuffle_buffer_rows` > 0, seeded
    with `seed`) cost 16x throughput with 2 MB rows (262 -> 16 clips/s, benchmarks/stream.py). Only full
    batches are returned (drop_last), only `columns` (numeric), as torch tensors on `device` ("auto": the
    Ray Train worker's device, else the CPU).
    """
    import torch

    bank = noise_bank_of(noise_bank)
    device = _resolve_device(device)
    on_cpu = torch.device(device).type == "cpu"
    blocks = data_iterator.iter_batches(
        batch_size=batch_size if shuffle_buffer_rows else None, batch_format="numpy",
        prefetch_batches=prefetch_blocks, local_shuffle_buffer_size=shuffle_buffer_rows or None,
        local_shuffle_seed=seed if shuffle_buffer_rows else None)
    other = [c for c in columns if c not in AUDIO_COLUMNS]
    form = len(other) < len(columns)  # an audio column is asked for
    pool = _BufferPool()
    out, fill = None, 0
    for block in blocks:
        num_rows, num_samples = block["clean_stored"].shape
        lo = 0
        while lo < num_rows:
            if out is None:
                audio = tuple(pool.get((batch_size, num_samples)) for _ in AUDIO_COLUMNS) if form else ()
                out = {c: np.empty((batch_size, *block[c].shape[1:]), dtype=block[c].dtype) for c in other}
                fill = 0
            take = min(num_rows - lo, batch_size - fill)
            src, dst = slice(lo, lo + take), slice(fill, fill + take)
            if form:
                form_audio({k: block[k][src] for k in MIXING_COLUMNS}, bank, tuple(a[dst] for a in audio))
            for c in other:
                out[c][dst] = block[c][src]
            lo, fill = lo + take, fill + take
            if fill == batch_size:
                if form:
                    out.update((c, a) for c, a in zip(AUDIO_COLUMNS, audio, strict=True) if c in columns)
                tensors = {c: torch.from_numpy(out[c]) for c in columns}
                yield tensors if on_cpu else {c: t.to(device) for c, t in tensors.items()}
                out, audio, tensors = None, None, None
