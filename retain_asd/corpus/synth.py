"""Synthetic machine sounds and noises: the embedded default corpus (no file outside the project).

Machines are rotating sources. An attribute changes the sound the way it would on a real machine:

* ``spd`` (revolutions per second) sets the harmonic series: fundamental = spd x events per revolution
  (fan blades, pump pistons, gear teeth);
* ``ld`` (load level) sets the depth and rate of an amplitude modulation;
* each machine type has its own timbre (harmonic amplitudes, broadband noise colour and level); the
  gearbox and slider add shaft-rate sidebands, and types with rolling bearings add bearing tones (impacts
  at a non-integer multiple of the shaft rate ringing a structural resonance).

Two worlds follow the paper's protocol (Sec. 4.1, "two non-overlapping corpora (both machine and noise
classes)"): `write_pretrain_world` (fan, pump, gearbox, compressor, conveyor; noise pink_hum, brown_fan,
bursts, clatter) and `write_eval_world` (bearing, blower, slider, spindle, mixer, turbine; stationary hvac,
transformer for Factory A, non-stationary hammering, passby for Factory B). They share the generative families, never a
type, a noise category or a recording. `write_synthetic_corpus` writes any subset (default: the first
three pre-training types and the pre-training noise).

Domains follow DCASE 2022-2025: the target domain runs at a speed never seen in the source domain and
has few training clips. Anomalies: ``shift`` (upper harmonics moved off the harmonic grid), ``rattle``
(an impulsive click train, as from a loose part), ``missing`` (one of the two strongest harmonics
gone).

The tree is DCASE-2023 style, so ingestion takes the same path as real data::

    <root>/machines/dev_data/raw/<machine>/train/section_00_source_train_normal_0000_spd_20_ld_1.wav
    <root>/machines/dev_data/raw/<machine>/test/section_00_target_test_anomaly_0003_spd_36_ld_2.wav
    <root>/machines/dev_data/raw/<machine>/attributes_00.csv      (file_name,d1p,d1v,d2p,d2v)
    <root>/noise/<category>/<category>_0000.wav
    <root>/noise/categories.yaml                                  (<category>: {stationary: true|false})

The eval-set builder takes Factory A noise from the categories marked stationary, Factory B noise from the
others (`evalsets.FACTORY_STATIONARY`), so the YAML is where a noise category's role lives.

Deterministic: every clip draws from its own generator seeded by (seed, machine, section, domain,
split, label, index), so the same seed gives byte-identical files, and a clip of a given name is the
same whatever the other counts.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from retain_asd import fsio
from retain_asd.audio import write_audio
from retain_asd.corpus.noises import NOISES, check_spread, noise_clip
from retain_asd.corpus.signals import (
    RMS_LEVEL,
    bearing_tones,
    coloured_noise,
    convolve_fft,
    decaying_resonance,
    impulse_train,
    normalise,
)

SYNTH_VERSION = 1  # bump when the generated audio changes, so stale trees are rewritten
DOMAINS = ("source", "target")
ANOMALY_KINDS = ("shift", "rattle", "missing")


@dataclass(frozen=True)
class MachineSpec:
    """A synthetic machine type. Speeds in revolutions per second; the attribute values are strings."""

    name: str
    events_per_rev: float  # blades / pistons / teeth: fundamental = spd * events_per_rev
    harmonic_amps: tuple[float, ...]  # timbre: amplitude of harmonics 1..H
    noise_level: float  # broadband RMS relative to the harmonic RMS
    noise_exponent: float  # broadband power spectrum ~ 1 / f^exponent (0 white, 1 pink, 2 brown)
    source_speeds: tuple[str, ...]
    target_speeds: tuple[str, ...]  # unseen in the source domain: the domain shift
    loads: tuple[str, ...]
    shaft_sidebands: float = 0.0  # depth of the shaft-rate modulation (gear mesh sidebands)
    bearing_level: float = 0.0  # RMS of the rolling-bearing impacts relative to the harmonic RMS (0 = none)
    bearing_ratio: float = 0.0  # defect frequency / shaft rate (a race's ball-pass ratio, not an integer)
    bearing_resonance_hz: float = 3000.0  # the structural resonance the impacts ring


MACHINES: dict[str, MachineSpec] = {
    spec.name: spec
    for spec in (
        # Airflow-dominated: blade-pass harmonics with 1/k roll-off over strong pink noise.
        MachineSpec("fan", 5, (1.0, 0.5, 0.33, 0.25, 0.2, 0.17, 0.14, 0.12), 0.6, 1.0,
                    ("20", "24", "28"), ("36",), ("1", "2")),
        # Reciprocating: low fundamental, strong odd harmonics, some fluid hiss.
        MachineSpec("pump", 3, (1.0, 0.25, 0.7, 0.15, 0.45, 0.1, 0.3, 0.08, 0.2), 0.3, 0.5,
                    ("15", "18", "21"), ("26",), ("1", "2")),
        # Gear mesh at spd x 23 teeth, shaft-rate sidebands, little broadband noise.
        MachineSpec("gearbox", 23, (1.0, 0.6, 0.3, 0.15), 0.15, 2.0,
                    ("10", "12", "14"), ("17",), ("1", "2"), shaft_sidebands=0.4),
        # Two-cylinder reciprocating compressor: dense harmonic comb, pink hiss, bearing tones.
        MachineSpec("compressor", 2, (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1), 0.35, 1.0,
                    ("60", "70", "80"), ("100",), ("1", "2"), bearing_level=0.3, bearing_ratio=3.1,
                    bearing_resonance_hz=3500.0),
        # Belt conveyor: roller-pass harmonics, brownish rumble, loud roller-bearing tones.
        MachineSpec("conveyor", 12, (1.0, 0.45, 0.25, 0.12), 0.4, 1.5,
                    ("9", "11", "13"), ("17",), ("1", "2"), bearing_level=0.5, bearing_ratio=4.7,
                    bearing_resonance_hz=2500.0),
        # --- the evaluation world's types (EVAL_WORLD): the same families, other parameters ---
        # Bearing test rig: shaft harmonics and outer-race impacts ringing a 6 kHz resonance.
        MachineSpec("bearing", 8, (1.0, 0.35, 0.2, 0.1), 0.3, 1.0,
                    ("20", "25", "30"), ("38",), ("1", "2"), bearing_level=0.4, bearing_ratio=3.57,
                    bearing_resonance_hz=6000.0),
        # Centrifugal blower: impeller-vane harmonics over near-white airflow noise.
        MachineSpec("blower", 11, (1.0, 0.7, 0.4, 0.3, 0.2, 0.1), 0.45, 0.5,
                    ("15", "18", "21"), ("27",), ("1", "2"), bearing_level=0.15, bearing_ratio=2.8,
                    bearing_resonance_hz=6000.0),
        # Ball-screw slider: screw-rate odd-heavy harmonics, nut sidebands, bearing tones, little noise.
        MachineSpec("slider", 4, (1.0, 0.2, 0.5, 0.1, 0.3, 0.1, 0.2), 0.25, 2.0,
                    ("30", "36", "42"), ("50",), ("1", "2"), shaft_sidebands=0.5, bearing_level=0.25,
                    bearing_ratio=2.9, bearing_resonance_hz=5500.0),
        # Machine-tool spindle: few high harmonics of the tool-pass rate, bearing tones, light pink hiss.
        MachineSpec("spindle", 2, (1.0, 0.4, 0.15), 0.15, 1.0,
                    ("100", "120", "140"), ("170",), ("1", "2"), bearing_level=0.3, bearing_ratio=5.3,
                    bearing_resonance_hz=6000.0),
        # Agitator / mixer: slow paddle-pass harmonics with shaft sidebands over brown churning noise.
        MachineSpec("mixer", 10, (1.0, 0.8, 0.5, 0.35, 0.25, 0.15, 0.1), 0.35, 2.0,
                    ("8", "10", "12"), ("15",), ("1", "2"), shaft_sidebands=0.4),
        # Small steam / gas turbine: many blades, a steep harmonic roll-off over brown flow rumble.
        MachineSpec("turbine", 31, (1.0, 0.3, 0.1), 0.3, 2.0,
                    ("15", "17", "19"), ("23",), ("1", "2"), bearing_level=0.1, bearing_ratio=6.2,
                    bearing_resonance_hz=5500.0),
    )
}


@dataclass(frozen=True)
class World:
    """A synthetic world: machine types and noise categories that belong together.

    The paper's protocol (Sec. 4.1) pre-trains and evaluates on "two non-overlapping corpora (both
    machine and noise classes)": the two worlds share no type and no noise category, only the
    generative families (harmonics, load modulation, rattle, bearing tones), so an encoder's learning
    can transfer.
    """

    name: str
    machines: tuple[str, ...]
    noise_categories: tuple[str, ...]


PRETRAIN_WORLD = World("pretrain", ("fan", "pump", "gearbox", "compressor", "conveyor"),
                       ("pink_hum", "brown_fan", "bursts", "clatter"))
EVAL_WORLD = World("eval", ("bearing", "blower", "slider", "spindle", "mixer", "turbine"),
                   ("hvac", "transformer", "hammering", "passby"))
WORLDS = {w.name: w for w in (PRETRAIN_WORLD, EVAL_WORLD)}


@dataclass(frozen=True)
class SynthClip:
    """One written machine clip and how it was made (the anomaly kind is not in the DCASE name)."""

    path: str
    machine: str
    section: str
    domain: str
    split: str
    label: str  # "normal" | "anomaly"
    attributes: tuple[tuple[str, str], ...]
    anomaly_kind: str | None = None  # "shift" | "rattle" | "missing" for anomalies
    index: int = 0  # the clip number in its name


@dataclass(frozen=True)
class SynthCorpus:
    """What `write_synthetic_corpus` wrote (or found already written), ready for ingestion."""

    root: str
    machine_root: str  # <root>/machines: a DCASE tree (dev_data/raw/<machine>/...)
    noise_root: str  # <root>/noise: <category>/*.wav + categories.yaml
    clips: tuple[SynthClip, ...]
    noise_files: tuple[tuple[str, str], ...]  # (category, path)
    written: bool  # False when an identical tree was already there
    counts: dict[str, int] = field(default_factory=dict)  # "<machine>/<split>/<domain>/<label>" -> n
    world: str = ""  # "pretrain" | "eval" when written by `write_world`


# --- machines -------------------------------------------------------------------------------------


def machine_clip(
    spec: MachineSpec,
    speed_rps: float,
    load: int,
    rng: np.random.Generator,
    *,
    num_samples: int,
    sample_rate_hz: int,
    timbre: np.ndarray,
    anomaly_kind: str | None = None,
) -> np.ndarray:
    """One clip of `spec` at `speed_rps` and `load`; `timbre` (H,) scales the harmonic amplitudes for
    the section. Normal clips vary in speed (+-1.5 %), slow speed wander, phases, harmonic amplitudes
    (+-10 %), noise and gain, so that a detector has to learn the attribute's sound, not one clip."""
    nyquist_hz = sample_rate_hz / 2
    t_s = np.arange(num_samples) / sample_rate_hz  # (T,)
    jitter = np.clip(1 + 0.1 * rng.standard_normal(timbre.size), 0.5, 1.5)
    amps = np.asarray(spec.harmonic_amps) * timbre * jitter  # (H,)
    f0_hz = spec.events_per_rev * speed_rps * (1 + 0.015 * rng.uniform(-1, 1))
    wander = 1 + 0.003 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t_s + rng.uniform(0, 2 * np.pi))  # (T,)
    k = np.arange(1, amps.size + 1, dtype=np.float64)  # harmonic numbers (H,)
    offsets_hz = np.zeros_like(k)

    if anomaly_kind == "shift":
        # Upper harmonics leave the harmonic grid (a bent shaft, a worn bearing race).
        # Towards mid-way between harmonics, and at least 20 Hz so a 25 ms analysis frame resolves it.
        offsets_hz[1:] = max(rng.uniform(0.3, 0.45) * f0_hz, 20.0)
    elif anomaly_kind == "missing":
        amps = amps.copy()
        amps[rng.choice(np.argsort(amps)[-2:])] = 0.0  # one of the two strongest
    elif anomaly_kind not in (None, "rattle"):
        raise ValueError(f"anomaly_kind={anomaly_kind!r}: expected None or one of {ANOMALY_KINDS}")

    # Harmonic series with phase 2 pi cumsum(f_inst) / sr. Harmonic k is Im(a_k e^(i phi_k) z^k) with
    # z = e^(i phase): powers by repeated complex multiplication, much cheaper than H calls to np.sin.
    z = np.exp(1j * 2 * np.pi * np.cumsum(f0_hz * wander) / sample_rate_hz)  # (T,)
    freqs_hz = k * f0_hz + offsets_hz  # (H,)
    weights = amps * (freqs_hz < 0.9 * nyquist_hz) * np.exp(1j * rng.uniform(0, 2 * np.pi, k.size))  # (H,)
    fundamental, upper, z_k = weights[0] * z, np.zeros_like(z), z
    for w in weights[1:]:
        z_k = z_k * z
        upper += w * z_k
    if offsets_hz[1:].any():  # every upper harmonic moved by the same offset
        upper *= np.exp(1j * 2 * np.pi * offsets_hz[1] * t_s)
    harmonic = (fundamental + upper).imag  # (T,)

    if spec.shaft_sidebands > 0:  # gear mesh modulated by the shaft rate -> sidebands at +-spd
        harmonic = harmonic * (1 + spec.shaft_sidebands * np.sin(2 * np.pi * speed_rps * t_s))
    harmonic = harmonic / np.sqrt(np.mean(harmonic**2))

    # Load: amplitude modulation, deeper and faster under more load.
    depth, rate_hz = 0.15 * load, 1.5 * load
    envelope = 1 + depth * np.sin(2 * np.pi * rate_hz * t_s + rng.uniform(0, 2 * np.pi))
    broadband = spec.noise_level * coloured_noise(rng, num_samples, spec.noise_exponent, sample_rate_hz)
    if spec.bearing_level > 0:  # bearing tones ride on the same load modulation as the harmonics
        harmonic = harmonic + spec.bearing_level * bearing_tones(
            rng, speed_rps * spec.bearing_ratio, min(spec.bearing_resonance_hz, 0.8 * nyquist_hz),
            num_samples=num_samples, sample_rate_hz=sample_rate_hz)
    x = envelope * harmonic + broadband

    if anomaly_kind == "rattle":
        # A loose part: clicks at 6-14 Hz, each a short ringing resonance at 2-4 kHz.
        onsets = impulse_train(rng, num_samples, rng.uniform(6, 14), sample_rate_hz, jitter=0.3)
        clicks = np.zeros(num_samples)
        clicks[onsets] = rng.uniform(0.5, 1.0, onsets.size)
        ring = decaying_resonance(min(rng.uniform(2000, 4000), 0.8 * nyquist_hz), 0.003, sample_rate_hz)
        x = x + rng.uniform(6, 10) * convolve_fft(clicks, ring)

    return normalise(x, RMS_LEVEL * rng.uniform(0.8, 1.25))


