"""Parquet shards: the on-disk form of a decoded corpus, written by a Ray Data job.

One folder per corpus (``machine/``, ``noise/``) holds ``part-*.parquet`` shards, ``manifest.json`` and
``rejects.csv``. The audio column holds each clip's raw little-endian samples as one Parquet value:
``fixed_size_binary[n * itemsize]`` for fixed-length clips, ``large_binary`` for full-length noise, with the
sample type (``int16`` | ``float32``) in the field's metadata. One value per clip, stored uncompressed, so
reading a shard is a copy: a list column (one Parquet value per sample, with its repetition levels) read
10x slower (benchmarks/stream.py, ``profile_ms_per_clip``). ``audio_matrix`` / ``audio_list`` decode it;
plain ``pyarrow.parquet.read_table`` reads the shards, with no Ray extension types. A folder is written under a
temporary name and renamed into place, so a reader never sees half a corpus; its manifest's fingerprint (input
paths, sizes, mtimes and the decode settings) makes a re-run on the same input a no-op and a changed input a rebuild.

The folder may be an object-store URI (``s3://bucket/corpus_pretrain/machine``, `retain_asd.storage`): the
shards are then written by the Ray tasks straight into the bucket, and the manifest, written last, is the
completion marker (a store has no rename; an object without a manifest beside it is not a corpus).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retain_asd import fsio, storage
from retain_asd.audio import PAD_MODES, AudioError, load_clip
from retain_asd.corpus.layouts import ClipRecord

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: audio as raw-sample binary values (1: Arrow lists)
MANIFEST = "manifest.json"
REJECTS = "rejects.csv"
AUDIO_DTYPE_KEY = b"retain_asd.sample_dtype"  # audio field metadata: b"int16" | b"float32"
AUDIO_DTYPES = ("float32", "int16")
META_COLUMNS = ("clip_id", "path", "kind", "dataset", "machine", "section", "domain", "split", "label",
                "class_name", "attributes", "noise_category", "stationary")


@dataclass(frozen=True)
class DecodeSettings:
    """How raw files become rows; part of the fingerprint (a change rebuilds the shards)."""

    sample_rate_hz: int = 16000
    clip_s: float | None = 10.0  # None keeps full length (noise banks)
    min_clip_s: float = 1.0
    channel: str = "mean"
    audio_dtype: str = "float32"  # "float32" or "int16"
    pad_mode: str = "zero"  # a short clip is zero-padded to clip_s (paper Sec. 4.2); "repeat" loops it

    def __post_init__(self):
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={self.pad_mode!r}: expected one of {PAD_MODES} (paper Sec. 4.2: 'zero')")

    @property
    def num_samples(self) -> int | None:
        return None if self.clip_s is None else int(round(self.clip_s * self.sample_rate_hz))


@dataclass(frozen=True)
class ShardSet:
    """A written corpus folder: where it is, what is in it, and whether this call built it."""

    root: Path | str  # a local folder, or a URI (a string)
    manifest: dict
    rejects: list[tuple[str, str]]
    rebuilt: bool

    @property
    def files(self) -> list[Path | str]:
        return [child(self.root, name) for name in self.manifest["shards"]]

    @property
    def num_rows(self) -> int:
        return int(self.manifest["counts"]["written"])


def child(root: str | os.PathLike, name: str) -> Path | str:
    """``root / name`` for a local folder (a Path) or a URI (a string)."""
    return storage.as_location(storage.join(root, name))


# ---------------------------------------------------------------------------------------------------- rows
def _record_row(record: ClipRecord) -> dict:
    row = asdict(record)
    row["attributes"] = json.dumps([list(kv) for kv in record.attributes])
    row["stationary"] = record.stationary
    return row


def file_sha1(path: str | os.PathLike) -> str:
    """sha1 of a file's bytes (the manifest's ``sha1``; the leakage guard hashes raw files with it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _audio_array(clips: list[np.ndarray], settings: DecodeSettings) -> pa.Array:
    """Clips as raw-sample binary values (int16 scaled by 32768 and clipped, or float32)."""
    if settings.audio_dtype == "int16":
        clips = [np.clip(np.round(c * 32768.0), -32768, 32767).astype("<i2") for c in clips]
    else:
        clips = [np.asarray(c, dtype="<f4") for c in clips]
    data = pa.py_buffer(np.concatenate(clips).tobytes() if clips else b"")
    n = settings.num_samples
    if n is not None:
        width = n * np.dtype(settings.audio_dtype).itemsize
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(clips), [None, data])
    sizes = np.asarray([c.nbytes for c in clips], dtype=np.int64)
    offsets = pa.py_buffer(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tobytes())
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(clips), [None, offsets, data])


