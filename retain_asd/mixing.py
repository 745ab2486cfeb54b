"""Mixing clean machine sound with noise at a target SNR (the paper's Eq. 3), and SNR samplers.

Eq. 3:  x = a1 x1 + a2 x2,  a2 = 1 / sqrt(P2),  a1 = sqrt(R / P1),  R = 10^(snr_db / 10),
so the noise component has unit power and a1^2 P1 / (a2^2 P2) = R.

The gains are computed in one place, `snr_gains`. Training mixes per instance (`mix_at_snr`, and its
batched float32 form `mix_batch_at_snr`; the stream computes the same gains from `row_powers` with
`gains_at_snr` and applies them on the consumer, `stream.form_audio`). Evaluation sets instead scale every
noise relative to the mean power of the machine's clean set (`mix_at_dataset_snr`), so the SNR holds on average over
the set while single clips keep their natural loudness differences.

Level (`mixing.level`, `LEVELS`): "unit_noise" is Eq. 3 as written (training mixtures near RMS 1 + 10^(SNR/20),
far louder than a clip as recorded); "clean" multiplies both parts by one common gain, 1 / a1, so the clean
part keeps its stored power and the noise follows at the same SNR (`level_gains`). The SNR is unchanged.

Numerics: powers and gains are computed in float64; the returned arrays have the inputs' float
dtype (float32 in, float32 out; float64 in, float64 out; integers give float64), and `mixture` is
computed as `clean + noise` in that dtype, so `mixture == clean + noise` holds exactly. Rounding to
float32 moves the component SNR by about 1e-6 dB.

Numpy only: this module is pure maths, called from Ray Data workers and tests alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retain_asd.choices import LEVELS, SNR_SAMPLERS


class MixingError(ValueError):
    """An input that cannot be mixed (silent, non-finite, mismatched)."""


@dataclass(frozen=True)
class Mixture:
    """Result of a mix. `clean` and `noise` are the scaled components: mixture == clean + noise."""

    mixture: np.ndarray  # (T,)
    clean: np.ndarray  # (T,) a1 * x1
    noise: np.ndarray  # (T,) a2 * x2
    a1: float  # gain applied to the clean input
    a2: float  # gain applied to the noise input
    snr_db: float  # the target SNR (instance-level for mix_at_snr, set-level for mix_at_dataset_snr)


def power(x: np.ndarray) -> float:
    """Mean square of `x`, accumulated in float64."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(np.square(x)))


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.result_type(*(a.dtype for a in arrays), np.float32)


def _checked_power(x: np.ndarray, name: str) -> float:
    """Power of a mixing input; a silent, empty or non-finite input is an error naming it."""
    if x.size == 0:
        raise MixingError(f"{name}: empty array")
    if not np.isfinite(x).all():
        raise MixingError(f"{name}: contains NaN or Inf; validate the clip (retain_asd.audio) first")
    p = power(x)
    if not p > 0.0:
        raise MixingError(f"{name}: silent (power 0); an SNR is undefined, drop this clip")
    if not np.isfinite(p):
        raise MixingError(f"{name}: power overflows float64; the samples are not audio-scaled")
    return p


def _check_pair(clean: np.ndarray, noise: np.ndarray) -> None:
    if clean.shape != noise.shape:
        raise MixingError(
            f"clean has shape {clean.shape}, noise {noise.shape}: equal lengths are required; "
            "cut the noise with noise_segment(noise, offset, len(clean))"
        )


def _check_snr(snr_db: float) -> float:
    snr_db = float(snr_db)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        ratio = np.power(10.0, snr_db / 10.0)
    if not (np.isfinite(snr_db) and np.isfinite(ratio) and ratio > 0.0):
        raise MixingError(f"snr_db={snr_db}: must be finite, with 10^(snr_db/10) a finite positive power ratio")
    return snr_db


def _scale(clean: np.ndarray, noise: np.ndarray, a1: float, a2: float, snr_db: float) -> Mixture:
    dtype = _out_dtype(clean, noise)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as a MixingError
        clean_part = (a1 * clean.astype(np.float64)).astype(dtype)
        noise_part = (a2 * noise.astype(np.float64)).astype(dtype)
        mixture = clean_part + noise_part
    if not (np.isfinite(a1) and np.isfinite(a2) and np.isfinite(mixture).all()):
        raise MixingError(f"gains a1={a1:g}, a2={a2:g} overflow {dtype}; the inputs are not audio-scaled")
    return Mixture(mixture, clean_part, noise_part, float(a1), float(a2), snr_db)


