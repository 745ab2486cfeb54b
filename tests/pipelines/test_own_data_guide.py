"""docs/your-own-data.md cannot drift: its `score` commands (and the refused one-machine `ingest`) are run here on
the same folder layout, built from the real DCASE clips of ../shared/data, and each printed line must be one the
guide quotes, numbers aside (the guide's come from the demo's student; this test uses a tiny random encoder at
the demo's checkpoint path and 10 of the 70 train clips). The full `ingest` (2 min) is the one command not run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs/your-own-data.md"
CHECKPOINT = "runs/demo/rows/tagging_mixture/seed0/pretrain/student_beats.pt"


def guide_commands() -> list[tuple[str, list[str], int]]:
    """(command, the lines the guide quotes after it, its exit code) for each `$ retain-asd` of a console block."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", GUIDE.read_text(), re.S):
        for item in re.split(r"(?m)^(?=\$ retain-asd )", block):
            if not item.startswith("$ retain-asd "):
                continue
            head, *lines = item.rstrip("\n").splitlines()
            code = 0
            if lines[-2:-1] == ["$ echo $?"]:
                code, lines = int(lines[-1]), lines[:-2]
            out.append((head[len("$ retain-asd "):], lines, code))
    return out


def _masked(lines) -> list[str]:
    return sorted(re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line) for line in lines)


def build_folders(root: Path, data: Path, train_clips: int) -> None:
    """The guide's layout from the real clips: my_data/fan/{train,test}, my_noise, new_recordings."""
    import soundfile as sf

    from retain_asd.audio import resample
    from retain_asd.models.beats import beats_tiny, write_random_checkpoint

    src = data / "machine/dcase2020t2_dev_id00"
    train = sorted((src / "train").glob("*.wav"))
    anomaly = src / "test/anomaly_id_00_00000000.wav"
    fan = root / "my_data/fan"
    (fan / "train").mkdir(parents=True)
    (fan / "test").mkdir()
    for p in train[:train_clips]:
        (fan / "train" / p.name).symlink_to(p)
    for p in [*train[70:74], anomaly]:
        (fan / "test" / p.name).symlink_to(p)
    new = root / "new_recordings"
    (new / "line1").mkdir(parents=True)
    (new / "line2").mkdir()
    (new / "line1/pump.wav").symlink_to(train[74])
    (new / "line2/pump.wav").symlink_to(anomaly)
    x, rate_hz = sf.read(train[74], dtype="float32")
    sf.write(new / "line2/phone_44k.wav", resample(x, rate_hz, 44100), 44100)
    sf.write(new / "line2/long_30s.wav", np.concatenate([x, x, x]), rate_hz)
    sf.write(new / "line2/dead_mic.wav", np.zeros_like(x), rate_hz)
    (new / "line2/cut.wav").write_bytes(b"RIFF" + b"\0" * 40)
    (root / "empty_folder").mkdir()
    (root / CHECKPOINT).parent.mkdir(parents=True)
    write_random_checkpoint(root / CHECKPOINT, beats_tiny(), seed=0)


def test_the_guide_quotes_what_the_commands_print(shared_data, tmp_path, monkeypatch, capfd):
    from pipelines.cli import main

    build_folders(tmp_path, shared_data, train_clips=10)
    monkeypatch.chdir(tmp_path)
    commands = guide_commands()
    ran = 0
    for command, expected, code in commands:
        argv = shlex.split(command)
        if argv[0] == "ingest" and code == 0:
            continue  # the full ingest: 2 min, see the module docstring
        capfd.readouterr()
        assert main(argv) == code, command
        said = capfd.readouterr()
        printed = [line.replace(f"{tmp_path}/", ".../") for line in (said.out + said.err).splitlines()]
        assert _masked(printed) == _masked(expected), f"$ retain-asd {command}"
        ran += 1
    assert ran == 6 and sum(c == 0 for _, _, c in commands) == 4