def audio_field(settings: DecodeSettings) -> pa.Field:
    """The audio column's field: binary values, the sample type in its metadata (`audio_matrix` reads it)."""
    kind = pa.large_binary() if settings.num_samples is None else \
        pa.binary(settings.num_samples * np.dtype(settings.audio_dtype).itemsize)
    return pa.field("audio", kind, metadata={AUDIO_DTYPE_KEY: settings.audio_dtype.encode()})


def sample_dtype(field: pa.Field) -> np.dtype:
    """The stored sample type of an audio field; a clear error for shards of another schema."""
    meta = field.metadata or {}
    name = meta.get(AUDIO_DTYPE_KEY, b"").decode()
    if name not in AUDIO_DTYPES or not (pa.types.is_fixed_size_binary(field.type)
                                        or pa.types.is_large_binary(field.type)):
        raise ValueError(f"audio column of type {field.type} without {AUDIO_DTYPE_KEY.decode()} metadata: shards "
                         f"of an older schema (<{SCHEMA_VERSION}); re-run `retain-asd ingest --force`")
    return np.dtype(name).newbyteorder("<")


def clip_samples(schema: pa.Schema) -> int | None:
    """Samples per clip of a shard schema (None: full-length recordings of varying length)."""
    field = schema.field("audio")
    dtype = sample_dtype(field)
    return field.type.byte_width // dtype.itemsize if pa.types.is_fixed_size_binary(field.type) else None