def _timbre(spec: MachineSpec, seed: int, machine_id: int, section: str) -> np.ndarray:
    """Per-section harmonic weights: sections are different units of the same machine type."""
    rng = np.random.default_rng([seed, 3, machine_id, int(section)])
    return rng.uniform(0.7, 1.3, len(spec.harmonic_amps))


def dcase_file_name(section: str, domain: str, split: str, label: str, index: int,
                    attributes: Sequence[tuple[str, str]]) -> str:
    """DCASE 2023 name: section_00_source_train_normal_0000_<k1>_<v1>_<k2>_<v2>.wav (or noAttribute)."""
    attr_string = "_".join(f"{k}_{v}" for k, v in attributes) or "noAttribute"
    return f"section_{section}_{domain}_{split}_{label}_{index:04d}_{attr_string}.wav"


def plan_machine_clips(raw_root: Path, spec: MachineSpec, section: str, *, train_source_per_attr: int,
                       train_target_per_attr: int, test_per_domain: int) -> list[SynthClip]:
    """Every clip of one machine section, before any audio exists.

    Training clips take each of the domain's (speed, load) combinations `per_attr` times; test
    clip i takes combination i (mod count) and, for anomalies, kind i (mod 3), so every kind occurs.
    """
    clips = []
    for domain, speeds, per_attr in (("source", spec.source_speeds, train_source_per_attr),
                                     ("target", spec.target_speeds, train_target_per_attr)):
        combos = [(("spd", s), ("ld", ld)) for s, ld in itertools.product(speeds, spec.loads)]
        entries = [("train", "normal", i, attrs, None)
                   for i, attrs in enumerate(c for c in combos for _ in range(per_attr))]
        for label in ("normal", "anomaly"):
            entries += [("test", label, i, combos[i % len(combos)],
                         ANOMALY_KINDS[i % len(ANOMALY_KINDS)] if label == "anomaly" else None)
                        for i in range(test_per_domain)]
        for split, label, index, attrs, kind in entries:
            path = raw_root / spec.name / split / dcase_file_name(section, domain, split, label, index, attrs)
            clips.append(SynthClip(str(path), spec.name, section, domain, split, label, attrs, kind, index))
    return clips


