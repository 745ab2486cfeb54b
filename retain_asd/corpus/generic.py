"""Generic synthetic sounds for the stand-in foundation encoder: clean, single-source, never mixtures.

BEATs iter3 was pre-trained on AudioSet clips, one recording at a time, with no synthetic mixing (paper
Sec. 2: SSL backbones are not trained on mixtures). The stand-in encoder of the embedded world plays that
role, so it learns from *sounds in general*: six families built from the signal blocks of `synth.py`, with
every parameter drawn per clip from wide ranges. None of them is an evaluation machine type (no
`MachineSpec`, no machine speeds, timbres or anomaly kinds), so the encoder never sees what it is scored on.

Families (the label of a clip is its family index in `FAMILIES`):

* ``harmonic``  a harmonic series (random f0, number of harmonics, roll-off, gaps) over coloured noise;
* ``modulated`` the same, amplitude-modulated (slow or fast) or with sidebands at a random shaft rate;
* ``rattle``    an impulse train of short ringing resonances (random rate, jitter, ring frequency, decay);
* ``bearing``   inharmonic tones plus a high band of noise bursting at a defect rate (rolling-element tones);
* ``noise``     broadband or band-limited coloured noise;
* ``sweep``     a harmonic tone whose pitch runs up or down (start-up, coast-down).

The "rich" set (`RICH_FAMILIES`) adds four non-machine families:

* ``texture``   coloured or band-limited noise gated or faded in and out (rain gusts, air bursts, crowds);
* ``impacts``   clusters of blows on resonant bodies of 1-3 low or high modes, with pauses (knocks, tools);
* ``hum``       a mains-like hum (a few low harmonics of 40-120 Hz) over a quiet coloured floor;
* ``swell``     a tonal or noisy source approaching and receding (a slow Gaussian loudness swell).

Deterministic: clip i of batch `step` draws from a generator seeded by (seed, step, i).
"""

from __future__ import annotations

import numpy as np

from retain_asd.corpus.signals import (
    RMS_LEVEL,
    band_noise,
    coloured_noise,
    convolve_fft,
    decaying_resonance,
    impulse_train,
)

GENERIC_VERSION = 1  # bump when the generated audio changes (part of the foundation cache key)
FAMILIES = ("harmonic", "modulated", "rattle", "bearing", "noise", "sweep")
# "rich" (`foundation.families`): the six above plus sounds of everyday acoustic scenes that are not
# machines: noise textures that change over time and impulsive events, as AudioSet is full of them.
RICH_FAMILIES = FAMILIES + ("texture", "impacts", "hum", "swell")
FAMILY_SETS = {"basic": FAMILIES, "rich": RICH_FAMILIES}


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _harmonic_series(rng: np.random.Generator, f0_hz: np.ndarray | float, num_samples: int,
                     sample_rate_hz: int) -> np.ndarray:
    """Sum of harmonics of a (possibly time-varying) f0 with random roll-off, gaps and phases; unit RMS."""
    f0 = np.broadcast_to(np.asarray(f0_hz, dtype=np.float64), (num_samples,))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate_hz  # (T,)
    num_harmonics = int(rng.integers(2, 17))
    k = np.arange(1, num_harmonics + 1)
    amps = k ** -rng.uniform(0.0, 1.5) * rng.uniform(0.3, 1.0, num_harmonics)  # (H,)
    amps[rng.random(num_harmonics) < 0.2] = 0.0  # some harmonics missing (odd-only, gaps)
    amps[0] = max(amps[0], 0.3)
    nyquist_hz = sample_rate_hz / 2
    x = np.zeros(num_samples)
    for h, a in zip(k, amps):
        if a > 0:
            x += a * (h * f0 < 0.9 * nyquist_hz) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def _background(rng: np.random.Generator, num_samples: int, sample_rate_hz: int, level: float) -> np.ndarray:
    return level * coloured_noise(rng, num_samples, rng.uniform(0.0, 2.0), sample_rate_hz)