def decode_batch(batch: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Ray Data UDF: decode each row's file; bad files become rows with a ``reject_reason`` and no audio."""
    rows = batch.to_pylist()
    channel = settings.channel if settings.channel == "mean" else int(settings.channel)
    empty = np.zeros(settings.num_samples or 0, np.float32)
    clips, reasons, repairs, hashes, audio_hashes = [], [], [], [], []
    for row in rows:
        sha, audio_sha, reason, samples, repaired = "", "", "", empty, ""
        try:
            sha = file_sha1(row["path"])
            clip = load_clip(row["path"], sample_rate_hz=settings.sample_rate_hz, channel=channel,
                             clip_s=settings.clip_s, min_clip_s=settings.min_clip_s, pad_mode=settings.pad_mode)
            samples, repaired = clip.samples.astype(np.float32, copy=False), ";".join(clip.repairs)
            audio_sha = hashlib.sha1(samples.tobytes()).hexdigest()  # the decoded audio: same for a re-encoded copy
        except AudioError as err:
            reason = err.reason
        except OSError as err:
            reason = f"cannot read file ({err.strerror or err})"
        hashes.append(sha)
        audio_hashes.append(audio_sha)
        reasons.append(reason)
        clips.append(samples)
        repairs.append(repaired)
    columns = {k: pa.array([r[k] for r in rows], type=pa.string()) for k in META_COLUMNS
               if k not in ("clip_id", "stationary")}
    columns["clip_id"] = pa.array([h[:16] for h in hashes], type=pa.string())
    columns["stationary"] = pa.array([r["stationary"] for r in rows], type=pa.bool_())
    columns["sha1"] = pa.array(hashes, type=pa.string())
    columns["audio_sha1"] = pa.array(audio_hashes, type=pa.string())
    columns["repairs"] = pa.array(repairs, type=pa.string())
    columns["reject_reason"] = pa.array(reasons, type=pa.string())
    columns["audio"] = _audio_array(clips, settings)
    names = (*META_COLUMNS, "repairs", "sha1", "audio_sha1", "reject_reason", "audio")
    schema = pa.schema([audio_field(settings) if k == "audio" else pa.field(k, columns[k].type) for k in names])
    return pa.Table.from_arrays([columns[k] for k in names], schema=schema)


DECODE_ROWS = 32  # files decoded per row group: bounds a task's memory (32 x 10 s float32 = 20 MB)


def write_shard_batch(batch: pa.Table, settings: DecodeSettings, out_dir: str, filesystem=None) -> pa.Table:
    """Ray Data UDF: decode a batch (``decode_batch``, DECODE_ROWS files at a time) and write its good rows
    as one shard in ``out_dir``, one row group per DECODE_ROWS files. `filesystem`: the pyarrow filesystem
    of ``out_dir`` (an object store's, pickled with its keys), None for a local folder.

    The audio never leaves the task: only the small metadata columns go back to the driver. (Decoded audio
    through the object store, then a second pass to write it, cost more than the decoding on 2 cores.)
    """
    # Named by the position of its first row in the written order, so the shards sort into that order
    # wherever the corpus lives (the stream reads them in manifest order); the hash keeps names unique.
    first = min(batch.column("order").to_pylist())
    batch = batch.drop_columns(["order"])
    name = hashlib.sha1("\0".join(batch.column("path").to_pylist()).encode()).hexdigest()[:16]
    path = f"{out_dir}/part-{first:07d}-{name}.parquet"
    writer, meta = None, []
    try:
        for start in range(0, batch.num_rows, DECODE_ROWS):
            table = decode_batch(batch.slice(start, DECODE_ROWS), settings)
            meta.append(table.select(["path", "class_name", "machine", "split", "noise_category", "sha1",
                                      "audio_sha1", "repairs", "reject_reason"]))
            good = table.filter(pc.equal(table.column("reject_reason"), "")).drop_columns(
                ["reject_reason", "sha1", "audio_sha1"])
            if good.num_rows:
                writer = writer or pq.ParquetWriter(  # audio: raw samples, no dictionary/compression/stats
                    path, good.schema, filesystem=filesystem,
                    compression={k: "NONE" if k == "audio" else "SNAPPY" for k in good.column_names},
                    use_dictionary=[k for k in good.column_names if k != "audio"],
                    write_statistics=[k for k in good.column_names if k != "audio"])
                writer.write_table(good)
    finally:
        if writer is not None:
            writer.close()
    return pa.concat_tables(meta)


# ---------------------------------------------------------------------------------------------------- writer
def fingerprint(records: Sequence[ClipRecord], scan_rejects: Sequence[tuple[str, str]],
                settings: DecodeSettings, rows_per_shard: int, shuffle_seed: int | None = 0) -> str:
    h = hashlib.sha1(json.dumps({"schema": SCHEMA_VERSION, "settings": asdict(settings),
                                 "rows_per_shard": rows_per_shard, "shuffle_seed": shuffle_seed},
                                sort_keys=True).encode())
    for path in sorted([r.path for r in records] + [p for p, _ in scan_rejects]):
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def read_manifest(root: str | os.PathLike,
                  fix: str = "re-run `retain-asd ingest --force` to rebuild the shards") -> dict | None:
    """``<root>/manifest.json`` of a built folder (shards, evaluation sets), or None when there is none; an
    unreadable one is an error naming the file and `fix`."""
    path = child(root, MANIFEST)
    if not storage.is_file(path):
        return None
    return storage.read_json(path, fix=fix)


def read_rejects(root: str | os.PathLike) -> list[tuple[str, str]]:
    path = child(root, REJECTS)
    if not storage.is_file(path):
        return []
    text = storage.read_bytes(path).decode("utf-8")
    return [(row["path"], row["reason"]) for row in csv.DictReader(io.StringIO(text, newline=""))]


def _rejects_csv(rejects: Sequence[tuple[str, str]]) -> str:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["path", "reason"])
    w.writerows(sorted(rejects))
    return f.getvalue()