def snr_gains(clean_power, noise_power, snr_db):
    """Eq. 3 gains from the two powers: a1 = sqrt(R / P1), a2 = 1 / sqrt(P2), R = 10^(snr_db / 10).

    The one home of the formula: the training stream (`mix_batch_at_snr`), single mixes (`mix_at_snr`),
    the evaluation sets (`dataset_noise_gain`) and the SNR-mixup baseline (`objectives.snr_mixup`) all
    call it. Plain arithmetic, so floats, numpy arrays and torch tensors work alike (elementwise,
    broadcasting); the caller checks that the powers are positive and finite.
    """
    ratio = 10.0 ** (snr_db / 10.0)  # R
    return (ratio / clean_power) ** 0.5, 1.0 / noise_power ** 0.5


def level_gains(a1, a2, level: str = "unit_noise", clean_scale: float = 1.0):
    """Eq. 3's gains at a level (`LEVELS`): "unit_noise" returns them as they are; "clean" multiplies both by
    one common gain, clean_scale / a1, so the clean part is clean_scale x1 (its stored power, with
    clean_scale = 1 / 32768 for int16 samples) and the noise keeps the SNR. Elementwise like `snr_gains`."""
    if level == "unit_noise":
        return a1, a2
    if level != "clean":
        raise ValueError(f"mixing level {level!r}: expected one of {LEVELS}")
    common = clean_scale / a1
    return a1 * common, a2 * common


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float, level: str = "unit_noise") -> Mixture:
    """Eq. 3: noise to unit power, clean scaled so that P(a1 x1) / P(a2 x2) = 10^(snr_db/10); at `level`
    "clean" both parts are rescaled by one gain so the clean part keeps its power (`level_gains`)."""
    clean, noise = np.asarray(clean), np.asarray(noise)
    _check_pair(clean, noise)
    snr_db = _check_snr(snr_db)
    a1, a2 = level_gains(*snr_gains(_checked_power(clean, "clean"), _checked_power(noise, "noise"), snr_db), level)
    return _scale(clean, noise, a1, a2, snr_db)


