"""`retain-asd score bank|clips` on real DCASE 2020 clips (../shared/data): structure and determinism.

With random weights the anomaly is not guaranteed to score higher, so only the contract is checked.
"""

from __future__ import annotations

import csv

import pytest
import torch

from pipelines.score import main
from retain_asd.eval.knn import MemoryBank
from retain_asd.models.beats import beats_tiny, write_random_checkpoint


@pytest.fixture
def folders(shared_data, tmp_path):
    """20 normal train clips as the bank; 3 held-out normals + the anomaly + one broken file to score."""
    train = sorted((shared_data / "machine/dcase2020t2_dev_id00/train").glob("*.wav"))
    normal, clips = tmp_path / "normal", tmp_path / "clips"
    normal.mkdir()
    clips.mkdir()
    for p in train[:20]:
        (normal / p.name).symlink_to(p)
    for p in train[20:23] + [shared_data / "machine/dcase2020t2_dev_id00/test/anomaly_id_00_00000000.wav"]:
        (clips / p.name).symlink_to(p)
    (clips / "broken.wav").write_bytes(b"RIFF not really a wav")
    ckpt = write_random_checkpoint(tmp_path / "ckpt.pt", beats_tiny(), seed=0)
    return normal, clips, ckpt, [p.name for p in train[:20]]


def test_bank_and_clips_round_trip(folders, tmp_path, capsys):
    normal, clips, ckpt, names = folders
    bank_path = tmp_path / "bank.pt"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(normal), "--out", str(bank_path),
                 "--layer", "2"]) == 0
    bank = MemoryBank.load(bank_path)
    assert bank.source.shape == (20, 8 * beats_tiny().encoder_embed_dim)
    assert bank.meta["files"] == names and bank.meta["layer"] == 2 and bank.meta["pooling"] == "genrep"
    assert len(bank.meta["checkpoint_hash"]) == 40 and bank.meta["threshold"] > 0

    out = tmp_path / "scores.csv"
    assert main(["clips", "--bank", str(bank_path), "--clips", str(clips), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.wav" in err  # reported per file, not a crash
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "score", "decision", "status", "source_rate_hz", "source_s", "repairs"]
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in clips.iterdir() if p.name != "broken.wav")
    for _, score, decision, status, rate_hz, source_s, repairs in rows[1:]:
        assert int(decision) == int(float(score) > bank.meta["threshold"])
        assert (status, rate_hz, source_s, repairs) == ("ok", "16000", "10.00", "")
    assert main(["clips", "--bank", str(bank_path), "--clips", str(clips), "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "b.csv").read_text() == out.read_text()  # deterministic


def test_clips_refuse_a_different_checkpoint(folders, tmp_path, capsys):
    normal, clips, ckpt, _ = folders
    bank_path = tmp_path / "bank.pt"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(normal), "--out", str(bank_path),
                 "--layer", "1"]) == 0
    other = write_random_checkpoint(tmp_path / "other.pt", beats_tiny(), seed=1)
    assert main(["clips", "--bank", str(bank_path), "--clips", str(clips), "--checkpoint", str(other)]) == 2
    assert "weights differ" in capsys.readouterr().err
    assert torch.equal(MemoryBank.load(bank_path).source, MemoryBank.load(bank_path).target)


# ------------------------------------------------------------------------------------------------ as a user meets it
@pytest.fixture(scope="module")
def machine(shared_data, tmp_path_factory):
    """A DCASE-style machine folder from real clips: train/ with 8 normals; test/ with the real anomaly and a
    held-out normal. Plus a tiny random BEATs checkpoint (3 layers)."""
    root = tmp_path_factory.mktemp("score_machine")
    src = shared_data / "machine/dcase2020t2_dev_id00"
    train = sorted((src / "train").glob("*.wav"))
    (root / "id_00/train").mkdir(parents=True)
    (root / "id_00/test").mkdir()
    for p in train[:8]:
        (root / "id_00/train" / p.name).symlink_to(p)
    (root / "id_00/test/anomaly_id_00_00000000.wav").symlink_to(src / "test/anomaly_id_00_00000000.wav")
    (root / "id_00/test" / train[8].name).symlink_to(train[8])
    ckpt = write_random_checkpoint(root / "ckpt.pt", beats_tiny(), seed=0)
    return root, ckpt, [p.name for p in train]


@pytest.fixture(scope="module")
def machine_bank(machine):
    """The bank of the machine folder, built once by the command (default layer: the checkpoint's last, 3)."""
    root, ckpt, _ = machine
    path = root / "bank.pt"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(root / "id_00"), "--out", str(path)]) == 0
    return path


