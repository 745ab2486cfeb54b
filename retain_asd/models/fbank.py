"""Kaldi log-mel filterbank over a whole batch: (B, S) waveforms -> (B, T_frames, num_mel_bins) in one pass.

Computes what `torchaudio.compliance.kaldi.fbank` computes for one clip with BEATs' settings (25 ms frames
every 10 ms, `snip_edges`, dither 0, Povey window, pre-emphasis 0.97, per-frame DC removal, power spectrum
of a 512-point FFT, triangular mel banks from 20 Hz to Nyquist, log with a floor at float32 eps), but as a
handful of batched kernels instead of a Python loop of per-clip calls (`kaldi.fbank` reads one channel).
The mel banks and the window are built once per (device, size) and cached.

Always fp32 with autocast off: the FFT and the mel matmul in bf16 would shift the features the
checkpoints were trained on. Equal to the per-clip `kaldi.fbank` to float rounding (tests/models/test_fbank.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor

PREEMPHASIS = 0.97  # Kaldi default
POVEY_POWER = 0.85  # Povey window = (symmetric Hann)^0.85
LOW_FREQ_HZ = 20.0  # Kaldi default lower edge of the first mel triangle; the upper edge is Nyquist
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi floors every mel energy at float eps before the log
CPU_BLOCK_FRAMES = 4096  # frames per block on the CPU (8 MiB of padded frames)


def frame_sizes(sample_rate_hz: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int, int]:
    """(window, shift, FFT size) in samples, with Kaldi's integer arithmetic; the FFT size is the next power of 2."""
    window = int(sample_rate_hz * frame_length_ms * 0.001)
    shift = int(sample_rate_hz * frame_shift_ms * 0.001)
    return window, shift, 1 << math.ceil(math.log2(window))


@functools.lru_cache(maxsize=16)
def _constants(num_mel_bins: int, sample_rate_hz: int, window: int, fft_size: int,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """Povey window (window,) and the mel matrix (fft_size // 2 + 1, num_mel_bins), fp32 on `device`.

    The window is computed in fp32 on the CPU, as `kaldi.fbank` computes it for an fp32 clip: a window
    rounded from fp64 instead moves the weakest (pre-emphasised, lowest) mel bins by up to 1e-4.
    """
    povey = torch.hann_window(window, periodic=False, dtype=torch.float32).pow(POVEY_POWER)
    banks, _ = kaldi.get_mel_banks(num_mel_bins, fft_size, float(sample_rate_hz), LOW_FREQ_HZ, 0.0, 100.0, -500.0, 1.0)
    mel = F.pad(banks.float(), (0, 1)).T  # (fft_size // 2 + 1, num_mel_bins): the Nyquist bin weighs 0, as in Kaldi
    return povey.to(device), mel.contiguous().to(device)


def kaldi_fbank(waveforms: Tensor, num_mel_bins: int = 128, sample_rate_hz: int = 16000,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> Tensor:
    """(B, S) waveforms (any scale; BEATs passes x 2^15) -> log-mel fbank (B, T_frames, num_mel_bins), fp32.

    T_frames = 1 + (S - window) // shift (Kaldi's `snip_edges`). Clip b of the result equals
    `kaldi.fbank(waveforms[b:b+1], num_mel_bins=..., sample_frequency=..., frame_length=..., frame_shift=...)`.
    On the CPU the batch is walked in blocks of about `CPU_BLOCK_FRAMES` frames, so the frame buffers stay
    small enough to be reused instead of mapped afresh (page faults cost more than the arithmetic there).
    """
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    window, shift, fft_size = frame_sizes(sample_rate_hz, frame_length_ms, frame_shift_ms)
    if waveforms.shape[1] < window:
        raise ValueError(f"a clip of {waveforms.shape[1]} samples is shorter than one {frame_length_ms} ms frame "
                         f"({window} samples)")
    povey, mel = _constants(num_mel_bins, sample_rate_hz, window, fft_size, waveforms.device)
    num_frames = 1 + (waveforms.shape[1] - window) // shift
    block = len(waveforms)
    if waveforms.device.type == "cpu":
        block = max(1, min(block, CPU_BLOCK_FRAMES // num_frames))
    with torch.autocast(device_type=waveforms.device.type, enabled=False):
        return torch.cat([_log_mel(waveforms[i:i + block].float(), window, shift, fft_size, povey, mel)
                          for i in range(0, len(waveforms), block)])


def _log_mel(waveforms: Tensor, window: int, shift: int, fft_size: int, povey: Tensor, mel: Tensor) -> Tensor:
    """The fbank of a block of clips (b, S) -> (b, T, bins); in-place steps on one zero-padded frame buffer."""
    frames = waveforms.unfold(1, window, shift)  # (b, T, window), a view
    padded = frames.new_zeros(*frames.shape[:2], fft_size)  # (b, T, fft_size): zero padding to the FFT size
    x = padded[..., :window]
    torch.sub(frames, frames.mean(dim=-1, keepdim=True), out=x)  # DC offset per frame
    previous = PREEMPHASIS * x[..., :-1]  # pre-emphasis x[n] - 0.97 x[n-1], with x[-1] := x[0] (Kaldi)
    x[..., 0] -= PREEMPHASIS * x[..., 0]
    x[..., 1:] -= previous
    x *= povey
    power = torch.fft.rfft(padded).abs().square_()  # (b, T, fft_size // 2 + 1), |X|^2 as Kaldi rounds it
    return (power @ mel).clamp_min_(LOG_FLOOR).log_()  # (b, T, bins)


def kaldi_fbank_per_clip(waveforms: Tensor, num_mel_bins: int = 128, sample_rate_hz: int = 16000,
                         frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> Tensor:
    """The reference `kaldi_fbank` equals: torchaudio's `kaldi.fbank` called clip by clip (B, T_frames, bins)."""
    with torch.autocast(device_type=waveforms.device.type, enabled=False):
        return torch.stack([kaldi.fbank(w.float().unsqueeze(0), num_mel_bins=num_mel_bins,
                                        sample_frequency=sample_rate_hz, frame_length=frame_length_ms,
                                        frame_shift=frame_shift_ms)
                            for w in waveforms])  # kaldi.fbank reads one channel only


__all__ = ["frame_sizes", "kaldi_fbank", "kaldi_fbank_per_clip"]
