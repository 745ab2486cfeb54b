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


@pytest.fixture(scope="session")
def small_worlds(tmp_path_factory) -> list[str]:
    """The two synthetic worlds of the paper's protocol, small (10 s clips): the pre-training world (fan; noise
    pink_hum, bursts) and the evaluation world (bearing; stationary hvac for Factory A, non-stationary
    hammering for Factory B). Returns the config overrides that point data.* and eval.* at them."""
    from retain_asd.corpus.synth import write_eval_world, write_pretrain_world

    root = tmp_path_factory.mktemp("small_worlds")
    pre = write_pretrain_world(root / "pretrain", machines=("fan",), noise_categories=("pink_hum", "bursts"),
                               train_source_per_attr=2, train_target_per_attr=2, test_per_domain=2,
                               noise_clips_per_category=2, noise_clip_s=20.0)
    ev = write_eval_world(root / "eval", machines=("bearing",), noise_categories=("hvac", "hammering"),
                          train_source_per_attr=2, train_target_per_attr=2, test_per_domain=4,
                          noise_clips_per_category=2, noise_clip_s=60.0)
    return [f"data.machine_root={pre.machine_root}", f"data.noise_root={pre.noise_root}",
            f"eval.machine_root={ev.machine_root}", f"eval.noise_root={ev.noise_root}"]


@pytest.fixture(scope="session")
def small_pretrain_root(tmp_path_factory) -> list[str]:
    """A tiny pre-training corpus disjoint from `small_corpus` (gearbox, other noise recordings), 2 s clips:
    the overrides data.machine_root / data.noise_root that pass the leakage guard against it."""
    from retain_asd.corpus.synth import write_synthetic_corpus

    s = write_synthetic_corpus(tmp_path_factory.mktemp("small_pretrain") / "synth", seed=1, machines=("gearbox",),
                               train_source_per_attr=1, train_target_per_attr=1, test_per_domain=1, clip_s=2.0,
                               noise_categories=("brown_fan",), noise_clips_per_category=1, noise_clip_s=4.0)
    return [f"data.machine_root={s.machine_root}", f"data.noise_root={s.noise_root}"]


def pytest_collection_modifyitems(items):
    """A test marked ``reliability("case")`` records its case in the JUnit XML (scripts/reliability_table.py)."""
    for item in items:
        for marker in item.iter_markers("reliability"):
            item.user_properties.append(("reliability_case", marker.args[0]))
