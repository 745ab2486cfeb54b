"""Clip-length buffers reused across batches: the consumer's (batch, S) audio arrays and a task's (block, S)
stored rows (`BufferPool`). Numpy only; shared by `stream.tasks` and `stream.consumer`."""

from __future__ import annotations

import sys

import numpy as np

BUFFER_POOL_SETS = 8  # batches of audio buffers `iter_train_batches` keeps for reuse (see BufferPool)


class BufferPool:
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
