"""The consumer of the training stream, on the training worker: compact rows -> clean, noise and mixture
(Eq. 3) formed straight into reused batch buffers, as torch tensors for the loop.

The rows carry the clean clip as stored and its mixing decision (`stream.tasks`); the consumer forms
clean = a1 x1, noise = a2 x2 (the segment cut by `mixing.noise_segment`) and the mixture straight into its
batch buffers (`form_audio`, `iter_train_batches`), from the noise bank it shares zero-copy through the object
store: one write per output array (benchmarks/stream.py). Also the sizes the loop asks of the stream
(`epochs_for_steps`) and the yardstick of a well-mixed batch (`iid_distinct_expectation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retain_asd import mixing
from retain_asd.stream.buffers import BufferPool
from retain_asd.stream.plan import NoiseBank, StreamError, StreamState

# Numeric columns the training loop gets as tensors; clip_id / noise_id (strings) stay in the dataset
# for inspection but cannot become tensors.
TORCH_COLUMNS = ("mixture", "clean", "noise", "label", "machine_idx", "noise_idx", "clip_idx", "snr_db",
                 "noise_offset", "epoch")
ID_COLUMNS = ("clip_id", "noise_id")
AUDIO_COLUMNS = ("clean", "noise", "mixture")  # formed on the consumer (`form_audio`), float32 (S,) each
MIXING_COLUMNS = ("clean_stored", "clean_gain", "noise_gain", "noise_rec", "noise_offset")  # what `form_audio` reads


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
    dropped every reference to a batch (`BufferPool`); a batch the loop keeps is never overwritten.
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
    pool = BufferPool()
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
