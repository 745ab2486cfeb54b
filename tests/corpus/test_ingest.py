"""Ingestion on real clips: a DCASE-2023-style tree built from ../shared/data/machine plus injected bad files.

The real clips are DCASE 2020 dev files; the test renames them into the 2023 convention
(``section_00_{source|target}_{train|test}_{normal|anomaly}_NNNN_<attrs>.wav``) so ingestion takes the
same path as a DCASE 2023 download. Bad files are written next to them; every one must be repaired by
policy (stereo, rate, length) or listed in rejects with its reason, and the manifest must count them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from retain_asd.audio import write_audio
from retain_asd.corpus import layouts, shards
from retain_asd.corpus.ingest import ingest, load_corpus

pytestmark = pytest.mark.ray

N_SOURCE, N_TARGET = 6, 2


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("raw")
    fan = root / "dev_data" / "raw" / "fan"
    (fan / "train").mkdir(parents=True)
    (fan / "test").mkdir()
    train = sorted((shared_data / "machine" / "dcase2020t2_dev_id00" / "train").glob("*.wav"))
    anomaly = sorted((shared_data / "machine" / "dcase2020t2_dev_id00" / "test").glob("*.wav"))[0]
    good = {}
    for i, src in enumerate(train[:N_SOURCE]):
        good[f"train/section_00_source_train_normal_{i:04d}_m-n_W.wav"] = src
    for i, src in enumerate(train[N_SOURCE:N_SOURCE + N_TARGET]):
        good[f"train/section_00_target_train_normal_{i:04d}_m-n_X.wav"] = src
    good["test/section_00_source_test_normal_0000_m-n_W.wav"] = train[N_SOURCE + N_TARGET]
    good["test/section_00_source_test_anomaly_0000_m-n_W.wav"] = anomaly
    for name, src in good.items():
        shutil.copy(src, fan / name)
    toycar = sorted((shared_data / "machine" / "dcase2020t2_dev_id01_toycar").glob("normal*.wav"))[0]
    shutil.copy(toycar, fan / "train" / "section_00_source_train_normal_0100_m-n_W.wav")  # 11 s: cropped

    rng = np.random.default_rng(0)
    clip, _ = sf.read(train[0], dtype="float32")
    bad = fan / "train"
    # repaired by policy
    stereo = np.stack([clip, 0.5 * clip], axis=1)
    stereo_44k = np.interp(np.arange(0, len(clip), 16000 / 44100), np.arange(len(clip)), clip)
    write_audio(bad / "section_00_source_train_normal_0200_m-n_W.wav",
                np.stack([stereo_44k, stereo_44k], axis=1), sample_rate_hz=44100)
    write_audio(bad / "section_00_source_train_normal_0201_m-n_W.wav", clip[:32000])  # 2 s: padded
    write_audio(bad / "section_00_source_train_normal_0202_m-n_W.wav", stereo)  # 16 kHz stereo: downmixed
    # rejected
    (bad / "section_00_source_train_normal_0300_m-n_W.wav").write_bytes(b"")
    (bad / "section_00_source_train_normal_0301_m-n_W.wav").write_bytes(b"RIFF" + rng.bytes(400))
    nan = clip.copy()
    nan[1000:1010] = np.nan
    sf.write(bad / "section_00_source_train_normal_0302_m-n_W.wav", nan, 16000, subtype="FLOAT")
    write_audio(bad / "section_00_source_train_normal_0303_m-n_W.wav", np.zeros(160000, np.float32))
    write_audio(bad / "section_00_source_train_normal_0304_m-n_W.wav", clip[:8000])  # 0.5 s: too short
    write_audio(bad / "not_a_dcase_name.wav", clip)
    # a real ragged metadata file beside the audio (as DCASE ships attributes_XX.csv): must not break the scan
    shutil.copy(shared_data / "csv" / "dcase2022_eval_ground_truth" / "ground_truth_attributes" / "valve"
                / "attributes_05.csv", fan / "attributes_00.csv")

    noise = root / "noise"
    for category, name in (("running_tap", "running_tap.wav"), ("dishes", "doing_the_dishes.wav")):
        (noise / category).mkdir(parents=True)
        shutil.copy(shared_data / "noise" / name, noise / category / name)
    (noise / "categories.yaml").write_text("running_tap: {stationary: true}\ndishes: {stationary: false}\n")
    return root, good


@pytest.fixture(scope="module")
def corpus(raw_tree, tmp_path_factory, ray_local):
    root, _ = raw_tree
    out = tmp_path_factory.mktemp("corpus")
    return ingest(root / "dev_data" / "raw", root / "noise", out, rows_per_shard=4)


REJECT_REASONS = {
    "0300": "empty", "0301": "unreadable", "0302": "non-finite", "0303": "silent", "0304": "too short",
    "not_a_dcase_name": "not_a_dcase_name.wav",
}


def test_counts_add_up(raw_tree, corpus):
    root, good = raw_tree
    inputs = [p for p in (root / "dev_data").rglob("*") if p.suffix == ".wav"]
    counts = corpus.machine.manifest["counts"]
    assert counts["inputs"] == len(inputs) == len(good) + 1 + 3 + 6
    assert counts["written"] == len(good) + 1 + 3
    assert counts["rejected"] == 6
    assert sum(counts["per_class"].values()) == counts["written"]
    assert counts["per_class"] == {"fan_sec00_m-n_W": len(good) - N_TARGET + 1 + 3, "fan_sec00_m-n_X": N_TARGET}
    assert corpus.noise.manifest["counts"] == {"inputs": 2, "written": 2, "rejected": 0,
                                               "per_class": {"noise_dishes": 1, "noise_running_tap": 1}}


def test_every_bad_file_rejected_with_reason(corpus):
    rejects = dict((os.path.basename(p), reason) for p, reason in corpus.machine.rejects)
    assert len(rejects) == len(REJECT_REASONS)
    for key, reason in REJECT_REASONS.items():
        (name,) = [n for n in rejects if key in n]
        assert reason in rejects[name] or reason in name, (name, rejects[name])
    on_disk = shards.read_rejects(corpus.machine.root)
    assert sorted(on_disk) == sorted(corpus.machine.rejects)


def test_repairs_recorded_and_applied(corpus):
    sources = {os.path.basename(s["path"]): s for s in corpus.machine.manifest["sources"]}
    assert "resample 44100->16000" in sources["section_00_source_train_normal_0200_m-n_W.wav"]["repairs"]
    assert "downmix" in sources["section_00_source_train_normal_0200_m-n_W.wav"]["repairs"]
    assert "pad 2.00s->10.00s" in sources["section_00_source_train_normal_0201_m-n_W.wav"]["repairs"]
    assert "crop 11.00s->10.00s" in sources["section_00_source_train_normal_0100_m-n_W.wav"]["repairs"]
    assert sources["section_00_source_train_normal_0000_m-n_W.wav"]["repairs"] == ""
    assert all(len(s["sha1"]) == 40 for s in sources.values())


def test_zero_padding_by_default_and_content_hashes(raw_tree, corpus):
    root, _ = raw_tree
    assert shards.DecodeSettings().pad_mode == "zero"  # paper Sec. 4.2
    table = shards.read_table(corpus.machine.root)
    audio = shards.audio_matrix(table)
    paths = table.column("path").to_pylist()
    padded = [i for i, p in enumerate(paths) if p.endswith("0201_m-n_W.wav")][0]
    stored, _ = sf.read(paths[padded], dtype="float32")
    assert stored.shape == (32000,)
    np.testing.assert_array_equal(audio[padded, :32000], stored)
    assert not np.any(audio[padded, 32000:])
    # Every source carries the sha1 of its file bytes and of its decoded audio (the leakage guard's keys).
    rows = dict(zip(paths, audio))
    for s in corpus.machine.manifest["sources"]:
        with open(s["path"], "rb") as f:
            assert s["sha1"] == hashlib.sha1(f.read()).hexdigest()
        assert s["audio_sha1"] == hashlib.sha1(rows[s["path"]].tobytes()).hexdigest()
        assert s["machine"] == "fan" and s["split"] in ("train", "test") and s["noise_category"] == ""
    assert {s["noise_category"] for s in corpus.noise.manifest["sources"]} == {"running_tap", "dishes"}
    assert all(len(s["audio_sha1"]) == 40 for s in corpus.noise.manifest["sources"])


def test_repeat_padding_is_a_setting(raw_tree):
    root, _ = raw_tree
    path = root / "dev_data" / "raw" / "fan" / "train" / "section_00_source_train_normal_0201_m-n_W.wav"
    record = layouts.ClipRecord(path=str(path), kind="machine", dataset="dcase2021+", machine="fan", section="00",
                                domain="source", split="train", label="normal", attributes=(("m-n", "W"),),
                                class_name="fan_sec00_m-n_W")
    batch = pa.Table.from_pylist([shards._record_row(record)])
    stored, _ = sf.read(path, dtype="float32")
    repeat = shards.decode_batch(batch, shards.DecodeSettings(pad_mode="repeat"))
    np.testing.assert_array_equal(shards.audio_matrix(repeat)[0], np.tile(stored, 5))
    zero = shards.decode_batch(batch, shards.DecodeSettings())
    assert not np.any(shards.audio_matrix(zero)[0, 32000:])
    assert zero.column("sha1")[0] == repeat.column("sha1")[0]  # same file bytes
    assert zero.column("audio_sha1")[0] != repeat.column("audio_sha1")[0]  # other decoded audio
    with pytest.raises(ValueError, match="pad_mode='reflect'"):
        shards.DecodeSettings(pad_mode="reflect")


def test_shards_plain_pyarrow_and_bit_exact(raw_tree, corpus):
    root, good = raw_tree
    files = corpus.machine.files
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sum(rows) == 14 and max(rows) <= 4  # at most rows_per_shard = 4 rows per shard
    first = pq.read_table(files[0])
    field = first.schema.field("audio")  # one raw-sample value per clip, the sample type in the metadata
    assert field.type == pa.binary(160000 * 4) and field.metadata == {b"retain_asd.sample_dtype": b"float32"}
    assert shards.clip_samples(first.schema) == 160000
    audio_chunk = pq.ParquetFile(files[0]).metadata.row_group(0).column(first.schema.get_field_index("audio"))
    assert audio_chunk.compression == "UNCOMPRESSED" and audio_chunk.statistics is None
    table = shards.read_table(corpus.machine.root)
    audio = shards.audio_matrix(table)
    assert audio.shape == (14, 160000) and audio.dtype == np.float32
    paths = table.column("path").to_pylist()
    name = "section_00_source_test_anomaly_0000_m-n_W.wav"
    row = [i for i, p in enumerate(paths) if p.endswith(name)][0]
    expected, rate = sf.read(root / "dev_data" / "raw" / "fan" / "test" / name, dtype="float32")
    assert rate == 16000
    np.testing.assert_array_equal(audio[row], expected)
    labels = dict(zip(paths, table.column("label").to_pylist()))
    assert labels[str(root / "dev_data" / "raw" / "fan" / "test" / name)] == "anomaly"
    downmix = [i for i, p in enumerate(paths) if p.endswith("0202_m-n_W.wav")][0]
    clip0 = [i for i, p in enumerate(paths) if p.endswith("train_normal_0000_m-n_W.wav")][0]
    np.testing.assert_allclose(audio[downmix], 0.75 * audio[clip0], atol=2 / 32768)
    noise = shards.read_table(corpus.noise.root)
    lengths = [len(x) for x in shards.audio_list(noise)]
    assert sorted(lengths) == sorted(sf.info(p).frames for p in noise.column("path").to_pylist())


def test_labels_json(corpus):
    data = json.loads(corpus.labels_path.read_text())
    assert corpus.vocab.machine_classes == ("fan_sec00_m-n_W", "fan_sec00_m-n_X")
    assert corpus.vocab.noise_classes == ("noise_dishes", "noise_running_tap")
    assert corpus.vocab.num_classes == 4 and isinstance(data, dict)
    assert load_corpus(corpus.root).vocab == corpus.vocab


def test_rerun_is_noop_and_change_rebuilds(raw_tree, corpus, tmp_path):
    root, _ = raw_tree
    out = corpus.root
    mtimes = {p: p.stat().st_mtime_ns for p in corpus.machine.files}
    again = ingest(root / "dev_data" / "raw", root / "noise", out, rows_per_shard=4)
    assert not again.machine.rebuilt and not again.noise.rebuilt
    assert {p: p.stat().st_mtime_ns for p in again.machine.files} == mtimes
    # change one input: a fresh copy elsewhere so the module's tree stays as it was
    changed = tmp_path / "raw"
    shutil.copytree(root, changed)
    target = changed / "dev_data" / "raw" / "fan" / "train" / "section_00_source_train_normal_0000_m-n_W.wav"
    x, _ = sf.read(target, dtype="float32")
    write_audio(target, 0.5 * x)
    out2 = tmp_path / "corpus"
    first = ingest(changed / "dev_data" / "raw", changed / "noise", out2, rows_per_shard=4)
    assert first.machine.rebuilt
    write_audio(target, 0.25 * x)
    rebuilt = ingest(changed / "dev_data" / "raw", changed / "noise", out2, rows_per_shard=4)
    assert rebuilt.machine.rebuilt and not rebuilt.noise.rebuilt
    new_sha = {s["path"]: s["sha1"] for s in rebuilt.machine.manifest["sources"]}[str(target)]
    old_sha = {s["path"]: s["sha1"] for s in first.machine.manifest["sources"]}[str(target)]
    assert new_sha != old_sha
    assert not list(out2.glob(".*tmp-*")) and not list(out2.glob(".*old-*"))


def test_a_copy_ingested_elsewhere_gives_the_same_shards_in_the_same_order(raw_tree, corpus, tmp_path):
    """The training stream reads the shards in manifest order: the same files ingested from another folder
    into another folder hold the same clips in the same order, shard by shard and row by row."""
    root, _ = raw_tree
    copy = tmp_path / "another" / "place"
    shutil.copytree(root, copy)
    other = ingest(copy / "dev_data" / "raw", copy / "noise", tmp_path / "elsewhere", rows_per_shard=4)

    def in_order(shard_set):
        return [pq.read_table(f, columns=["clip_id"]).column(0).to_pylist() for f in shard_set.files]

    assert len(in_order(corpus.machine)) > 1 and in_order(other.machine) == in_order(corpus.machine)  # row by row
    assert [f.name.split("-")[1] for f in other.machine.files] == [f.name.split("-")[1] for f in corpus.machine.files]
    assert in_order(other.noise) == in_order(corpus.noise)
