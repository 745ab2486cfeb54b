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


def test_sets_too_small_to_rank_encoders_say_so(sets):
    """2 + 2 test clips per domain: AUC steps of 1/4, a warning naming the counts and the settings; the smallest
    machine and domain decides; 5 + 5 is enough."""
    from dataclasses import replace

    assert sets.smallest_test_counts() == (2, 2)
    line = sets.coarse_warning()
    assert line.startswith("test sets: 2 normal + 2 anomalous test clips in the smallest machine domain: each AUC "
                           "moves in steps of 1/4")
    assert "eval.test_normal, eval.test_anomaly" in line
    counts = {f"test/{d}/{label}": 5 for d in ("source", "target") for label in ("normal", "anomaly")}
    five = replace(sets, manifest={**sets.manifest, "per_machine": {"fan": counts}})
    assert five.smallest_test_counts() == (5, 5) and five.coarse_warning() is None
    one_short = {**counts, "test/target/anomaly": 4}
    held = replace(sets, manifest={**sets.manifest, "split": "validation", "per_machine": {"fan": counts,
                                                                                           "pump": one_short}})
    assert held.smallest_test_counts() == (5, 4)
    assert held.coarse_warning().startswith("validation sets: 5 normal + 4 anomalous")
    assert "eval.validation_fraction" in held.coarse_warning()


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


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.ray
def test_validation_and_test_sets_share_no_clip_and_no_noise_segment(small_worlds, ray_local, tmp_path):
    """The held-out share of the evaluation world gives the validation sets; the test sets never touch it."""
    import shutil

    from retain_asd.config import load_config
    from retain_asd.eval.evalsets import SplitOverlapError, evalsets_from_config, validation_sets_from_config

    small = ["eval.source_refs=8", "eval.target_refs=4", "eval.test_normal=4", "eval.test_anomaly=4",
             "eval.snrs_db=[0.0]"]
    cfg = load_config("smoke", overrides=[*small_worlds, f"data.work_dir={tmp_path / 'work'}", *small])
    test = evalsets_from_config(cfg)
    val = validation_sets_from_config(cfg, test_sets=test)  # the guard passes
    assert (test.split, val.split) == ("test", "validation") and val.snrs_db == [-5.0, 0.0]
    clips = {s: {r["clip_id"] for r in sets.table.to_pylist()} for s, sets in (("test", test), ("val", val))}
    noise = {s: {(r["noise_id"], r["noise_offset"]) for r in sets.table.to_pylist()}
             for s, sets in (("test", test), ("val", val))}
    assert clips["test"] and clips["val"] and not clips["test"] & clips["val"]
    assert noise["test"] and noise["val"] and not noise["test"] & noise["val"]
    # the world holds 12 + 4 references and 4 + 4 tests per domain; round(0.3 n) of each group is held out
    per = val.manifest["per_machine"]["bearing"]
    assert per == {"ref_source/source/normal": 4, "ref_target/target/normal": 1, "test/source/normal": 1,
                   "test/source/anomaly": 1, "test/target/normal": 1, "test/target/anomaly": 1}, per
    per = test.manifest["per_machine"]["bearing"]  # the rest, capped by what the test sets ask for (8, 4, 4 + 4)
    assert per == {"ref_source/source/normal": 8, "ref_target/target/normal": 3, "test/source/normal": 3,
                   "test/source/anomaly": 3, "test/target/normal": 3, "test/target/anomaly": 3}, per
    assert val.scored_on()["eval.split"] == "validation"

    # a validation corpus of its own that holds copies of the evaluation files: refused, naming them
    roots = dict(o.split("=", 1) for o in small_worlds)
    shutil.copytree(roots["eval.machine_root"], tmp_path / "val" / "machines")
    shutil.copytree(roots["eval.noise_root"], tmp_path / "val" / "noise")
    planted = load_config("smoke", overrides=[*small_worlds, f"data.work_dir={tmp_path / 'work'}", *small,
                                              f"validation.machine_root={tmp_path / 'val' / 'machines'}",
                                              f"validation.noise_root={tmp_path / 'val' / 'noise'}"])
    with pytest.raises(SplitOverlapError, match="share") as err:
        validation_sets_from_config(planted)
    text = str(err.value)
    assert str(tmp_path / "val" / "machines") in text and roots["eval.machine_root"] in text
    assert str(tmp_path / "val" / "noise") in text and "noise segment" in text


def test_synthetic_world_gives_the_clips_the_settings_ask_for(ray_local, tmp_path):
    """Asking the synthetic evaluation world for N clips gives the TEST sets exactly N (it is written at that size
    plus the share eval.validation_fraction held out), the validation sets that share, every clip of both with
    its own noise segment, and nothing is reported short."""
    from retain_asd.config import load_config
    from retain_asd.eval.evalsets import evalsets_from_config, validation_sets_from_config

    said = []
    cfg = load_config(overrides=[f"data.work_dir={tmp_path}", "data.clip_s=1.0", "eval.synth_machines=[spindle]",
                                 "eval.synth_noise=[transformer, passby]", "eval.snrs_db=[0.0]",
                                 "validation.snrs_db=[0.0]", "eval.validation_fraction=0.3",
                                 "eval.source_refs=7", "eval.target_refs=3", "eval.test_normal=5",
                                 "eval.test_anomaly=4"])
    sets = evalsets_from_config(cfg, say=said.append)
    counts = sets.manifest["per_machine"]["spindle"]
    assert counts == {"ref_source/source/normal": 7, "ref_target/target/normal": 3, "test/source/normal": 5,
                      "test/source/anomaly": 4, "test/target/normal": 5, "test/target/anomaly": 4}
    assert said == [] and sets.manifest["warnings"] == []
    assert sets.manifest["counts"]["factory_a_max_segment_uses"] == 1
    assert sets.manifest["counts"]["factory_b_max_segment_uses"] == 1
    # the world: 12 source refs (2 rounds of 6 combos for ceil(7 / 0.7) = 10), 6 target refs (3 rounds of 2 for
    # ceil(3 / 0.7) = 5), 8 tests per domain and label (ceil(5 / 0.7)); the validation sets get round(0.3 n) of
    # each group (4, 2, 2), capped by what they ask for
    val = validation_sets_from_config(cfg, test_sets=sets)
    assert val.manifest["per_machine"]["spindle"] == {
        "ref_source/source/normal": 4, "ref_target/target/normal": 2, "test/source/normal": 2,
        "test/source/anomaly": 2, "test/target/normal": 2, "test/target/anomaly": 2}
    assert val.manifest["counts"]["factory_a_max_segment_uses"] == 1
    assert val.manifest["counts"]["factory_b_max_segment_uses"] == 1


def test_real_corpus_shortfall_is_said(small_corpus, tmp_path, capsys):
    """A real corpus with fewer clips than asked is used as it is, and the shortfall reaches the console."""
    from retain_asd.config import load_config
    from retain_asd.eval.evalsets import evalsets_from_config

    synth = small_corpus / "synth"
    cfg = load_config(overrides=[f"data.work_dir={tmp_path}", "data.clip_s=2.0",
                                 f"eval.machine_root={synth / 'machines'}", f"eval.noise_root={synth / 'noise'}",
                                 "eval.snrs_db=[0.0]", "eval.source_refs=100", "eval.target_refs=2",
                                 "eval.test_normal=2", "eval.test_anomaly=2"])
    evalsets_from_config(cfg)
    err = capsys.readouterr().err
    # 12 source references, round(0.3 x 12) = 4 held out for validation: the test sets' part has 8
    assert "evaluation sets: fan ref_source source normal: asked for 100 clips, the corpus has 8; using 8" in err
