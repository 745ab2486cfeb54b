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
    assert rows[0] == ["file", "score", "decision"]
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in clips.iterdir() if p.name != "broken.wav")
    for _, score, decision in rows[1:]:
        assert int(decision) == int(float(score) > bank.meta["threshold"])
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
