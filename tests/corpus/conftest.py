"""Fixtures for the corpus tests: tiny audio writers (``shared_data`` comes from tests/conftest.py)."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture
def write_wav():
    """Write a short valid 16 kHz wav (layouts never decode audio, so 0.01 s is enough)."""

    def _write(path: Path, seconds: float = 0.01, fmt: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = np.zeros(max(1, int(16000 * seconds)), dtype=np.float32)
        sf.write(path, samples, 16000, format=fmt)
        return path

    return _write
