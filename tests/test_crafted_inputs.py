"""Input that claims more than it holds is refused before memory is allocated, naming the file: a WAV whose header
claims hours, FLAC bombs (a few KB that decode to an hour or more: length in the header, or left unknown), and a
checkpoint whose records inflate to far more than the file's size.

The files are made here, by hand (a FLAC stream of CONSTANT subframes, a zip with a deflated record), and each is
opened in one fresh child process that reports the time and the peak-memory growth of each attempt.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- crafted files
def _wav_claiming(path: Path, hours: float, rate_hz: int = 16000) -> Path:
    """A 16-bit mono WAV of 0.05 s whose RIFF and data chunk sizes claim `hours` of audio."""
    data = struct.pack("<800h", *([1000, -1000] * 400))
    claimed = int(hours * 3600 * rate_hz) * 2
    fmt = struct.pack("<HHIIHH", 1, 1, rate_hz, rate_hz * 2, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", claimed) + data)
    return path


def _crc(data: bytes, poly: int, bits: int) -> int:
    crc, top, mask = 0, 1 << (bits - 1), (1 << bits) - 1
    for byte in data:
        crc ^= byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's UTF-8-like coding of a frame number (< 2^16 here)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def _flac_bomb(path: Path, *, frames: int, rate_hz: int, channels: int, declare_length: bool) -> Path:
    """A FLAC stream of `frames` blocks of 65535 samples per channel, each a CONSTANT subframe (3 bytes): a few KB
    that decode to frames x 65535 samples per channel. STREAMINFO gives the true length, or 0 (unknown)."""
    block, value = 65535, 1000
    total = frames * block if declare_length else 0
    info = block << 128 | block << 112 | rate_hz << 44 | (channels - 1) << 41 | 15 << 36 | total  # 144 bits
    streaminfo = info.to_bytes(18, "big") + bytes(16)  # min/max block, frame sizes 0, rate, ch, 16 bit, total; MD5 0
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]) + streaminfo)  # the last (only) metadata block
    for n in range(frames):
        header = bytes([0xFF, 0xF8, 0x70, (channels - 1) << 4 | 0b100 << 1]) + _utf8_number(n) + \
            struct.pack(">H", block - 1)
        header += bytes([_crc(header, 0x07, 8)])
        frame = header + (b"\x00" + struct.pack(">h", value)) * channels
        out += frame + struct.pack(">H", _crc(frame, 0x8005, 16))
    path.write_bytes(bytes(out))
    return path


def _zip(path: Path, records: list[tuple[str, bytes, int, int, int]]) -> None:
    """A plain zip of (name, bytes as stored, method, crc32, unpacked size) records."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in records:
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(out)) + \
            name.encode()
        out += b"PK\x03\x04" + fields + name.encode() + data
    end = struct.pack("<HHHHIIH", 0, 0, len(records), len(records), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + b"PK\x05\x06" + end))


def _inflating_checkpoint(path: Path, mib: int = 256) -> Path:
    """A torch zip checkpoint {"w": float32 tensor of `mib` MiB} whose data record is deflated (about 1/1000 of
    that on disk); torch.load inflates and allocates all of it. The deflate stream repeats one fully flushed
    block of zeros, so making it costs little."""
    import torch

    numel, small, chunk = mib * 2**18, 123457, bytes(1 << 24)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(small)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    assert packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH) == block  # the stream repeats
    repeats = numel * 4 // len(chunk)
    crc = 0
    for _ in range(repeats):
        crc = zlib.crc32(chunk, crc)
    records = []
    for info in src.infolist():
        data = src.read(info.filename)
        if info.filename.endswith("data.pkl"):  # numel and size of the one tensor
            data = data.replace(struct.pack("<i", small), struct.pack("<i", numel))
        if info.filename.endswith("/data/0"):
            records.append((info.filename, block * repeats + packer.flush(), zipfile.ZIP_DEFLATED, crc,
                            numel * 4))
        else:
            records.append((info.filename, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    _zip(path, records)
    return path


# ---------------------------------------------------------------------------------------------------- the attempts
PROBE = r"""
import json, resource, sys, time
from retain_asd import fsio
from retain_asd.audio import load_clip
from retain_asd.models.beats import load_beats

out = {}
for name, kind, path in json.loads(sys.argv[1]):
    load = {"audio": load_clip, "beats": load_beats, "state": fsio.load_torch}[kind]
    before, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    try:
        load(path)
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    out[name] = {"error": error, "seconds": time.monotonic() - t,
                 "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def attempts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("crafted")
    files = {
        "wav claiming 10 h": ("audio", _wav_claiming(tmp / "claims_10h.wav", hours=10)),
        "flac bomb, length in header": ("audio", _flac_bomb(tmp / "bomb_68min_8ch.flac", frames=1000, rate_hz=16000,
                                                            channels=8, declare_length=True)),
        "flac bomb, length unknown": ("audio", _flac_bomb(tmp / "bomb_unknown.flac", frames=60, rate_hz=1000,
                                                          channels=1, declare_length=False)),
        "inflating checkpoint (model)": ("beats", _inflating_checkpoint(tmp / "inflating.pt")),
        "inflating checkpoint (train state)": ("state", tmp / "inflating.pt"),
    }
    for name, (_, path) in files.items():
        assert path.stat().st_size < 2 * 2**20, name  # small files, all of them
    spec = [[name, kind, str(path)] for name, (kind, path) in files.items()]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: {**result[name], "path": str(files[name][1])} for name in files}


@pytest.mark.reliability("crafted-input")
@pytest.mark.parametrize("name, reason", [
    ("wav claiming 10 h", "truncated: header declares 1152000000 data bytes"),
    ("flac bomb, length in header", "too long: header declares 1.1 h of audio"),
    ("flac bomb, length unknown", "too long: decodes to more than 3600 s (max_source_s) from 822 bytes"),
    ("inflating checkpoint (model)", "refused before loading: holds compressed records"),
    ("inflating checkpoint (train state)", "holds compressed records (archive/data/0) that unpack to 256 MiB"),
])
def test_input_that_claims_more_than_it_holds_is_refused_before_memory_is_allocated(attempts, name, reason,
                                                                                   reliability_figures):
    a = attempts[name]
    assert a["error"] is not None, f"{name}: loaded"
    assert a["error"].split(":")[0] in ("AudioError", "BEATsCheckpointError", "CorruptFileError"), a["error"]
    assert f"{a['path']}: " in a["error"] and reason in a["error"], a["error"]
    assert "\n" not in a["error"]
    assert a["seconds"] < 2.0, a
    assert a["growth_mb"] < 200, a
    reliability_figures(wall_added_s=a["seconds"], bytes_lost=0)


def test_the_bombs_are_real(tmp_path):
    """What the refused files would have cost: the unknown-length bomb of 822 bytes decodes to over an hour; the
    checkpoint inflates to 256 MiB (read from its zip directory, not loaded)."""
    import soundfile as sf

    bomb = _flac_bomb(tmp_path / "b.flac", frames=60, rate_hz=1000, channels=1, declare_length=False)
    with sf.SoundFile(bomb) as f:
        hour = f.read(3601 * 1000, dtype="int16")  # more than an hour at 1 kHz, every sample decoded
    assert hour.shape == (3601 * 1000,) and (hour == 1000).all()
    assert bomb.stat().st_size < 1000
    with zipfile.ZipFile(_inflating_checkpoint(tmp_path / "c.pt")) as z:
        assert sum(i.file_size for i in z.infolist()) > 256 * 2**20
