"""The leakage guard on real ingests: two corpora sharing one clip under another name, separately one noise
recording, separately one machine type, are each refused naming both files; the Table-5 variant is allowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile as sf

from retain_asd.corpus.ingest import ingest
from retain_asd.corpus.protocol import CorpusOverlapError, check_disjoint, find_overlaps, overlap_params
from retain_asd.corpus.shards import DecodeSettings
from retain_asd.corpus.synth import write_eval_world, write_pretrain_world, write_synthetic_corpus

pytestmark = pytest.mark.ray

TINY = dict(train_source_per_attr=1, train_target_per_attr=1, test_per_domain=1, clip_s=2.0,
            noise_clips_per_category=1, noise_clip_s=4.0)
SETTINGS = DecodeSettings(clip_s=2.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol_raw")
    pre = write_pretrain_world(root / "pre", machines=("fan",), noise_categories=("pink_hum", "bursts"), **TINY)
    ev = write_eval_world(root / "eval", machines=("bearing",), noise_categories=("hvac", "hammering"), **TINY)
    return root, pre, ev


def _ingest(machine_root, noise_root, out: Path) -> Path:
    ingest(machine_root, noise_root, out, settings=SETTINGS)
    return out


@pytest.fixture(scope="module")
def corpora(raw, ray_local):
    root, pre, ev = raw
    return {"pre": _ingest(pre.machine_root, pre.noise_root, root / "pre_corpus"),
            "eval": _ingest(ev.machine_root, ev.noise_root, root / "eval_corpus")}


def _variant(raw, name: str, edit) -> Path:
    """A copy of the pre-training tree changed by `edit(copy_root)`, ingested into its own folder."""
    root, pre, _ = raw
    copy = root / name
    shutil.copytree(pre.root, copy)
    edit(copy)
    return _ingest(copy / "machines", copy / "noise", root / f"{name}_corpus")


def _eval_test_clip(ev) -> Path:
    return Path(next(c.path for c in ev.clips if c.split == "test" and c.label == "anomaly"))


def test_disjoint_worlds_pass(corpora):
    report = check_disjoint(corpora["pre"], corpora["eval"])
    assert not report and report.counts() == {"machine_type": 0, "clip": 0, "noise": 0}
    assert "disjoint" in report.describe()


def test_shared_clip_under_another_name_is_refused(raw, corpora, ray_local):
    _, _, ev = raw
    clip = _eval_test_clip(ev)
    renamed = "section_00_source_train_normal_0099_spd_20_ld_1.wav"

    def edit(copy):
        shutil.copy(clip, copy / "machines" / "dev_data" / "raw" / "fan" / "train" / renamed)

    pre = _variant(raw, "pre_shared_clip", edit)
    with pytest.raises(CorpusOverlapError) as err:
        check_disjoint(pre, corpora["eval"])
    message = str(err.value)
    assert renamed in message and str(clip) in message and "data.add_eval_references" in message
    assert err.value.report.counts() == {"machine_type": 0, "clip": 1, "noise": 0}
    (overlap,) = err.value.report.overlaps
    assert Path(overlap.pretrain_path).name == renamed and overlap.eval_path == str(clip)


def test_reencoded_copy_is_caught_by_the_decoded_audio_hash(raw, corpora, ray_local):
    _, _, ev = raw
    clip = _eval_test_clip(ev)
    flac = "section_00_source_train_normal_0098_spd_20_ld_1.flac"

    def edit(copy):  # other bytes (FLAC), same samples
        x, rate = sf.read(clip, dtype="int16")
        sf.write(copy / "machines" / "dev_data" / "raw" / "fan" / "train" / flac, x, rate, subtype="PCM_16")

    pre = _variant(raw, "pre_flac_clip", edit)
    with pytest.raises(CorpusOverlapError, match=flac):
        check_disjoint(pre, corpora["eval"])


def test_shared_noise_recording_is_refused(raw, corpora, ray_local):
    _, _, ev = raw
    recording = Path(next(p for c, p in ev.noise_files if c == "hammering"))

    def edit(copy):
        shutil.copy(recording, copy / "noise" / "bursts" / "workshop_take_7.wav")

    pre = _variant(raw, "pre_shared_noise", edit)
    with pytest.raises(CorpusOverlapError) as err:
        check_disjoint(pre, corpora["eval"])
    assert "workshop_take_7.wav" in str(err.value) and str(recording) in str(err.value)
    assert err.value.report.counts() == {"machine_type": 0, "clip": 0, "noise": 1}


def test_shared_machine_type_is_refused(raw, corpora, ray_local):
    # Another corpus with the eval type "bearing" (other seed: no shared clip), given as a second
    # pre-training manifest.
    root, _, _ = raw
    other = write_synthetic_corpus(root / "other_bearing", seed=7, machines=("bearing",),
                                   noise_categories=("clatter",), **TINY)
    extra = _ingest(other.machine_root, other.noise_root, root / "other_bearing_corpus")
    with pytest.raises(CorpusOverlapError, match="machine type 'bearing'") as err:
        check_disjoint([corpora["pre"], extra], corpora["eval"])
    assert err.value.report.counts() == {"machine_type": 1, "clip": 0, "noise": 0}
    (overlap,) = err.value.report.overlaps
    assert "/other_bearing/machines/" in overlap.pretrain_path and "/eval/machines/" in overlap.eval_path


def test_eval_reference_variant_returns_the_record(raw, corpora, ray_local):
    # Table 5 "+ eval-reference data": the evaluation references (train split) and noise added to
    # pre-training on purpose, here as a second pre-training corpus.
    root, _, ev = raw
    refs = root / "eval_refs"
    shutil.copytree(ev.root, refs)
    shutil.rmtree(refs / "machines" / "dev_data" / "raw" / "bearing" / "test")
    pre_plus_refs = [corpora["pre"], _ingest(refs / "machines", refs / "noise", root / "eval_refs_corpus")]
    with pytest.raises(CorpusOverlapError, match="data.add_eval_references"):
        check_disjoint(pre_plus_refs, corpora["eval"])

    report = check_disjoint(pre_plus_refs, corpora["eval"], allow_eval_references=True)
    n_refs = sum(c.split == "train" for c in ev.clips)
    assert report.counts() == {"machine_type": 1, "clip": n_refs, "noise": len(ev.noise_files)}
    assert report.machine_types == ("bearing",)
    assert {o.eval_split for o in report.of("clip")} == {"train"}
    assert overlap_params(report) == {"protocol.overlap_machine_type": 1, "protocol.overlap_clip": n_refs,
                                      "protocol.overlap_noise": len(ev.noise_files),
                                      "protocol.shared_machine_types": "bearing"}
    assert find_overlaps(pre_plus_refs, corpora["eval"]) == report

    # Test clips are never references: refused even in the variant, naming the first one.
    with pytest.raises(CorpusOverlapError, match=r"evaluation test clip\(s\) are in the pre-training corpus"):
        check_disjoint([corpora["pre"], corpora["eval"]], corpora["eval"], allow_eval_references=True)


def test_manifest_without_hashes_asks_for_reingest(tmp_path):
    old = {"sources": [{"path": "/x/fan/train/a.wav", "repairs": ""}]}
    with pytest.raises(ValueError, match="ingest --force"):
        check_disjoint(old, {"sources": []})
    with pytest.raises(FileNotFoundError, match="ingest the corpus first"):
        check_disjoint(tmp_path, tmp_path)