def generic_clip(family: str, rng: np.random.Generator, *, num_samples: int,
                 sample_rate_hz: int = 16000) -> np.ndarray:
    """One clean clip of `family` (see FAMILIES), float64, RMS about 0.08, peak below 0.99."""
    t_s = np.arange(num_samples) / sample_rate_hz
    nyquist_hz = sample_rate_hz / 2
    if family == "harmonic":
        f0_hz = _log_uniform(rng, 30.0, 800.0) * (1 + 0.004 * np.sin(2 * np.pi * rng.uniform(0.1, 1) * t_s))
        x = _harmonic_series(rng, f0_hz, num_samples, sample_rate_hz)
        x = x + _background(rng, num_samples, sample_rate_hz, _log_uniform(rng, 0.02, 0.8))
    elif family == "modulated":
        x = _harmonic_series(rng, _log_uniform(rng, 30.0, 800.0), num_samples, sample_rate_hz)
        rate_hz = _log_uniform(rng, 0.5, 40.0)
        x = x * (1 + rng.uniform(0.3, 0.95) * np.sin(2 * np.pi * rate_hz * t_s + rng.uniform(0, 2 * np.pi)))
        x = x + _background(rng, num_samples, sample_rate_hz, _log_uniform(rng, 0.02, 0.5))
    elif family == "rattle":
        onsets = impulse_train(rng, num_samples, _log_uniform(rng, 2.0, 40.0), sample_rate_hz,
                               jitter=rng.uniform(0.0, 0.6))
        clicks = np.zeros(num_samples)
        clicks[onsets] = rng.uniform(0.3, 1.0, onsets.size)
        ring = decaying_resonance(min(_log_uniform(rng, 300.0, 6000.0), 0.8 * nyquist_hz),
                                  _log_uniform(rng, 0.001, 0.02), sample_rate_hz)
        x = convolve_fft(clicks, ring)
        x = x / max(np.sqrt(np.mean(x**2)), 1e-12) + _background(rng, num_samples, sample_rate_hz,
                                                                  _log_uniform(rng, 0.01, 0.3))
    elif family == "bearing":
        shaft_hz = rng.uniform(5.0, 60.0)
        ratios = rng.uniform(1.5, 9.0, int(rng.integers(2, 5)))  # defect frequencies: not on a harmonic grid
        tones = sum(rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * r * shaft_hz * 3.7 * t_s + rng.uniform(0, 6.3))
                    for r in ratios)
        tones = tones * (1 + 0.5 * np.sin(2 * np.pi * shaft_hz * t_s))  # shaft-rate modulation
        defect_hz = shaft_hz * rng.uniform(2.5, 6.0)
        envelope = np.maximum(np.sin(2 * np.pi * defect_hz * t_s), 0.0) ** 8  # impacts at the defect rate
        low_hz = rng.uniform(1500.0, 0.6 * nyquist_hz)
        high = band_noise(rng, num_samples, low_hz, min(low_hz * 1.8, 0.95 * nyquist_hz), sample_rate_hz)
        x = tones / max(np.sqrt(np.mean(tones**2)), 1e-12) + rng.uniform(0.5, 2.0) * envelope * high
        x = x + _background(rng, num_samples, sample_rate_hz, _log_uniform(rng, 0.02, 0.3))
    elif family == "noise":
        if rng.random() < 0.5:
            x = coloured_noise(rng, num_samples, rng.uniform(0.0, 2.5), sample_rate_hz)
        else:
            low_hz = _log_uniform(rng, 50.0, 4000.0)
            x = band_noise(rng, num_samples, low_hz, min(low_hz * rng.uniform(1.3, 6.0), 0.95 * nyquist_hz),
                           sample_rate_hz)
    elif family == "sweep":
        start_hz, end_hz = _log_uniform(rng, 30.0, 600.0), _log_uniform(rng, 30.0, 600.0)
        f0_hz = start_hz * (end_hz / start_hz) ** (t_s / t_s[-1])  # exponential run-up / coast-down
        x = _harmonic_series(rng, f0_hz, num_samples, sample_rate_hz)
        x = x + _background(rng, num_samples, sample_rate_hz, _log_uniform(rng, 0.02, 0.5))
    elif family == "texture":
        if rng.random() < 0.5:
            x = coloured_noise(rng, num_samples, rng.uniform(0.0, 2.0), sample_rate_hz)
        else:
            low_hz = _log_uniform(rng, 80.0, 3000.0)
            x = band_noise(rng, num_samples, low_hz, min(low_hz * rng.uniform(1.5, 8.0), 0.95 * nyquist_hz),
                           sample_rate_hz)
        rate_hz = _log_uniform(rng, 0.2, 4.0)  # gates or slow fades
        envelope = np.sin(2 * np.pi * rate_hz * t_s + rng.uniform(0, 2 * np.pi))
        envelope = (envelope > rng.uniform(-0.5, 0.5)) if rng.random() < 0.5 else 0.5 * (1 + envelope)
        x = x * (0.05 + envelope) + _background(rng, num_samples, sample_rate_hz, _log_uniform(rng, 0.01, 0.1))
    elif family == "impacts":
        onsets = impulse_train(rng, num_samples, _log_uniform(rng, 0.5, 6.0), sample_rate_hz,
                               jitter=rng.uniform(0.1, 0.9))
        hits = np.zeros(num_samples)
        hits[onsets] = 10 ** rng.uniform(-1, 0, onsets.size)
        body = np.zeros(int(0.4 * sample_rate_hz))
        for _ in range(int(rng.integers(1, 4))):
            mode = decaying_resonance(min(_log_uniform(rng, 100.0, 5000.0), 0.8 * nyquist_hz),
                                      _log_uniform(rng, 0.005, 0.08), sample_rate_hz)[: body.size]
            body[: mode.size] += rng.uniform(0.3, 1.0) * mode
        x = convolve_fft(hits, body)
        x = x / max(np.sqrt(np.mean(x**2)), 1e-12) + _background(rng, num_samples, sample_rate_hz,
                                                                  _log_uniform(rng, 0.01, 0.2))
    elif family == "hum":
        mains_hz = rng.uniform(40.0, 120.0)
        x = sum(rng.uniform(0.1, 1.0) * np.sin(2 * np.pi * h * mains_hz * t_s + rng.uniform(0, 2 * np.pi))
                for h in range(1, int(rng.integers(2, 7))))
        x = x / max(np.sqrt(np.mean(x**2)), 1e-12) + _background(rng, num_samples, sample_rate_hz,
                                                                  _log_uniform(rng, 0.05, 0.6))
    elif family == "swell":
        if rng.random() < 0.5:
            src = _harmonic_series(rng, _log_uniform(rng, 20.0, 300.0), num_samples, sample_rate_hz)
        else:
            src = coloured_noise(rng, num_samples, rng.uniform(0.5, 2.0), sample_rate_hz)
        centre_s, width_s = rng.uniform(0, t_s[-1]), rng.uniform(0.2, 1.5) * max(t_s[-1], 0.5)
        x = src * (0.03 + np.exp(-0.5 * ((t_s - centre_s) / (width_s / 2)) ** 2))
    else:
        raise ValueError(f"generic sound family {family!r}: expected one of {RICH_FAMILIES}")
    x = x * (RMS_LEVEL * rng.uniform(0.5, 2.0) / max(np.sqrt(np.mean(x**2)), 1e-12))
    peak = np.max(np.abs(x))
    return x * (0.99 / peak) if peak > 0.99 else x


