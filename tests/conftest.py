"""Shared fixtures: one local Ray for the whole session, paths to the real audio in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retain_asd.runtime import apply_env_defaults

apply_env_defaults()
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real DCASE clips, real noise, real evaluator CSVs); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not found (expected beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster, started once per test session (about 3 s) and shared by every test."""
    from retain_asd.runtime import init_ray, set_data_progress

    ray = init_ray(num_cpus=2, quiet=True)
    set_data_progress(False)
    yield ray
    ray.shutdown()
