"""The synthetic noise categories: each a generator of recordings (`noise_clip`) and its role (stationary: Factory
A; non-stationary: Factory B). The pre-training world has pink_hum, brown_fan, bursts and clatter, the evaluation
world hvac, transformer, hammering and passby (`synth.World`); `spread_draw` sets how far the recordings of one
category vary."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retain_asd.corpus.signals import (
    RMS_LEVEL,
    band_noise,
    coloured_noise,
    convolve_fft,
    decaying_resonance,
    impulse_train,
    normalise,
)


@dataclass(frozen=True)
class NoiseSpec:
    name: str
    stationary: bool


NOISES: dict[str, NoiseSpec] = {
    spec.name: spec
    for spec in (
        NoiseSpec("pink_hum", True),  # pink noise + mains hum (50 or 60 Hz and harmonics)
        NoiseSpec("brown_fan", True),  # brown noise + a steady ventilation tone + hiss
        NoiseSpec("bursts", False),  # band-limited noise switched on and off
        NoiseSpec("clatter", False),  # random impacts of resonant objects
        # --- the evaluation world's noise (EVAL_WORLD): other categories, other recordings ---
        NoiseSpec("hvac", True),  # ventilation: near-white airflow + a cluster of steady duct tones
        NoiseSpec("transformer", True),  # magnetostriction hum at twice the mains frequency + pink floor
        NoiseSpec("hammering", False),  # sessions of heavy, low-ringing blows with pauses
        NoiseSpec("passby", False),  # vehicles passing: swelling engine harmonics and road noise
    )
}


def check_spread(spread: float) -> None:
    """A noise spread is a finite number > 0 (ValueError naming it otherwise)."""
    if not (math.isfinite(spread) and spread > 0):
        raise ValueError(f"spread={spread!r}: must be a finite number > 0 (1 = the generators' own ranges)")


def spread_draw(rng: np.random.Generator, spread: float = 1.0) -> Callable[[float, float], float]:
    """`draw(lo, hi)`: one generator parameter (a tone's frequency, a rate, an event's length or level), uniform on
    [lo, hi] widened `spread` times about its middle (narrowed when spread < 1; when widened, the lower end is kept
    above lo / spread, so frequencies, rates and durations stay positive). At spread 1 it is `rng.uniform(lo, hi)`
    itself: the same numbers, so the default worlds do not change."""
    check_spread(spread)
    if spread == 1.0:
        return rng.uniform

    def draw(lo: float, hi: float) -> float:
        middle, half = 0.5 * (lo + hi), 0.5 * (hi - lo) * spread
        return rng.uniform(max(middle - half, min(lo, lo / spread)), middle + half)

    return draw


def noise_clip(category: str, rng: np.random.Generator, *, num_samples: int,
               sample_rate_hz: int, spread: float = 1.0) -> np.ndarray:
    """One noise clip of `category` (see NOISES). `spread`: how far the recordings of one category vary (its
    parameters' ranges, `spread_draw`; phases, start offsets and the recording's level keep theirs)."""
    draw = spread_draw(rng, spread)
    t_s = np.arange(num_samples) / sample_rate_hz
    top_hz = 0.45 * sample_rate_hz
    if category == "pink_hum":
        mains_hz = rng.choice([50.0, 60.0])
        hum = sum(a * np.sin(2 * np.pi * h * mains_hz * t_s + rng.uniform(0, 2 * np.pi))
                  for h, a in ((1, 1.0), (2, 0.5), (3, 0.7), (5, 0.3)))
        x = coloured_noise(rng, num_samples, 1.0, sample_rate_hz) + draw(0.3, 0.8) * hum
    elif category == "brown_fan":
        blade_hz = draw(80, 160)
        tone = np.sin(2 * np.pi * blade_hz * t_s) + 0.4 * np.sin(4 * np.pi * blade_hz * t_s + 1.0)
        x = (coloured_noise(rng, num_samples, 2.0, sample_rate_hz, low_hz=60.0) + 0.3 * tone
             + 0.1 * band_noise(rng, num_samples, 2000.0, top_hz, sample_rate_hz))
    elif category == "bursts":
        # Two band-limited carriers gated on for 0.1-1.5 s and off for 0.3-2 s, with 10 ms ramps.
        x = np.zeros(num_samples)
        ramp = np.sin(np.linspace(0, np.pi / 2, int(0.01 * sample_rate_hz))) ** 2
        for _ in range(2):
            low_hz = draw(100, 2000)
            high_hz = min(low_hz * draw(1.5, 4), top_hz)
            carrier = band_noise(rng, num_samples, low_hz, high_hz, sample_rate_hz)
            gate = np.zeros(num_samples)
            pos = int(rng.uniform(0, 1.0) * sample_rate_hz)
            while pos < num_samples:
                length = int(draw(0.1, 1.5) * sample_rate_hz)
                seg = np.full(min(length, num_samples - pos), draw(0.3, 1.0))
                n_ramp = min(ramp.size, seg.size // 2)
                seg[:n_ramp] *= ramp[:n_ramp]
                seg[seg.size - n_ramp:] *= ramp[:n_ramp][::-1]
                gate[pos : pos + seg.size] = seg
                pos += length + int(draw(0.3, 2.0) * sample_rate_hz)
            x += gate * carrier
        x += 0.01 * rng.standard_normal(num_samples)  # never exactly silent between bursts
    elif category == "clatter":
        # Impacts (about 3 per second, in clusters) on four resonant objects of 2-3 modes each.
        x = 0.01 * rng.standard_normal(num_samples)
        for _ in range(4):
            onsets = impulse_train(rng, num_samples, draw(0.3, 1.2), sample_rate_hz, jitter=0.9)
            hits = np.zeros(num_samples)
            hits[onsets] = 10 ** rng.uniform(-1, 0, onsets.size)  # 20 dB of loudness spread
            body = np.zeros(int(0.3 * sample_rate_hz))
            for _ in range(3):  # modes; decays <= 60 ms, so 0.3 s holds the whole ring
                mode = decaying_resonance(min(draw(800, 6000), top_hz), draw(0.01, 0.06),
                                          sample_rate_hz)[: body.size]
                body[: mode.size] += draw(0.3, 1.0) * mode
            x += convolve_fft(hits, body)
    elif category == "hvac":
        # Airflow (exponent 0.7, between white and pink) + 3 unrelated steady duct tones at 150-700 Hz.
        tones = sum(draw(0.3, 1.0) * np.sin(2 * np.pi * draw(150, 700) * t_s + rng.uniform(0, 6.3))
                    for _ in range(3))
        x = coloured_noise(rng, num_samples, 0.7, sample_rate_hz, low_hz=40.0) + draw(0.2, 0.5) * tones
    elif category == "transformer":
        # Magnetostriction: hum at 2 x mains and its even harmonics, over a quiet pink floor.
        mains_hz = rng.choice([50.0, 60.0])
        hum = sum(a * np.sin(2 * np.pi * h * mains_hz * t_s + rng.uniform(0, 2 * np.pi))
                  for h, a in ((2, 1.0), (4, 0.6), (6, 0.35), (8, 0.2), (10, 0.1)))
        x = hum + draw(0.2, 0.4) * coloured_noise(rng, num_samples, 1.0, sample_rate_hz)
    elif category == "hammering":
        # Sessions of 2-6 s of blows at 1.5-3 per second, 1-4 s pauses; each blow rings 2 low modes.
        x = 0.005 * rng.standard_normal(num_samples)
        hits = np.zeros(num_samples)
        pos = int(rng.uniform(0, 1.0) * sample_rate_hz)
        while pos < num_samples:
            length = int(draw(2.0, 6.0) * sample_rate_hz)
            onsets = impulse_train(rng, min(length, num_samples - pos), draw(1.5, 3.0), sample_rate_hz,
                                   jitter=0.15)
            hits[pos + onsets] = rng.uniform(0.5, 1.0, onsets.size)
            pos += length + int(draw(1.0, 4.0) * sample_rate_hz)
        body = np.zeros(int(0.6 * sample_rate_hz))  # decays <= 0.12 s: 5 constants fit in 0.6 s
        for _ in range(2):
            mode = decaying_resonance(draw(150, 1200), draw(0.05, 0.12), sample_rate_hz)[: body.size]
            body[: mode.size] += draw(0.5, 1.0) * mode
        x += convolve_fft(hits, body)
    elif category == "passby":
        # Vehicles every 3-8 s: a 1-3 s Gaussian swell of engine harmonics (20-40 Hz firing rate,
        # rising then falling with the Doppler shift) and road noise, over a quiet brown floor.
        x = 0.02 * coloured_noise(rng, num_samples, 2.0, sample_rate_hz, low_hz=40.0)
        road = band_noise(rng, num_samples, 200.0, min(3000.0, top_hz), sample_rate_hz)
        centre_s = rng.uniform(0, 3.0)
        while centre_s < num_samples / sample_rate_hz + 3.0:
            width_s = draw(1.0, 3.0)
            span = slice(max(0, int((centre_s - 2 * width_s) * sample_rate_hz)),
                         max(0, int((centre_s + 2 * width_s) * sample_rate_hz)))  # the swell is ~0 outside
            t_rel_s = t_s[span] - centre_s
            swell = np.exp(-0.5 * (t_rel_s / (width_s / 2)) ** 2)
            firing_hz = draw(20, 40) * (1 + 0.03 * np.tanh(-t_rel_s / width_s))  # Doppler
            phase = 2 * np.pi * np.cumsum(firing_hz) / sample_rate_hz
            engine = sum(a * np.sin(h * phase) for h, a in ((1, 1.0), (2, 0.7), (3, 0.5), (4, 0.3)))
            x[span] += draw(0.5, 1.0) * swell * (engine + 0.8 * road[span])
            centre_s += draw(3.0, 8.0)
    else:
        raise ValueError(f"noise category {category!r}: expected one of {tuple(NOISES)}")
    return normalise(x, RMS_LEVEL * rng.uniform(0.8, 1.25))
