"""Shared fixture of the train tests: a tiny random BEATs checkpoint."""

from __future__ import annotations

import pytest

from retain_asd.models.beats import beats_tiny, write_random_checkpoint


@pytest.fixture(scope="session")
def init_path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("init") / "init_beats.pt", beats_tiny(), seed=3)