def test_a_bank_of_a_machine_folder_holds_only_its_normal_train_clips(machine, tmp_path, capsys):
    root, ckpt, names = machine
    folder = root / "id_00"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(folder), "--out", str(tmp_path / "b.pt")]) == 0
    out = capsys.readouterr().out
    bank = MemoryBank.load(tmp_path / "b.pt")
    assert bank.meta["files"] == [f"train/{n}" for n in names[:8]] and bank.source.shape[0] == 8
    assert f"read {folder / 'train'}: 8 audio file(s)" in out
    assert f"not read: {folder / 'test'} (2 audio file(s)" in out
    # eval.layer 6 does not fit the 3-layer checkpoint: its last layer, said on the console
    assert bank.meta["layer"] == 3 and "eval.layer 6 is beyond the 3 layers" in out and "--layer" in out
    assert "8 references, layer 3, threshold" in out and "90th percentile" in out
    # The anomaly is no reference: it is not its own nearest neighbour (an old bank scored it 0).
    assert main(["clips", "--bank", str(tmp_path / "b.pt"), "--clips", str(folder / "test")]) == 0
    rows = dict(line.split(",")[:2] for line in capsys.readouterr().out.splitlines() if line.endswith(",")
                or ",ok," in line)
    assert float(rows["anomaly_id_00_00000000.wav"]) > 0 and float(rows[names[8]]) > 0

    # a flat folder with files named as anomalies (2020 and 2021+ names): skipped and counted; the file given
    # explicitly: refused
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((folder / "train").iterdir()) + [folder / "test/anomaly_id_00_00000000.wav"]:
        (flat / p.name).symlink_to(p.resolve())
    (flat / "section_00_target_test_anomaly_0000.wav").symlink_to((folder / "test" / names[8]).resolve())  # 2021+
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(flat), "--out", str(tmp_path / "f.pt"),
                 "--layer", "2", "--percentile", "95"]) == 0
    out = capsys.readouterr().out
    assert ("skipped 2 file(s) named anomaly_* / *_anomaly_* (a bank holds normal clips only): "
            "anomaly_id_00_00000000.wav, section_00_target_test_anomaly_0000.wav") in out
    flat_bank = MemoryBank.load(tmp_path / "f.pt")
    assert len(flat_bank.meta["files"]) == 8 and flat_bank.meta["percentile"] == 95.0
    anomaly = folder / "test/anomaly_id_00_00000000.wav"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(flat), "--normal", str(anomaly),
                 "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{anomaly}: named anomaly_*" in err and "--normal" in err and not (tmp_path / "x.pt").exists()


def test_bank_options_layer_percentile_and_config(machine, tmp_path, capsys):
    root, ckpt, _ = machine
    train = root / "id_00/train"
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(train), "--out", str(tmp_path / "b.pt"),
                 "--layer", "7"]) == 2
    assert f"--layer = 7: must be in 1..3: {ckpt} has 3 encoder layers" in capsys.readouterr().err
    thresholds = {}
    for pct in (50, 99):
        assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(train), "--out", str(tmp_path / f"{pct}.pt"),
                     "--preset", "smoke", "eval.layer=2", "--percentile", str(pct)]) == 0
        meta = MemoryBank.load(tmp_path / f"{pct}.pt").meta
        assert meta["layer"] == 2 and meta["policy"]["min_clip_s"] == 1.0
        thresholds[pct] = meta["threshold"]
    assert thresholds[50] < thresholds[99]
    capsys.readouterr()
    # a config setting the skip message names can be passed: every 10 s clip is now too short
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(train), "--out", str(tmp_path / "s.pt"),
                 "data.clip_s=12", "data.min_clip_s=10.5"]) == 2
    err = capsys.readouterr().err
    assert "too short: 10.00s < min_clip_s=10.50s" in err and "0 readable normal clips" in err
    assert main(["bank", "--checkpoint", str(ckpt), "--normal", str(train), "--out", str(tmp_path / "s.pt"),
                 "data.min_clip_s=oops"]) == 2
    assert "data.min_clip_s = 'oops'" in capsys.readouterr().err


