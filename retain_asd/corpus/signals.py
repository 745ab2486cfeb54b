"""Signal building blocks of the synthetic sounds (vectorised numpy): coloured and band-limited noise, impulse
trains, decaying resonances, bearing impacts, and the level every written clip is scaled to. Shared by the
machines and noises of the two worlds (`synth`, `noises`) and the generic sounds of the foundation encoder
(`generic`)."""

from __future__ import annotations

import numpy as np
from scipy.fft import next_fast_len

RMS_LEVEL = 0.08  # clips are written as PCM_16 well inside [-1, 1]


def coloured_noise(rng: np.random.Generator, num_samples: int, exponent: float, sample_rate_hz: int,
                   low_hz: float = 20.0) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^exponent above `low_hz` (nothing below), unit RMS.

    Cutting below `low_hz` keeps brown noise from drifting, which would make it non-stationary.
    """
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs_hz = np.fft.rfftfreq(num_samples, 1.0 / sample_rate_hz)
    gain = np.zeros_like(freqs_hz)
    keep = freqs_hz >= low_hz
    gain[keep] = freqs_hz[keep] ** (-exponent / 2.0)  # amplitude ~ f^(-exponent/2)
    x = np.fft.irfft(spectrum * gain, num_samples)
    return x / np.sqrt(np.mean(x**2))


def band_noise(rng: np.random.Generator, num_samples: int, low_hz: float, high_hz: float,
               sample_rate_hz: int) -> np.ndarray:
    """White noise restricted to [low_hz, high_hz], unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs_hz = np.fft.rfftfreq(num_samples, 1.0 / sample_rate_hz)
    spectrum[(freqs_hz < low_hz) | (freqs_hz > high_hz)] = 0.0
    x = np.fft.irfft(spectrum, num_samples)
    return x / np.sqrt(np.mean(x**2))


def convolve_fft(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Linear convolution cut to len(x)."""
    n = next_fast_len(x.shape[0] + kernel.shape[0] - 1, real=True)  # a prime length would be 10x slower
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(kernel, n), n)[: x.shape[0]]


def decaying_resonance(freq_hz: float, decay_s: float, sample_rate_hz: int) -> np.ndarray:
    """An impulse response exp(-t/decay) sin(2 pi f t), 5 decay constants long."""
    t = np.arange(int(5 * decay_s * sample_rate_hz)) / sample_rate_hz
    return np.exp(-t / decay_s) * np.sin(2 * np.pi * freq_hz * t)


def impulse_train(rng: np.random.Generator, num_samples: int, rate_hz: float, sample_rate_hz: int,
                  jitter: float) -> np.ndarray:
    """Indices of roughly periodic events at `rate_hz` with relative timing jitter."""
    count = int(num_samples / sample_rate_hz * rate_hz) + 2
    periods_s = (1.0 / rate_hz) * (1.0 + jitter * rng.uniform(-1, 1, count))
    onsets = np.cumsum(periods_s * sample_rate_hz) - rng.uniform(0, sample_rate_hz / rate_hz)
    onsets = onsets.astype(np.int64)
    return onsets[(onsets >= 0) & (onsets < num_samples)]


def bearing_tones(rng: np.random.Generator, rate_hz: float, resonance_hz: float, *, num_samples: int,
                  sample_rate_hz: int) -> np.ndarray:
    """Rolling-bearing impacts: a nearly periodic train at the defect rate `rate_hz` (1 % slip), each
    impact ringing a structural resonance (the envelope-analysis picture of a bearing), unit RMS."""
    onsets = impulse_train(rng, num_samples, rate_hz, sample_rate_hz, jitter=0.01)
    hits = np.zeros(num_samples)
    hits[onsets] = rng.uniform(0.7, 1.0, onsets.size)
    x = convolve_fft(hits, decaying_resonance(resonance_hz, 0.0015, sample_rate_hz))
    return x / np.sqrt(np.mean(x**2))


def normalise(x: np.ndarray, rms: float) -> np.ndarray:
    """Scale to `rms`, then down if needed so the peak stays below 0.99 (PCM_16 without clipping)."""
    x = x * (rms / np.sqrt(np.mean(x**2)))
    peak = np.max(np.abs(x))
    return x * (0.99 / peak) if peak > 0.99 else x
