"""Training stream: clean machine shards + noise bank -> paired, mixed (Eq. 3), multi-hot labelled rows.

How it is built (one Ray Data dataset covering every epoch, iterated once by the training loop), in three
modules along the data's way:

* `plan`: the epoch plan, a pure function of (seed, epoch) (`plan_epoch`), and the driver-side state it is
  drawn from (`build_stream_state`: clean index + noise bank + SNR sampler). No Ray.
* `tasks`: the Ray Data dataset (`build_train_stream`, `build_train_dataset`); each read/mix task turns one
  (epoch, work unit) into compact rows: the clean clip as stored and its Eq. 3 decision (`mix_unit`).
* `consumer`: the training worker's side; clean, noise and mixture formed from the compact rows into reused
  batch buffers (`form_audio`, `iter_train_batches`).

`tasks` and `consumer` import `plan` (and `buffers`, the buffer pool both reuse), never the reverse. The
public names of all three are re-exported here: `from retain_asd import stream; stream.plan_epoch(...)`.
"""

from retain_asd.stream.buffers import BUFFER_POOL_SETS
from retain_asd.stream.consumer import (
    AUDIO_COLUMNS,
    ID_COLUMNS,
    MIXING_COLUMNS,
    TORCH_COLUMNS,
    epochs_for_steps,
    form_audio,
    iid_distinct_expectation,
    iter_train_batches,
    noise_bank_of,
    with_audio,
)
from retain_asd.stream.plan import (
    CleanIndex,
    EpochPlan,
    NoiseBank,
    StreamError,
    StreamState,
    build_stream_state,
    noise_offsets,
    noise_permutation,
    plan_epoch,
    read_noise_bank,
)
from retain_asd.stream.tasks import (
    GEN_BUFFER_BLOCKS,
    MIX_ROWS_PER_BLOCK,
    UNIT_ROWS,
    StreamPlan,
    block_target_bytes,
    build_train_dataset,
    build_train_stream,
    default_files_per_unit,
    mix_unit,
    unit_files,
)

__all__ = [
    "AUDIO_COLUMNS", "BUFFER_POOL_SETS", "GEN_BUFFER_BLOCKS", "ID_COLUMNS", "MIXING_COLUMNS", "MIX_ROWS_PER_BLOCK",
    "TORCH_COLUMNS", "UNIT_ROWS", "CleanIndex", "EpochPlan", "NoiseBank", "StreamError", "StreamPlan", "StreamState",
    "block_target_bytes", "build_stream_state", "build_train_dataset", "build_train_stream", "default_files_per_unit",
    "epochs_for_steps", "form_audio", "iid_distinct_expectation", "iter_train_batches", "mix_unit", "noise_bank_of",
    "noise_offsets", "noise_permutation", "plan_epoch", "read_noise_bank", "unit_files", "with_audio",
]
