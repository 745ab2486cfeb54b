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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, ray_local) -> Path:
    """A small ingested synthetic corpus shared by the eval tests: ``<root>/synth`` (DCASE tree + noise) and
    ``<root>/corpus`` (shards). 2 machines x (12 + 4 train, 16 test) clips of 2 s; 2 x 2 noises of 20 s."""
    from retain_asd.corpus.ingest import ingest
    from retain_asd.corpus.shards import DecodeSettings
    from retain_asd.corpus.synth import write_synthetic_corpus

    root = tmp_path_factory.mktemp("small_corpus")
    s = write_synthetic_corpus(root / "synth", machines=("fan", "pump"), train_source_per_attr=2,
                               train_target_per_attr=2, test_per_domain=4, clip_s=2.0,
                               noise_clips_per_category=2, noise_clip_s=20.0)
    ingest(s.machine_root, s.noise_root, root / "corpus", settings=DecodeSettings(clip_s=2.0))
    return root


def pytest_collection_modifyitems(items):
    """A test marked ``reliability("case")`` records its case in the JUnit XML (scripts/reliability_table.py)."""
    for item in items:
        for marker in item.iter_markers("reliability"):
            item.user_properties.append(("reliability_case", marker.args[0]))
