"""Audio reading policy and the errors for unusable files, on real files written with soundfile."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as F

from retain_asd.audio import (
    CLIP_S,
    SAMPLE_RATE_HZ,
    AudioError,
    fix_length,
    load_clip,
    read_audio,
    validate_waveform,
    write_audio,
)

# ../shared/data relative to the project root (read-only; never copied into the repo).
REAL_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/machine/dcase2020t2_dev_id00/train"


def _tone(num_samples, rate_hz=16000, freq_hz=440.0, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(num_samples) / rate_hz)).astype(np.float32)


def _write(path, x, rate_hz=16000, subtype="PCM_16"):
    sf.write(path, x, rate_hz, subtype=subtype)
    return path


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("wav", "FLOAT")])
def test_16k_mono_10s_is_read_unchanged(tmp_path, ext, subtype):
    x = _tone(160000)
    path = _write(tmp_path / f"a.{ext}", x, subtype=subtype)
    clip = load_clip(path)
    expected, _ = sf.read(path, dtype="float32")
    assert clip.samples.dtype == np.float32 and clip.samples.shape == (160000,)
    np.testing.assert_array_equal(clip.samples, expected)
    assert clip.repairs == ()
    assert (clip.sample_rate_hz, clip.source_rate_hz, clip.source_channels, clip.source_num_samples) == (
        16000,
        16000,
        1,
        160000,
    )
    np.testing.assert_array_equal(read_audio(path), clip.samples)


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    rate_hz = 44100
    left = _tone(rate_hz * 10, rate_hz, 440.0, 0.5)
    right = _tone(rate_hz * 10, rate_hz, 1000.0, 0.25)
    path = _write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), rate_hz)
    clip = load_clip(path)

    assert clip.samples.shape == (160000,) and clip.samples.dtype == np.float32
    assert clip.repairs == ("downmix", "resample 44100->16000")
    assert (clip.source_rate_hz, clip.source_channels, clip.source_num_samples) == (44100, 2, 441000)
    # Reference: mean of the channels as stored, then torchaudio's resampler.
    stored, _ = sf.read(path, dtype="float32")
    reference = F.resample(torch.from_numpy(stored.mean(axis=1, dtype=np.float32)), 44100, 16000).numpy()
    np.testing.assert_allclose(clip.samples, reference[:160000], atol=1e-6)


def test_stereo_channel_selection(tmp_path):
    left, right = _tone(32000, freq_hz=300.0), _tone(32000, freq_hz=700.0, amplitude=0.2)
    path = _write(tmp_path / "nearfar.wav", np.stack([left, right], axis=1))
    stored, _ = sf.read(path, dtype="float32")
    clip = load_clip(path, channel=1, clip_s=None)
    np.testing.assert_array_equal(clip.samples, stored[:, 1])
    assert clip.repairs == ("channel 1",)
    np.testing.assert_array_equal(read_audio(path, channel=0, clip_s=None), stored[:, 0])
    with pytest.raises(AudioError, match=r"nearfar\.wav: channel: channel 2 requested, file has 2"):
        load_clip(path, channel=2)


def test_short_clip_is_padded_and_recorded(tmp_path):
    x = _tone(32000)
    path = _write(tmp_path / "short.wav", x)
    stored, _ = sf.read(path, dtype="float32")

    clip = load_clip(path)
    assert clip.repairs == ("pad 2.00s->10.00s",)
    assert clip.samples.shape == (160000,)
    # Zero padding by default (paper Sec. 4.2); repeat padding on request.
    np.testing.assert_array_equal(clip.samples[:32000], stored)
    assert not np.any(clip.samples[32000:])

    repeat = load_clip(path, pad_mode="repeat").samples
    np.testing.assert_array_equal(repeat, np.tile(stored, 5))


def test_long_clip_is_cropped_from_the_start(tmp_path):
    path = _write(tmp_path / "long.wav", _tone(176000))
    stored, _ = sf.read(path, dtype="float32")
    clip = load_clip(path)
    assert clip.repairs == ("crop 11.00s->10.00s",)
    np.testing.assert_array_equal(clip.samples, stored[:160000])
    full = load_clip(path, clip_s=None)
    assert full.repairs == () and full.samples.shape == (176000,)


def test_too_short_is_an_error(tmp_path):
    path = _write(tmp_path / "blip.wav", _tone(8000))
    with pytest.raises(AudioError, match=r"blip\.wav: too short: 0.50s < min_clip_s=1.00s"):
        read_audio(path)
    assert read_audio(path, min_clip_s=0.25).shape == (160000,)


def _assert_audio_error(path, reason_prefix, **kwargs):
    with pytest.raises(AudioError) as info:
        load_clip(path, **kwargs)
    err = info.value
    assert err.path == str(path)
    assert err.reason.startswith(reason_prefix), err.reason
    assert str(err).startswith(f"{path}: {reason_prefix}")
    assert str(err).endswith(")")  # a fix hint follows the reason
    return err


def test_missing_file(tmp_path):
    _assert_audio_error(tmp_path / "nope.wav", "not found")


def test_empty_file_zero_bytes(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _assert_audio_error(path, "empty: 0 bytes")


def test_empty_file_zero_frames(tmp_path):
    path = _write(tmp_path / "noframes.wav", np.zeros(0, dtype=np.float32))
    assert os.path.getsize(path) > 0  # a valid header, no data
    _assert_audio_error(path, "empty: 0 frames")


def test_corrupt_header(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _assert_audio_error(path, "unreadable")


def test_truncated_wav(tmp_path):
    # libsndfile reads a cut-short WAV without complaint and reports the frames actually present
    # (here 10999 instead of 16000); only its log shows the data chunk size mismatch.
    path = _write(tmp_path / "full.wav", _tone(16000))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(path.read_bytes()[:-10001])
    assert sf.info(cut).frames == 10999
    err = _assert_audio_error(cut, "truncated")
    assert "header declares 32000 data bytes, file holds 21999" in err.reason


def test_truncated_flac(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32)
    path = _write(tmp_path / "full.flac", x)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    # The header is intact, the decoder fails mid-stream ("flac decoder lost sync").
    _assert_audio_error(cut, "corrupt")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = _tone(160000)
    x[1234] = bad
    path = _write(tmp_path / "nan.wav", x, subtype="FLOAT")
    err = _assert_audio_error(path, "non-finite")
    assert "1 of 160000 samples" in err.reason


def test_all_zero(tmp_path):
    path = _write(tmp_path / "silent.wav", np.zeros(160000, dtype=np.float32))
    _assert_audio_error(path, "silent")


def test_audio_error_is_a_value_error_and_pickles():
    err = AudioError("/x/a.wav", "silent: all 3 samples are zero", "drop the file")
    assert isinstance(err, ValueError)
    assert str(err) == "/x/a.wav: silent: all 3 samples are zero (drop the file)"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_validate_waveform_on_arrays():
    x = np.array([0.0, 0.1, -0.2], dtype=np.float32)
    assert validate_waveform(x) is x
    with pytest.raises(AudioError, match=r"^<array>: empty"):
        validate_waveform(np.zeros(0))
    with pytest.raises(AudioError, match=r"^clip7: non-finite: 1 of 3"):
        validate_waveform(np.array([0.0, np.nan, 1.0]), "clip7")
    with pytest.raises(AudioError, match=r"silent"):
        validate_waveform(np.zeros(5))


def test_fix_length():
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(fix_length(x, 7, "repeat"), [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(fix_length(x, 5, "zero"), [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(fix_length(x, 5), [1, 2, 3, 0, 0])  # zero by default (paper Sec. 4.2)
    np.testing.assert_array_equal(fix_length(x, 2), [1, 2])
    assert fix_length(x, 5).dtype == np.float32
    with pytest.raises(ValueError, match="pad_mode"):
        fix_length(x, 5, "reflect")


def test_write_audio_round_trip_and_atomic(tmp_path):
    x = _tone(16000)
    path = tmp_path / "out.wav"
    write_audio(path, x)
    y, rate_hz = sf.read(path, dtype="float32")
    assert rate_hz == SAMPLE_RATE_HZ
    np.testing.assert_allclose(y, x, atol=1 / 32768)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temp file left
    with pytest.raises(ValueError, match=r"exceed \[-1, 1\]"):
        write_audio(tmp_path / "loud.wav", x * 3)
    assert not (tmp_path / "loud.wav").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
    write_audio(tmp_path / "f.flac", x)
    assert sf.info(tmp_path / "f.flac").format == "FLAC"


def test_real_dcase_clip_round_trips_unchanged():
    if not REAL_TRAIN.is_dir():
        pytest.skip(f"real DCASE 2020 clips not found at {REAL_TRAIN}")
    path = sorted(REAL_TRAIN.glob("*.wav"))[0]
    expected, rate_hz = sf.read(path, dtype="float32")
    assert rate_hz == 16000 and expected.shape == (int(CLIP_S * 16000),)
    clip = load_clip(path)
    assert clip.repairs == ()
    np.testing.assert_array_equal(clip.samples, expected)  # bit-exact
