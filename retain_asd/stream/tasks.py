"""The Ray Data side of the training stream: one dataset covering every epoch, whose read/mix tasks turn
(epoch, work unit) into compact mixed rows.

* The driver puts the `StreamState` (`stream.plan`) in the object store once. Tasks receive its ObjectRef
  through `fn_kwargs` and `ray.get` it: numpy arrays come back zero-copy, read-only, backed by the
  shared-memory store, so the bank exists once per node however many tasks run. Each task recomputes the plan
  of its epoch from the shared state (`plan_epoch`, milliseconds, cached per process) instead of the driver
  storing num_epochs plans: the plans of a 20k-step run would otherwise cost O(num_epochs x clips)
  object-store memory for no gain.
* Work unit = (epoch, `files_per_unit` clean shard files, enough for >= `UNIT_ROWS` clips). Units run
  epoch-major; within an epoch the file order is a seeded permutation, and a unit's draws (of all its
  files) come out in the plan's random order. Each task reads its shards with pyarrow (audio decoded
  once per unit by `shards.audio_matrix`, never on the driver), so the 10+ GB corpus streams. Shards are
  written with records shuffled across machine types (`shards.write_shards`), so a unit's rows, and a batch,
  are a sample of the whole epoch's class-weighted plan, not one machine type (`retain-asd inspect-stream`
  measures it against the iid expectation).
  Why not `ray.data.read_parquet` per epoch + `union`: a union of hundreds of epoch branches lets the
  executor interleave epochs arbitrarily and plans hundreds of operators; here the epoch is explicit in
  each unit and the dataset is a single fused read -> mix task per unit.
* What crosses the object store is compact: per row the clean clip as stored (int16: 320 kB for 10 s) and
  the mixing decision (the Eq. 3 gains a1, a2, the noise recording and offset), not three float32 arrays
  (1.9 MB). The tasks read, gather and compute the gains (`mixing.row_powers` + `mixing.gains_at_snr`,
  i.e. `mixing.snr_gains`: noise segment to unit power, clean scaled so that P(a1 x1) / P(a2 x2) = R); the
  consumer (`stream.consumer`) forms the audio. Half the bytes (benchmarks/stream.py).

Ray pickles `_mix_units` (the map_batches UDF) and the state by reference to this module and `stream.plan`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from retain_asd import mixing
from retain_asd.corpus import shards
from retain_asd.stream.buffers import BufferPool
from retain_asd.stream.plan import (
    CleanIndex,
    EpochPlan,
    NoiseBank,
    StreamError,
    StreamState,
    build_stream_state,
    plan_epoch,
)

MIX_ROWS_PER_BLOCK = 64  # rows per output block: 64 x 320 kB = 20 MB for 10 s int16 clips (32: 1.08x the
# numpy loop, 64: 1.25x in the same benchmarks/stream.py run; Ray's per-block cost on the driver is ~5 ms)
GEN_BUFFER_BLOCKS = 8  # output blocks a stream task may hold before the executor takes them (see build_train_stream)
UNIT_ROWS = 512  # clips a work unit draws from at least: files_per_unit = ceil(UNIT_ROWS / rows per shard), >= 2


_TASK_BUFFERS = BufferPool()  # per process: a task's (block, S) stored rows


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
    fancy-indexed gather copied every row twice), into a buffer of the task's pool (`BufferPool`: reused
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