def mix_batch_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: np.ndarray,
                     level: str = "unit_noise") -> tuple[np.ndarray, ...]:
    """Eq. 3 on a batch: (B, S) clean, (B, S) noise, (B,) snr_db -> mixture, a1*clean, a2*noise (float32).

    Same gains as `mix_at_snr` (`snr_gains`), but powers and scaling stay in float32 (gains in float64):
    converting 10 s clips to float64 and back costs more than the mixing itself. Gains agree with
    `mix_at_snr` to ~1e-6 relative. Raises `MixingError` for a silent or non-finite row, naming the row.
    """
    clean = np.asarray(clean, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if clean.shape != noise.shape or clean.ndim != 2:
        raise MixingError(f"mix_batch_at_snr: clean {clean.shape}, noise {noise.shape}: need equal (B, S)")
    a1, a2 = _batch_gains(clean, noise, snr_db, "mix_batch_at_snr", level)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as MixingError
        clean_part = clean * a1[:, None]  # (B, S)
        noise_part = noise * a2[:, None]
        mixture = clean_part + noise_part
    bad = ~np.isfinite(mixture).all(axis=1)
    if bad.any():
        raise MixingError(f"row(s) {np.flatnonzero(bad)[:5].tolist()}: the mixture is not finite "
                          "(the inputs are not audio-scaled)")
    return mixture, clean_part, noise_part


def row_powers(rows) -> np.ndarray:
    """(B,) float64 power of each (S,) row as one float32 BLAS dot, x @ x / S (20x faster than a float64
    reduction, relative error ~5e-7 = 2e-6 dB). Rows of another dtype (int16 samples as stored) are cast
    through one row-sized float32 scratch buffer, which stays in cache: no float copy of the clip is kept."""
    out = np.empty(len(rows), dtype=np.float64)
    scratch = None
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite power is reported by gains_at_snr
        for i, x in enumerate(rows):
            if x.dtype != np.float32:
                if scratch is None or scratch.shape != x.shape:
                    scratch = np.empty(x.shape, dtype=np.float32)
                np.copyto(scratch, x, casting="unsafe")
                x = scratch
            out[i] = float(x @ x) / max(x.shape[0], 1)
    return out


def gains_at_snr(p_clean: np.ndarray, p_noise: np.ndarray, snr_db, caller: str, level: str = "unit_noise",
                 clean_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 gains (`snr_gains`) from (B,) row powers at `level` (`level_gains`; `clean_scale`: what one stored
    sample unit is, 1 / 32768 for int16): (B,) float32 a1, a2; `MixingError` naming bad rows (a silent or
    non-finite clip or noise, an SNR or gain that is not finite)."""
    p_clean, p_noise = np.asarray(p_clean, dtype=np.float64), np.asarray(p_noise, dtype=np.float64)
    for name, p in (("clean", p_clean), ("noise", p_noise)):
        bad = ~(np.isfinite(p) & (p > 0))
        if bad.any():
            raise MixingError(f"{name} row(s) {np.flatnonzero(bad)[:5].tolist()}: silent or "
                              "non-finite; an SNR is undefined, drop these clips")
    snr_db = np.asarray(snr_db, dtype=np.float64)
    if snr_db.shape not in ((), (len(p_clean),)):
        raise MixingError(f"{caller}: snr_db {snr_db.shape}: need one SNR per row ({len(p_clean)},)")
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # reported below as MixingError
        a1, a2 = level_gains(*snr_gains(p_clean, p_noise, snr_db), level, clean_scale)  # (B,) float64 each
        a1 = np.broadcast_to(a1, p_clean.shape).astype(np.float32)
        a2 = np.asarray(a2).astype(np.float32)
    bad = ~(np.isfinite(a1) & (a1 > 0) & np.isfinite(a2))
    if bad.any():
        raise MixingError(f"row(s) {np.flatnonzero(bad)[:5].tolist()}: the SNR or the gains are not finite "
                          "(snr_db must be finite, the inputs audio-scaled)")
    return a1, a2


def _batch_gains(clean: np.ndarray, noise: np.ndarray, snr_db, caller: str,
                 level: str = "unit_noise") -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 gains of (B, S) float32 rows (`row_powers`, `gains_at_snr`)."""
    if clean.shape[1] == 0:
        raise MixingError(f"{caller}: empty rows (0 samples)")
    return gains_at_snr(row_powers(clean), row_powers(noise), snr_db, caller, level)


# --- dataset-level scaling (evaluation sets) -------------------------------------------------------


def mean_power(clips: Sequence[np.ndarray]) -> float:
    """Mean of the clips' powers: the reference power of a machine's clean set."""
    if len(clips) == 0:
        raise MixingError("mean_power of an empty set of clips")
    return float(np.mean([power(c) for c in clips]))


def dataset_noise_gain(noise: np.ndarray, reference_power: float, snr_db: float) -> float:
    """Gain g so that P(g * noise) = reference_power / R: Eq. 3 with P1 = reference_power, divided by a1.

    `snr_gains(reference_power, P_noise, snr_db)` gives a1, a2; the mixture a1 x1 + a2 x2 scaled by 1 / a1
    keeps the clean clip as it is and scales the noise by g = a2 / a1 = sqrt(reference_power / (R P_noise)).
    With reference_power the mean clean power of the machine's set, the set-level SNR equals snr_db.
    """
    if not (np.isfinite(reference_power) and reference_power > 0):
        raise MixingError(f"reference_power={reference_power}: must be a positive mean clean power")
    p_noise = _checked_power(np.asarray(noise), "noise")
    a1, a2 = snr_gains(float(reference_power), p_noise, _check_snr(snr_db))
    return float(a2 / a1)


def mix_at_dataset_snr(
    clean: np.ndarray, noise: np.ndarray, snr_db: float, reference_power: float
) -> Mixture:
    """Eval-set mix: clean unscaled (a1 = 1), noise scaled by dataset_noise_gain.

    The instance SNR is P(clean) / (reference_power / R): louder clips get a higher SNR, as in the
    reference evaluation sets; `Mixture.snr_db` holds the set-level target.
    """
    clean, noise = np.asarray(clean), np.asarray(noise)
    _check_pair(clean, noise)
    _checked_power(clean, "clean")
    a2 = dataset_noise_gain(noise, reference_power, snr_db)
    return _scale(clean, noise, 1.0, a2, _check_snr(snr_db))


def dataset_snr_db(clean_list: Sequence[np.ndarray], noise_list: Sequence[np.ndarray]) -> float:
    """Set-level SNR: 10 log10(mean clean power / mean noise power), noise as mixed (scaled)."""
    if len(clean_list) == 0 or len(noise_list) == 0:
        raise MixingError("dataset_snr_db needs at least one clean and one noise clip")
    p_noise = mean_power(noise_list)
    if not p_noise > 0:
        raise MixingError("noise set is silent (mean power 0)")
    return float(10.0 * np.log10(mean_power(clean_list) / p_noise))


# --- SNR samplers ----------------------------------------------------------------------------------
# Small seeded callables; the caller owns the np.random.Generator, so its state can be saved and a
# resumed run draws the same SNRs (as lhotse's mix transforms do).


@dataclass(frozen=True)
class FixedSNR:
    """Always `snr_db` (the paper's best Table-4 row is 0 dB fixed)."""

    snr_db: float

    def __post_init__(self):
        _check_snr(self.snr_db)

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        if size is None:
            return float(self.snr_db)
        return np.full(size, float(self.snr_db))


@dataclass(frozen=True)
class UniformSNR:
    """Uniform on [low_db, high_db] (paper default [-5, 5] dB)."""

    low_db: float
    high_db: float

    def __post_init__(self):
        _check_snr(self.low_db)
        _check_snr(self.high_db)
        if self.low_db > self.high_db:
            raise ValueError(f"UniformSNR: low_db={self.low_db} > high_db={self.high_db}; swap them")

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        x = rng.uniform(self.low_db, self.high_db, size)
        return float(x) if size is None else x


@dataclass(frozen=True)
class DiscreteSNR:
    """Uniform over a finite set of SNRs, e.g. (-5, 0, 5) dB."""

    values_db: tuple[float, ...]

    def __post_init__(self):
        values = tuple(float(v) for v in self.values_db)
        if not values:
            raise ValueError("DiscreteSNR: values_db is empty; give at least one SNR")
        for v in values:
            _check_snr(v)
        object.__setattr__(self, "values_db", values)

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        idx = rng.integers(0, len(self.values_db), size)
        values = np.asarray(self.values_db)
        return float(values[idx]) if size is None else values[idx]


SNRSampler = FixedSNR | UniformSNR | DiscreteSNR


def make_snr_sampler(
    kind: str,
    *,
    snr_db: float | None = None,
    low_db: float | None = None,
    high_db: float | None = None,
    values_db: Sequence[float] | None = None,
) -> SNRSampler:
    """Build a sampler from flat arguments; each kind needs exactly its own arguments."""
    given = {"snr_db": snr_db, "low_db": low_db, "high_db": high_db, "values_db": values_db}
    needed = {"fixed": ("snr_db",), "uniform": ("low_db", "high_db"), "discrete": ("values_db",)}
    if kind not in SNR_SAMPLERS:
        raise ValueError(f"SNR sampler kind={kind!r}: expected one of {SNR_SAMPLERS}")
    missing = [k for k in needed[kind] if given[k] is None]
    extra = [k for k, v in given.items() if v is not None and k not in needed[kind]]
    if missing or extra:
        raise ValueError(
            f"SNR sampler kind={kind!r} takes {needed[kind]}; missing {missing}, unexpected {extra}"
        )
    if kind == "fixed":
        return FixedSNR(snr_db)
    if kind == "uniform":
        return UniformSNR(low_db, high_db)
    return DiscreteSNR(tuple(values_db))


# --- noise segments --------------------------------------------------------------------------------


def noise_segment(recording: np.ndarray, offset: int, num_samples: int) -> np.ndarray:
    """`num_samples` of `recording` (T,) from `offset`: a view when it is long enough, else tiled (a copy)
    from `offset` round the recording, so a short noise still gives varied segments.

    The one cutter of the training stream and the evaluation sets; offsets come from
    `stream.noise_offsets` (training, random) and `evalsets.noise_segments` (evaluation, disjoint).
    """
    recording = np.asarray(recording)
    n = recording.shape[0]
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples}: must be positive")
    if n == 0:
        raise MixingError("noise_segment of an empty recording")
    if n >= num_samples:
        if not 0 <= offset <= n - num_samples:
            raise ValueError(f"offset={offset}: a {num_samples}-sample segment of a {n}-sample recording "
                             f"starts in 0..{n - num_samples}")
        return recording[offset : offset + num_samples]
    return recording[(offset + np.arange(num_samples)) % n]
