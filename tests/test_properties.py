"""Property tests: whatever bytes a file holds and whatever arrays reach the mixer, the only exceptions are the
documented ones (AudioError for audio files, MixingError for the mixer), never a crash of a library below."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retain_asd.audio import AudioError, load_clip
from retain_asd.mixing import MixingError, mix_at_snr, mix_batch_at_snr

pytestmark = pytest.mark.reliability("property")


def _valid_wav(seconds: float = 0.2, rate: int = 8000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, 0.5 * np.sin(2 * np.pi * 440 * t), rate, subtype=subtype, format="WAV")
    return buf.getvalue()


VALID_WAV = _valid_wav()

# Raw bytes; a real WAV header followed by junk; a real WAV with bytes flipped or cut short.
file_bytes = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=1024).map(lambda b: VALID_WAV[:44] + b),
    st.tuples(st.integers(0, len(VALID_WAV) - 1), st.integers(0, 255)).map(
        lambda p: VALID_WAV[:p[0]] + bytes([p[1]]) + VALID_WAV[p[0] + 1:]),
    st.integers(0, len(VALID_WAV)).map(lambda n: VALID_WAV[:n]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=file_bytes, suffix=st.sampled_from([".wav", ".flac", ".WAV"]), clip_s=st.sampled_from([None, 0.1, 1.0]))
def test_audio_reader_raises_only_audio_error(data, suffix, clip_s):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip{suffix}"
        path.write_bytes(data)
        try:
            clip = load_clip(path, sample_rate_hz=16000, clip_s=clip_s, min_clip_s=0.01)
        except AudioError as err:
            assert str(path) in str(err)  # the error names the file
            return
        assert clip.samples.dtype == np.float32 and np.isfinite(clip.samples).all()
        if clip_s is not None:
            assert clip.samples.shape == (int(round(clip_s * 16000)),)



def _elements(dtype):
    if np.dtype(dtype).kind == "i":
        return st.integers(-32768, 32767)
    return st.floats(allow_nan=True, allow_infinity=True, width=32)


any_array = st.sampled_from([np.float32, np.float64, np.int16]).flatmap(
    lambda dt: hnp.arrays(dt, st.integers(0, 48), elements=_elements(dt)))
snrs = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-60, 60)


@settings(max_examples=300, deadline=None)
@given(clean=any_array, noise=any_array, snr_db=snrs)
def test_mixer_raises_only_mixing_error(clean, noise, snr_db):
    try:
        m = mix_at_snr(clean, noise, snr_db)
    except MixingError:
        return
    assert np.isfinite(m.mixture).all() and np.isfinite([m.a1, m.a2]).all()
    np.testing.assert_array_equal(m.mixture, m.clean + m.noise)


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(0, 32), data=st.data())
def test_batch_mixer_raises_only_mixing_error(batch, length, data):
    dt = data.draw(st.sampled_from([np.float32, np.float64]))
    clean = data.draw(hnp.arrays(dt, (batch, length), elements=_elements(dt)))
    noise = data.draw(hnp.arrays(dt, (data.draw(st.integers(1, 4)), length), elements=_elements(dt)))
    snr_db = data.draw(hnp.arrays(np.float64, (data.draw(st.integers(1, 4)),), elements=snrs))
    try:
        out = mix_batch_at_snr(clean, noise, snr_db)
    except MixingError:
        return
    assert all(np.isfinite(np.asarray(o)).all() for o in out)