def _write_machine(clips: Sequence[SynthClip], *, seed: int, clip_s: float, sample_rate_hz: int) -> None:
    """Write the planned clips of one machine section and its attributes_<NN>.csv."""
    spec, section = MACHINES[clips[0].machine], clips[0].section
    machine_id = list(MACHINES).index(spec.name)
    timbre = _timbre(spec, seed, machine_id, section)
    rows = []
    for clip in clips:
        rng = np.random.default_rng([seed, 1, machine_id, int(section), DOMAINS.index(clip.domain),
                                     int(clip.split == "test"), int(clip.label == "anomaly"), clip.index])
        (speed, load) = (value for _, value in clip.attributes)
        x = machine_clip(spec, float(speed), int(load), rng, num_samples=int(round(clip_s * sample_rate_hz)),
                         sample_rate_hz=sample_rate_hz, timbre=timbre, anomaly_kind=clip.anomaly_kind)
        path = Path(clip.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, x.astype(np.float32), sample_rate_hz)
        rows.append([f"{spec.name}/{clip.split}/{path.name}"] + [v for pair in clip.attributes for v in pair])

    # attributes_<NN>.csv as in the DCASE 2023 dev set: file_name,d1p,d1v,d2p,d2v (train and test rows).
    num_attrs = max(len(r) - 1 for r in rows) // 2
    header = ["file_name"] + [c for i in range(1, num_attrs + 1) for c in (f"d{i}p", f"d{i}v")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(sorted(rows))
    _write_text(Path(clips[0].path).parents[1] / f"attributes_{section}.csv", buf.getvalue())


# --- the corpus -----------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    fsio.write_text(path, text)


def write_synthetic_corpus(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    machines: Sequence[str] = ("fan", "pump", "gearbox"),
    sections: Sequence[str] = ("00",),
    train_source_per_attr: int = 4,
    train_target_per_attr: int = 3,
    test_per_domain: int = 6,
    clip_s: float = 10.0,
    sample_rate_hz: int = 16000,
    noise_categories: Sequence[str] = PRETRAIN_WORLD.noise_categories,
    noise_clips_per_category: int = 6,
    noise_clip_s: float = 80.0,  # 8 disjoint 10 s segments per recording: eval sets need one per clip
    noise_spread: float = 1.0,  # how far one category's recordings vary (`spread_draw`); 1 = the generators' own
    force: bool = False,
) -> SynthCorpus:
    """Write the synthetic corpus under `root` and describe it.

    Default size per machine: 3 speeds x 2 loads x 4 = 24 source and 1 x 2 x 3 = 6 target training clips,
    `test_per_domain` normal and as many anomalous test clips per domain; noises are longer than a clip
    so that random segments exist. A tree written earlier with the same arguments (recorded in
    `<root>/synth.json`) is reused unless `force`; a different one is replaced. Folders this function
    did not write are never deleted.
    """
    unknown = [m for m in machines if m not in MACHINES]
    if unknown:
        raise ValueError(f"machines: unknown {unknown}; choose from {tuple(MACHINES)}")
    unknown = [c for c in noise_categories if c not in NOISES]
    if unknown:
        raise ValueError(f"noise_categories: unknown {unknown}; choose from {tuple(NOISES)}")
    bad_sections = [s for s in sections if not (len(s) == 2 and s.isdigit())]
    if bad_sections:
        raise ValueError(f"sections: {bad_sections} are not two-digit strings like '00'")
    sizes = dict(seed=seed, train_source_per_attr=train_source_per_attr,
                 train_target_per_attr=train_target_per_attr, test_per_domain=test_per_domain,
                 noise_clips_per_category=noise_clips_per_category)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    if clip_s < 1.0 or noise_clip_s < clip_s:
        raise ValueError(f"clip_s={clip_s}, noise_clip_s={noise_clip_s}: need 1 <= clip_s <= noise_clip_s")
    check_spread(noise_spread)  # before anything is written

    root = Path(root)
    machine_root, noise_root, stamp_path = root / "machines", root / "noise", root / "synth.json"
    params = dict(version=SYNTH_VERSION, seed=seed, machines=list(machines), sections=list(sections),
                  train_source_per_attr=train_source_per_attr, train_target_per_attr=train_target_per_attr,
                  test_per_domain=test_per_domain, clip_s=clip_s, sample_rate_hz=sample_rate_hz,
                  noise_categories=list(noise_categories), noise_clips_per_category=noise_clips_per_category,
                  noise_clip_s=noise_clip_s)
    if noise_spread != 1.0:  # recorded only when set, so the trees written before the setting stay valid
        params["noise_spread"] = noise_spread
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    ours = stamp is not None
    if not ours and any(p.exists() and any(p.iterdir()) for p in (machine_root, noise_root)):
        raise FileExistsError(f"{root}: holds machines/ or noise/ not written by write_synthetic_corpus "
                              f"(no synth.json); pick an empty folder")

    # The plan lists every file, so a reused tree can be checked for completeness.
    raw_root = machine_root / "dev_data" / "raw"
    groups = [plan_machine_clips(raw_root, MACHINES[name], section,
                                 train_source_per_attr=train_source_per_attr,
                                 train_target_per_attr=train_target_per_attr, test_per_domain=test_per_domain)
              for name in machines for section in sections]
    clips = [clip for group in groups for clip in group]
    noise_files = [(c, str(noise_root / c / f"{c}_{i:04d}.wav"))
                   for c in noise_categories for i in range(noise_clips_per_category)]

    reuse = (not force and ours and stamp.get("params") == params and stamp.get("complete") is True
             and all(os.path.exists(p) for p in [c.path for c in clips] + [p for _, p in noise_files]))
    if not reuse:
        if ours:  # replace our own earlier tree, so no stale clip survives a change of arguments
            for p in (machine_root, noise_root):
                shutil.rmtree(p, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        # Claim the folder first (so an interrupted run is still ours to replace), complete it last.
        _write_text(stamp_path, json.dumps({"params": params, "complete": False}, indent=2) + "\n")
        for group in groups:
            if group:
                _write_machine(group, seed=seed, clip_s=clip_s, sample_rate_hz=sample_rate_hz)
        noise_root.mkdir(parents=True, exist_ok=True)
        num_noise_samples = int(round(noise_clip_s * sample_rate_hz))
        for category in noise_categories:
            (noise_root / category).mkdir(exist_ok=True)
            for index in range(noise_clips_per_category):
                rng = np.random.default_rng([seed, 2, list(NOISES).index(category), index])
                x = noise_clip(category, rng, num_samples=num_noise_samples, sample_rate_hz=sample_rate_hz,
                               spread=noise_spread)
                write_audio(noise_root / category / f"{category}_{index:04d}.wav", x.astype(np.float32),
                            sample_rate_hz)
        categories = {c: {"stationary": NOISES[c].stationary} for c in noise_categories}
        _write_text(noise_root / "categories.yaml", yaml.safe_dump(categories, sort_keys=False))
        _write_text(stamp_path, json.dumps({"params": params, "complete": True}, indent=2) + "\n")

    counts = Counter(f"{c.machine}/{c.split}/{c.domain}/{c.label}" for c in clips)
    counts.update(f"noise/{c}" for c, _ in noise_files)
    return SynthCorpus(str(root), str(machine_root), str(noise_root), tuple(clips), tuple(noise_files),
                       written=not reuse, counts=dict(sorted(counts.items())))


# --- the two worlds of the paper's protocol -------------------------------------------------------

# Default sizes per world (all are knobs of `write_world`). Pre-training reads the train split (24 + 6
# clips per type); the evaluation world's defaults serve direct calls: a configured run sizes it from its
# `eval` settings (`eval_world_sizes`), so the sets hold what they ask for.
WORLD_SIZES: dict[str, dict] = {
    "pretrain": dict(train_source_per_attr=4, train_target_per_attr=3, test_per_domain=4,
                     noise_clips_per_category=6, noise_clip_s=80.0),
    "eval": dict(train_source_per_attr=3, train_target_per_attr=2, test_per_domain=6,
                 noise_clips_per_category=6, noise_clip_s=120.0),
}


def _held_out(n: int, share: float) -> int:
    """How many of n clips (or segments) a seeded share keeps for validation (as `evalsets.holdout_part`)."""
    return int(math.floor(share * n + 0.5)) if share > 0 else 0


def _with_holdout(n: int, share: float) -> int:
    """The fewest items whose part left after holding out `share` (rounded as `evalsets.holdout_part`) is >= n."""
    total = n if share <= 0 else math.ceil(n / (1.0 - share))
    while total - _held_out(total, share) < n:
        total += 1
    return total


def eval_world_sizes(*, source_refs: int, target_refs: int, test_normal: int, test_anomaly: int,
                     machines: Sequence[str] = EVAL_WORLD.machines,
                     noise_categories: Sequence[str] = EVAL_WORLD.noise_categories, clip_s: float = 10.0,
                     noise_clip_s: float = WORLD_SIZES["eval"]["noise_clip_s"],
                     validation_fraction: float = 0.0) -> dict:
    """`write_world("eval", ...)` sizes that hold the evaluation sets the `eval` settings ask for, never fewer.

    `validation_fraction` is the share of each (split, domain, label) group and of each factory's noise segments
    the sets hold out for validation (`eval.validation_fraction`): every group is written large enough that the
    test part left holds what is asked (ceil(n / (1 - share)), rounded as the split rounds), so the TEST sets get
    exactly their sizes and the validation sets the held-out share. Per machine type: at least that many source
    and target training clips (whole rounds of the domain's speed x load combinations, so attributes stay
    balanced), as many normal and anomalous test clips per domain; enough noise recordings that every clip of
    either split gets its own disjoint segment (`evalsets` assigns them without replacement), at least the
    default 6 per category.
    """
    share = validation_fraction
    per_attr = {}
    for domain, refs in (("source", source_refs), ("target", target_refs)):
        combos = min((len(getattr(MACHINES[m], f"{domain}_speeds")) * len(MACHINES[m].loads) for m in machines),
                     default=1)
        per_attr[domain] = -(-_with_holdout(refs, share) // combos)  # ceil: whole rounds
    tests = _with_holdout(max(test_normal, test_anomaly), share)
    # clips per set of each split, from the groups as written (the largest machine decides the references)
    groups = [(max(per_attr["source"] * len(MACHINES[m].source_speeds) * len(MACHINES[m].loads) for m in machines)
               if machines else 0, source_refs),
              (max(per_attr["target"] * len(MACHINES[m].target_speeds) * len(MACHINES[m].loads) for m in machines)
               if machines else 0, target_refs)]
    groups += [(tests, test_normal), (tests, test_anomaly)] * 2
    test_clips = len(machines) * sum(min(n - _held_out(n, share), asked) for n, asked in groups)
    val_clips = len(machines) * sum(min(_held_out(n, share), asked) for n, asked in groups)
    segments_per_recording = max(1, int(noise_clip_s // clip_s))
    stationary = sum(NOISES[c].stationary for c in noise_categories)
    per_factory = max(1, min(stationary, len(noise_categories) - stationary))  # the scarcer factory's categories
    recordings = WORLD_SIZES["eval"]["noise_clips_per_category"]
    while True:  # the scarcer factory's segments split as the sets split them: enough for both parts
        segments = recordings * segments_per_recording * per_factory
        held = _held_out(segments, share)
        if segments - held >= test_clips and held >= val_clips:
            break
        recordings += 1
    return dict(train_source_per_attr=per_attr["source"], train_target_per_attr=per_attr["target"],
                test_per_domain=tests, noise_clips_per_category=recordings, noise_clip_s=noise_clip_s)


def write_world(world: str, root: str | os.PathLike, *, seed: int = 0, machines: Sequence[str] | None = None,
                noise_categories: Sequence[str] | None = None, **sizes) -> SynthCorpus:
    """Write one world ("pretrain" or "eval", see `World`) under `root` (machines/ + noise/, as
    `write_synthetic_corpus`). `machines` / `noise_categories` pick a subset of the world's own; `sizes`
    override `WORLD_SIZES[world]` (train_source_per_attr, train_target_per_attr, test_per_domain,
    noise_clips_per_category, noise_clip_s, noise_spread, clip_s, sample_rate_hz, sections, force).

    Types and noise categories of the other world are refused, so the two worlds stay disjoint; the
    evaluation world needs a stationary (Factory A) and a non-stationary (Factory B) category.
    """
    if world not in WORLDS:
        raise ValueError(f"world={world!r}: expected one of {tuple(WORLDS)}")
    w = WORLDS[world]
    machines = tuple(w.machines if machines is None else machines)
    noise_categories = tuple(w.noise_categories if noise_categories is None else noise_categories)
    for what, chosen, own in (("machines", machines, w.machines),
                              ("noise_categories", noise_categories, w.noise_categories)):
        foreign = [x for x in chosen if x not in own]
        if foreign:
            raise ValueError(f"{what}: {foreign} are not in the {world} world; choose from {own} (the two "
                             "worlds share no machine type and no noise category)")
        if not chosen:
            raise ValueError(f"{what}: empty; choose from {own}")
    roles = {NOISES[c].stationary for c in noise_categories}
    if world == "eval" and roles != {True, False}:
        raise ValueError(f"noise_categories={list(noise_categories)}: the eval world needs a stationary "
                         "category (Factory A) and a non-stationary one (Factory B), e.g. "
                         f"{[c for c in w.noise_categories if NOISES[c].stationary][:1]} and "
                         f"{[c for c in w.noise_categories if not NOISES[c].stationary][:1]}")
    made = write_synthetic_corpus(root, seed=seed, machines=machines, noise_categories=noise_categories,
                                  **{**WORLD_SIZES[world], **sizes})
    return replace(made, world=world)


def write_pretrain_world(root: str | os.PathLike, **kwargs) -> SynthCorpus:
    """The pre-training world: 5 machine types with speed/load attributes, 4 noise classes (2 stationary,
    2 non-stationary), as `write_world("pretrain", root, **kwargs)`."""
    return write_world("pretrain", root, **kwargs)


def write_eval_world(root: str | os.PathLike, **kwargs) -> SynthCorpus:
    """The evaluation world: 3 other machine types with anomalies and source/target domains; stationary
    noise for Factory A and non-stationary noise for Factory B, all new recordings
    (`write_world("eval", root, **kwargs)`)."""
    return write_world("eval", root, **kwargs)
