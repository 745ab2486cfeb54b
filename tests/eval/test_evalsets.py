"""Eval sets: set-level SNR, disjoint noise segments, determinism, Mismatch = B refs + A tests."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retain_asd.eval.evalsets import (
    EvalSetParams,
    MixtureSource,
    build_evalsets,
    load_evalsets,
    noise_segments,
    row_key,
)
from retain_asd.mixing import noise_segment

PARAMS = EvalSetParams(snrs_db=(-10.0, 0.0, 20.0), source_refs=8, target_refs=2, test_normal=2, test_anomaly=2)


@pytest.fixture(scope="module")
def corpus(small_corpus) -> Path:
    return small_corpus / "corpus"


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory):
    return build_evalsets(corpus, tmp_path_factory.mktemp("evalsets"), PARAMS)


def test_noise_segments_are_disjoint_clip_length_cuts():
    meta = [{"clip_id": "a"}, {"clip_id": "b"}]
    assert noise_segments(meta, {"a": 25, "b": 5}, 10) == [("a", 0), ("a", 10), ("b", 0)]
    np.testing.assert_array_equal(noise_segment(np.arange(25), 10, 10), np.arange(10, 20))
    np.testing.assert_array_equal(noise_segment(np.arange(4), 0, 10), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # loops


def test_counts_and_mismatch_reuses_recipes(sets):
    m = sets.manifest
    assert m["counts"]["clips_per_set"] == 2 * (8 + 2 + 2 * (2 + 2))  # 36
    assert m["per_machine"]["fan"] == {"ref_source/source/normal": 8, "ref_target/target/normal": 2,
                                       "test/source/normal": 2, "test/source/anomaly": 2,
                                       "test/target/normal": 2, "test/target/anomaly": 2}
    assert m["warnings"] == []
    for snr in PARAMS.snrs_db:
        a, b, mm = (sets.rows(c, snr) for c in ("factory_a", "factory_b", "mismatch"))
        expected = sorted(row_key(r) for r in b if r["role"] != "test") + sorted(
            row_key(r) for r in a if r["role"] == "test")
        assert sorted(row_key(r) for r in mm) == sorted(expected)
        assert {r["noise_category"] for r in a} <= {"pink_hum", "brown_fan"}  # stationary
        assert {r["noise_category"] for r in b} <= {"bursts", "clatter"}


@pytest.mark.parametrize("condition", ["factory_a", "factory_b", "mismatch"])
def test_set_snr_matches_target_and_no_segment_reuse(sets, condition):
    source = MixtureSource(sets.corpus_root)
    for snr in PARAMS.snrs_db:
        rows = sets.rows(condition, snr)
        segments = Counter((r["noise_id"], r["noise_offset"]) for r in rows)
        assert max(segments.values()) == 1, "a noise segment is used twice within a set"
        clean, noise = source.parts(rows)
        p_clean = np.mean(np.square(clean.astype(np.float64)), axis=1)
        p_noise = np.mean(np.square(noise.astype(np.float64)), axis=1)
        assert abs(10 * np.log10(p_clean.mean() / p_noise.mean()) - snr) < 0.05
        for machine in ("fan", "pump"):  # also per machine: the gain is relative to its own clean power
            sel = [i for i, r in enumerate(rows) if r["machine"] == machine]
            assert abs(10 * np.log10(p_clean[sel].mean() / p_noise[sel].mean()) - snr) < 0.05


def test_building_twice_gives_identical_files(corpus, sets, tmp_path):
    again = build_evalsets(corpus, tmp_path / "again", PARAMS)
    assert (again.root / "recipes.parquet").read_bytes() == (sets.root / "recipes.parquet").read_bytes()
    assert again.manifest["recipes_sha1"] == sets.manifest["recipes_sha1"]
    assert load_evalsets(sets.root).table.equals(again.table)
    other_seed = build_evalsets(corpus, tmp_path / "seed1", EvalSetParams(**{**PARAMS.__dict__, "seed": 1}))
    assert other_seed.manifest["recipes_sha1"] != sets.manifest["recipes_sha1"]


def test_short_data_warns_with_counts(corpus, tmp_path, caplog):
    params = EvalSetParams(snrs_db=(0.0,), source_refs=100, target_refs=2, test_normal=2, test_anomaly=2)
    with caplog.at_level(logging.WARNING):
        short = build_evalsets(corpus, tmp_path / "short", params)
    expected = "fan ref_source source normal: asked for 100 clips, the corpus has 12; using 12"
    assert expected in short.manifest["warnings"]
    assert short.manifest["per_machine"]["fan"]["ref_source/source/normal"] == 12
    # 2 x (12 + 2 + 8) = 44 clips > 40 segments per factory: reuse is announced, at most twice per segment.
    assert short.manifest["counts"]["factory_a_max_segment_uses"] == 2
    assert any("40 noise segments" in w and "44 clips" in w for w in short.manifest["warnings"])
    assert max(Counter((r["noise_id"], r["noise_offset"]) for r in short.rows("factory_a", 0.0)).values()) == 2