def test_clips_report_what_reading_changed_and_flag_a_dead_microphone(machine, machine_bank, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from retain_asd.audio import resample

    root, _, names = machine
    bank_path = machine_bank
    threshold = MemoryBank.load(bank_path).meta["threshold"]
    clips = tmp_path / "clips"
    normal = root / "id_00/test" / names[8]
    x, rate_hz = sf.read(normal, dtype="float32")
    for section in ("sec00", "sec01"):  # the same file name in two sections
        (clips / section).mkdir(parents=True)
        (clips / section / "clip.wav").symlink_to(normal.resolve())
    sf.write(clips / "sec01/loud_44k.wav", resample(x, rate_hz, 44100), 44100)
    sf.write(clips / "sec01/long.wav", np.concatenate([x, x, x]), rate_hz)  # 30 s
    sf.write(clips / "sec01/dead_mic.wav", np.zeros_like(x), rate_hz)
    (clips / "sec01/broken.wav").write_bytes(b"RIFF not really a wav")
    capsys.readouterr()
    out_csv = tmp_path / "s.csv"
    assert main(["clips", "--bank", str(bank_path), "--clips", str(clips), "--out", str(out_csv)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"bank {bank_path}: 8 references, layer 3, threshold {threshold:.6g}"
    assert lines[1] == "file,score,decision,status,source_rate_hz,source_s,repairs"
    rows = {r["file"]: r for r in csv.DictReader(out_csv.open())}
    assert sorted(rows) == ["sec00/clip.wav", "sec01/clip.wav", "sec01/dead_mic.wav", "sec01/long.wav",
                            "sec01/loud_44k.wav"]
    assert rows["sec00/clip.wav"]["score"] == rows["sec01/clip.wav"]["score"]  # the same audio, two rows
    assert (rows["sec01/loud_44k.wav"]["source_rate_hz"], rows["sec01/loud_44k.wav"]["repairs"]) == \
        ("44100", "resample 44100->16000")
    assert (rows["sec01/long.wav"]["source_s"], rows["sec01/long.wav"]["repairs"]) == ("30.00", "crop 30.00s->10.00s")
    dead = rows["sec01/dead_mic.wav"]
    assert (dead["status"], dead["decision"]) == ("silent", "1") and np.isfinite(float(dead["score"]))
    flagged = sum(int(r["decision"]) for r in rows.values())
    assert lines[-1] == (f"5 clips scored, {flagged} flagged (score > {threshold:.6g}, or silent: 1); 1 cropped, "
                         f"1 resampled; 1 skipped (unreadable 1); written to {out_csv}")
    assert f"skipped {clips / 'sec01/broken.wav'}: unreadable" in captured.err


def test_clips_that_score_nothing_exit_2_with_the_reasons(machine_bank, tmp_path, capsys):
    bank_path = machine_bank
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "a.wav").write_bytes(b"RIFF not really a wav")
    (broken / "b.wav").write_bytes(b"")
    capsys.readouterr()
    assert main(["clips", "--bank", str(bank_path), "--clips", str(empty), "--out", str(tmp_path / "e.csv")]) == 2
    assert f"0 clips scored in {empty}: no .wav / .flac files there" in capsys.readouterr().err
    assert main(["clips", "--bank", str(bank_path), "--clips", str(broken), "--out", str(tmp_path / "e.csv")]) == 2
    err = capsys.readouterr().err
    assert f"0 clips scored in {broken}: 2 file(s) skipped (empty 1, unreadable 1)" in err
    assert not (tmp_path / "e.csv").exists()


def test_a_bank_of_a_registered_student_is_the_bank_of_its_file(machine, machine_bank, tmp_path, capsys):
    """`score bank --checkpoint models:/NAME@ALIAS` embeds with the registered file; `score clips` fetches it again
    when its cached copy is gone."""
    import shutil

    from retain_asd import tracking

    root, ckpt, names = machine
    work = tmp_path / "work"
    uri = tracking.resolve_tracking_uri("", work)
    with tracking.mlflow_run(uri, "x-sweep", "pretrain-x-seed0") as run:
        pass
    registered = tracking.register_student(uri, "x", run.info.run_id, ckpt, alias="best")
    config = [f"data.work_dir={work}"]  # the registry: <data.work_dir>/mlflow.db
    bank_path = tmp_path / "bank.pt"
    assert main(["bank", "--checkpoint", "models:/retain-asd-x@best", "--normal", str(root / "id_00"),
                 "--out", str(bank_path), "--layer", "3", *config]) == 0
    assert "8 references embedded by models:/retain-asd-x/1, layer 3" in capsys.readouterr().out
    bank, by_file = MemoryBank.load(bank_path), MemoryBank.load(machine_bank)
    assert torch.equal(bank.source, by_file.source)
    assert (bank.meta["checkpoint_hash"], bank.meta["threshold"]) == (by_file.meta["checkpoint_hash"],
                                                                      by_file.meta["threshold"])
    assert bank.meta["model_uri"] == registered.uri
    assert bank.meta["checkpoint"] == str(work / "checkpoints" / "models" / "retain-asd-x" / "1" / "ckpt.pt")
    shutil.rmtree(work / "checkpoints")
    clip = root / "id_00" / "test" / names[8]
    assert main(["clips", "--bank", str(bank_path), "--clips", str(clip), *config]) == 0
    assert main(["clips", "--bank", str(machine_bank), "--clips", str(clip)]) == 0
    scored = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{names[8]},")]
    assert len(scored) == 2 and scored[0] == scored[1]
    assert main(["bank", "--checkpoint", "models:/retain-asd-x/2", "--normal", str(root / "id_00"),
                 "--out", str(tmp_path / "b2.pt"), *config]) == 2
    assert "has no version 2; its versions: 1; its aliases: @best" in capsys.readouterr().err
