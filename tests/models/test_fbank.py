"""The batched Kaldi fbank (models/fbank.py) against torchaudio's `kaldi.fbank` called clip by clip.

Compared after BEATs' official normalisation ((x - 15.41663) / (2 * 6.55582)), where the bound is 1e-4.
"""

import numpy as np
import pytest
import soundfile as sf
import torch

from retain_asd.models import fbank as fbank_mod
from retain_asd.models.beats import WAVEFORM_SCALE, fbank_features
from retain_asd.models.fbank import kaldi_fbank, kaldi_fbank_per_clip

TOL = 1e-4  # on the normalised fbank


def _reference(waveforms: torch.Tensor) -> torch.Tensor:
    """BEATs' official `preprocess`: per-clip kaldi.fbank of x * 2^15, then the official normalisation."""
    return (kaldi_fbank_per_clip(waveforms.float() * WAVEFORM_SCALE) - 15.41663) / (2 * 6.55582)


def _random_clips(num_samples: int, seed: int) -> torch.Tensor:
    """Noise, a tone with a DC offset, digital silence, a near-silent clip and a clipped loud one, (5, S)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000
    return torch.stack([
        0.1 * torch.randn(num_samples, generator=g),
        0.3 + 0.5 * torch.sin(2 * torch.pi * 440 * t),
        torch.zeros(num_samples),
        1e-5 * torch.randn(num_samples, generator=g),
        (3 * torch.randn(num_samples, generator=g)).clamp(-1, 1),
    ])


@pytest.mark.parametrize("num_samples", [400, 2800, 16001, 32000, 160000])  # one frame .. 10 s
def test_random_clips_match_the_per_clip_fbank(num_samples):
    clips = _random_clips(num_samples, seed=num_samples)
    if num_samples >= 2800:  # BEATs' own minimum (16 frames); below it, the fbank alone
        got, ref = fbank_features(clips), _reference(clips)
    else:
        got, ref = kaldi_fbank(clips * WAVEFORM_SCALE), kaldi_fbank_per_clip(clips * WAVEFORM_SCALE)
    assert got.shape == ref.shape == (5, 1 + (num_samples - 400) // 160, 128)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= TOL
    assert got[2].eq(got[2, 0, 0]).all()  # silence: every bin at the log floor, as Kaldi


def test_real_clips_match_the_per_clip_fbank(shared_data):
    """Real DCASE machine clips (10 s and 11 s) and real noise segments, batched by length."""
    machine = sorted((shared_data / "machine" / "dcase2020t2_dev_id00" / "train").glob("*.wav"))[:4]
    toycar = sorted((shared_data / "machine" / "dcase2020t2_dev_id01_toycar").glob("*.wav"))
    noise = [sf.read(p, dtype="float32")[0] for p in sorted((shared_data / "noise").glob("*.wav"))]
    batches = [
        np.stack([sf.read(p, dtype="float32")[0] for p in machine]),  # (4, 160000)
        np.stack([sf.read(p, dtype="float32")[0] for p in toycar]),  # (2, 176000)
        np.stack([n[16000 * 7 : 16000 * 7 + 48123] for n in noise]),  # (3, 48123): 3 s segments
    ]
    for clips in map(torch.from_numpy, batches):
        got, ref = fbank_features(clips), _reference(clips)
        assert got.shape == ref.shape and (got - ref).abs().max().item() <= TOL


def test_fp32_whatever_the_autocast_and_input_dtype():
    clips = _random_clips(16000, seed=1)
    ref = _reference(clips)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fbank_features(clips)
    assert got.dtype == torch.float32 and (got - ref).abs().max().item() <= TOL
    bf16 = clips.bfloat16()
    got = fbank_features(bf16)
    assert got.dtype == torch.float32 and (got - _reference(bf16.float())).abs().max().item() <= TOL


def test_blocks_on_the_cpu_do_not_change_the_result(monkeypatch):
    """A batch walked in several CPU blocks (2 clips each, the last one short) equals the per-clip fbank."""
    monkeypatch.setattr(fbank_mod, "CPU_BLOCK_FRAMES", 2 * 98)  # 16000 samples = 98 frames per clip
    clips = _random_clips(16000, seed=2) * WAVEFORM_SCALE  # 5 clips -> blocks of 2, 2, 1
    got, ref = kaldi_fbank(clips), kaldi_fbank_per_clip(clips)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-3  # un-normalised log units


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        kaldi_fbank(torch.zeros(400))
    with pytest.raises(ValueError, match="399 samples is shorter than one 25.0 ms frame"):
        kaldi_fbank(torch.zeros(2, 399))