def write_shards(records: Sequence[ClipRecord], out_dir: str | os.PathLike, *,
                 settings: DecodeSettings = DecodeSettings(), rows_per_shard: int = 256,
                 scan_rejects: Sequence[tuple[str, str]] = (), force: bool = False,
                 shuffle_seed: int | None = 0) -> ShardSet:
    """Decode ``records`` in parallel with Ray Data and write them as Parquet shards into ``out_dir``.

    Records are written in a seeded random order (``shuffle_seed``; None keeps the scan's path order), so
    every shard holds a sample of all machine types and sections: the training stream reads a few shards
    per work unit, and a batch is then well mixed instead of one machine type. The shards' names sort in
    that order, whatever folder the corpus is in, and the stream reads them in manifest (name) order: the
    same files ingested anywhere give the same training draws for the same seed. ``read_table`` sorts by
    path.

    Each Ray task decodes one batch of files and writes its own shard (``write_shard_batch``); shards hold
    at most ``rows_per_shard`` rows (fewer where files were rejected, or to give every CPU work).

    ``scan_rejects`` are files the layout scan could not name; they are listed in ``rejects.csv`` with the
    decode rejects, so ``inputs == written + rejected`` in the manifest. Needs Ray (``runtime.init_ray``).

    ``out_dir`` may be a URI: the old manifest is deleted first, then the old shards; the new shards go
    straight into the bucket and the new manifest is written last (see the module docstring).
    """
    import ray

    out_dir = storage.as_location(out_dir)
    remote = storage.is_uri(out_dir)
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard = {rows_per_shard}: must be > 0")
    fp = fingerprint(records, scan_rejects, settings, rows_per_shard, shuffle_seed)
    if not remote:
        fsio.remove_stale_temps(out_dir.parent)  # `.machine.tmp-*` of an ingest that was killed
    old = None if force else read_manifest(out_dir)
    if old is not None and old.get("fingerprint") == fp:
        log.info("%s: shards up to date (%d rows), nothing to do", out_dir, old["counts"]["written"])
        return ShardSet(out_dir, old, read_rejects(out_dir), rebuilt=False)

    if remote:  # the manifest first: from here on a reader finds no corpus, never a half-replaced one
        storage.remove(child(out_dir, MANIFEST))
        storage.remove(out_dir)
        filesystem, target = storage.resolve(out_dir)
        tmp = None
    else:
        tmp = fsio.temp_path(out_dir)
        tmp.mkdir(parents=True)
        filesystem, target = None, str(tmp)
    try:
        rejects = list(scan_rejects)
        written: list[dict] = []
        if records:
            from retain_asd.runtime import init_ray

            init_ray()  # idempotent: joins the Ray of the caller, or starts the embedded one with its settings
            items = [_record_row(r) for r in records]
            if shuffle_seed is not None:  # seeded: the same input gives the same shards
                items = [items[i] for i in np.random.default_rng(shuffle_seed).permutation(len(items))]
            for k, item in enumerate(items):
                item["order"] = k  # names the shards (write_shard_batch): their sorted order is this order
            # One task per shard; shards of at most rows_per_shard rows, and at least two tasks per CPU
            # when the corpus is large enough, so every core decodes.
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            rows_per_task = max(1, min(rows_per_shard, -(-len(items) // (2 * cpus))))
            meta = (ray.data.from_items(items, override_num_blocks=-(-len(items) // rows_per_task))
                    .map_batches(write_shard_batch, batch_size=rows_per_task, batch_format="pyarrow",
                                 fn_kwargs={"settings": settings, "out_dir": target, "filesystem": filesystem})
                    .take_all())
            rejects += [(m["path"], m["reject_reason"]) for m in meta if m["reject_reason"]]
            written = [m for m in meta if not m["reject_reason"]]
        for path, reason in rejects:
            log.warning("rejected %s: %s", path, reason)
        shards = [name for name in storage.list_names(out_dir if remote else tmp)
                  if name.endswith(".parquet") and not name.startswith(".")]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fp,
            "settings": asdict(settings),
            "rows_per_shard": rows_per_shard,
            "shuffle_seed": shuffle_seed,
            "shards": shards,
            "counts": {
                "inputs": len(records) + len(scan_rejects),
                "written": len(written),
                "rejected": len(rejects),
                "per_class": dict(sorted(Counter(m["class_name"] for m in written).items())),
            },
            # Content hashes for the leakage guard (corpus/protocol.py): sha1 of the file bytes, audio_sha1 of
            # the decoded samples as stored (catches a renamed copy, and a re-encoded one too).
            "sources": sorted(({"path": m["path"], "sha1": m["sha1"], "audio_sha1": m["audio_sha1"],
                                "machine": m["machine"], "split": m["split"], "noise_category": m["noise_category"],
                                "repairs": m["repairs"]} for m in written), key=lambda s: s["path"]),
        }
        if remote:  # one PUT per object; the manifest last, as the completion marker
            storage.write_bytes(child(out_dir, REJECTS), _rejects_csv(rejects).encode())
            storage.write_bytes(child(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
        else:
            with fsio.atomic_write(tmp / REJECTS, newline="") as f:  # fsync'ed before the folder is renamed
                f.write(_rejects_csv(rejects))
            fsio.write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            fsio.commit_folder(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardSet(out_dir, manifest, sorted(rejects), rebuilt=True)


# ---------------------------------------------------------------------------------------------------- readers
def shard_source(root: str | os.PathLike, name: str) -> tuple[str, object]:
    """(path, pyarrow filesystem or None) of one shard, for ``pq.read_table(path, filesystem=...)``."""
    if not storage.is_uri(root):
        return str(Path(root) / name), None
    filesystem, base = storage.resolve(root)
    return f"{base}/{name}", filesystem


def read_shard(root: str | os.PathLike, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard of a corpus folder (local or URI)."""
    path, filesystem = shard_source(root, name)

    def read() -> pa.Table:
        return pq.read_table(path, columns=list(columns) if columns else None, filesystem=filesystem)

    return read() if filesystem is None else storage.retrying(read, path)  # a bucket's errors are retried


def read_table(root: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of a corpus folder (local or URI) as one Arrow table (plain pyarrow, no Ray)."""
    root = storage.as_location(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}: no {MANIFEST}; run `retain-asd ingest` first")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{root}: shard schema {manifest.get('schema_version')} != {SCHEMA_VERSION}; "
                         "re-run `retain-asd ingest --force`")
    if not manifest["shards"]:
        raise ValueError(f"{root}: the corpus has no rows ({manifest['counts']['rejected']} rejected, "
                         f"see {child(root, REJECTS)})")
    tables = [read_shard(root, name, columns) for name in manifest["shards"]]
    return pa.concat_tables(tables).sort_by("path")


def audio_matrix(table: pa.Table, dtype=np.float32) -> np.ndarray:
    """The fixed-length audio column of a shard table as float32 (rows, samples).

    Zero-copy for float32 shards; int16 shards (data.audio_dtype) are rescaled by 1/32768. The one decoder
    of machine clips, used by the training stream and the corpus readers. `dtype=None` returns the stored
    samples as they are (int16 unscaled), zero-copy and read-only: the stream converts only the rows it draws.
    """
    stored = sample_dtype(table.schema.field("audio"))
    chunks = table.column("audio")
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()  # combine copies even one chunk
    if not pa.types.is_fixed_size_binary(col.type):
        raise ValueError("audio_matrix needs fixed-length clips; use audio_list for full-length noise")
    width = col.type.byte_width
    x = np.frombuffer(col.buffers()[1], dtype=stored, count=len(col) * width // stored.itemsize,
                      offset=col.offset * width).reshape(len(col), width // stored.itemsize)
    return _as_float(x, dtype)


def audio_list(table: pa.Table) -> list[np.ndarray]:
    """The audio column as a list of float32 arrays (fixed or variable length)."""
    field = table.schema.field("audio")
    if pa.types.is_fixed_size_binary(field.type):
        return list(audio_matrix(table))
    stored = sample_dtype(field)
    col = table.column("audio").combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64, count=len(col) + 1, offset=col.offset * 8)
    data = col.buffers()[2]
    return [_as_float(np.frombuffer(data, dtype=stored, count=int(hi - lo) // stored.itemsize, offset=int(lo)),
                      np.float32).copy() for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]


def _as_float(x: np.ndarray, dtype) -> np.ndarray:
    if dtype is None:
        return x
    return x.astype(np.float32) / np.float32(32768.0) if x.dtype.kind == "i" else x.astype(np.float32, copy=False)