def generic_batch(seed: int, step: int, batch_size: int, *, num_samples: int, sample_rate_hz: int = 16000,
                  families: tuple[str, ...] = FAMILIES) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) float32 clips and (B,) family labels (indices into `families`) of training batch `step`; families
    drawn uniformly."""
    clips, labels = [], []
    for i in range(batch_size):
        rng = np.random.default_rng([seed, GENERIC_VERSION, step, i])
        label = int(rng.integers(len(families)))
        clips.append(generic_clip(families[label], rng, num_samples=num_samples, sample_rate_hz=sample_rate_hz))
        labels.append(label)
    return np.stack(clips).astype(np.float32), np.asarray(labels, dtype=np.int64)


__all__ = ["FAMILIES", "FAMILY_SETS", "GENERIC_VERSION", "RICH_FAMILIES", "generic_batch", "generic_clip"]


# ---------------------------------------------------------------------------------------------------- a corpus
GENERIC_PREFIX = "as_"  # machine-type folder of a family in the written tree ("as_harmonic": AudioSet-like)


def write_generic_tree(root, *, seed: int = 0, clips_per_family: int = 8, clip_s: float = 10.0,
                       sample_rate_hz: int = 16000) -> str:
    """The paper's Table-5 "other data" (AS-20K: general audio, no machine sounds) in the embedded world:
    `clips_per_family` clean generic clips per family written as a DCASE-style train tree
    ``<root>/machines/dev_data/raw/as_<family>/train/section_00_source_train_normal_<i>_noAttribute.wav``, so
    ingestion and the stream treat each family as one class, as AS-20K's labels would be. Returns the machine
    root. Reused when already written with the same arguments (``<root>/generic.json``)."""
    import json
    from pathlib import Path

    from retain_asd import fsio
    from retain_asd.audio import write_audio

    root = Path(root)
    machine_root = root / "machines"
    params = dict(version=GENERIC_VERSION, seed=seed, clips_per_family=clips_per_family, clip_s=clip_s,
                  sample_rate_hz=sample_rate_hz)
    stamp = root / "generic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return str(machine_root)
    num_samples = int(round(clip_s * sample_rate_hz))
    for f, family in enumerate(FAMILIES):
        folder = machine_root / "dev_data" / "raw" / f"{GENERIC_PREFIX}{family}" / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_family):
            rng = np.random.default_rng([seed, 7, f, i])
            x = generic_clip(family, rng, num_samples=num_samples, sample_rate_hz=sample_rate_hz)
            write_audio(folder / f"section_00_source_train_normal_{i:04d}_noAttribute.wav", x.astype(np.float32),
                        sample_rate_hz)
    fsio.write_text(stamp, json.dumps(params))
    return str(machine_root)
