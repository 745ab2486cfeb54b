"""Eq. 3 mixing, dataset-level scaling, SNR samplers and noise segments."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain_asd.mixing import (
    DiscreteSNR,
    FixedSNR,
    MixingError,
    UniformSNR,
    dataset_noise_gain,
    dataset_snr_db,
    make_snr_sampler,
    mean_power,
    mix_at_dataset_snr,
    mix_at_snr,
    noise_segment,
    power,
)


def _snr_db(clean, noise):
    return 10 * math.log10(power(clean) / power(noise))


def _signal(rng, kind, length, amplitude, dtype):
    if kind == "gauss":
        x = rng.standard_normal(length)
    elif kind == "sine":
        x = np.sin(2 * np.pi * rng.uniform(50, 4000) * np.arange(length) / 16000 + rng.uniform(0, 6))
    else:  # sparse clicks: a few large samples in near silence, the hardest case for the power
        x = np.zeros(length)
        x[rng.integers(0, length, 3)] = rng.standard_normal(3) + 3.0
    return (amplitude * x).astype(dtype)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(16, 48000),
    clean_amplitude=st.floats(1e-4, 1e4),
    noise_amplitude=st.floats(1e-4, 1e4),
    snr_db=st.floats(-20.0, 40.0),
    clean_kind=st.sampled_from(["gauss", "sine", "clicks"]),
    noise_kind=st.sampled_from(["gauss", "sine", "clicks"]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_mix_at_snr_property(
    seed, length, clean_amplitude, noise_amplitude, snr_db, clean_kind, noise_kind, dtype
):
    rng = np.random.default_rng(seed)
    clean = _signal(rng, clean_kind, length, clean_amplitude, dtype)
    noise = _signal(rng, noise_kind, length, noise_amplitude, dtype)
    m = mix_at_snr(clean, noise, snr_db)

    assert abs(_snr_db(m.clean, m.noise) - snr_db) < 0.01
    assert power(m.noise) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(m.mixture, m.clean + m.noise)
    assert m.mixture.dtype == dtype and m.mixture.shape == (length,)
    # The components are the inputs times the returned gains.
    np.testing.assert_allclose(m.clean, m.a1 * clean.astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(m.noise, m.a2 * noise.astype(np.float64), rtol=1e-6)


def test_mix_at_snr_hand_computed():
    # x1 = [1, -1, 1, -1]: P1 = 1.  x2 = [2, 0, 0, 0]: P2 = 1.  snr 10 dB: R = 10.
    # a2 = 1/sqrt(1) = 1, a1 = sqrt(10 / 1) = sqrt(10).
    clean = np.array([1.0, -1.0, 1.0, -1.0])
    noise = np.array([2.0, 0.0, 0.0, 0.0])
    m = mix_at_snr(clean, noise, 10.0)
    assert m.a2 == 1.0
    assert m.a1 == pytest.approx(math.sqrt(10.0), rel=1e-15)
    s = math.sqrt(10.0)
    np.testing.assert_allclose(m.mixture, [s + 2.0, -s, s, -s], rtol=1e-15)

    # x2 = [4, 0, 0, 0]: P2 = 4, a2 = 0.5.  x1 = [3, 3, 3, 3]: P1 = 9.  snr 0 dB: a1 = 1/3.
    m = mix_at_snr(np.full(4, 3.0), np.array([4.0, 0, 0, 0]), 0.0)
    assert (m.a1, m.a2) == (pytest.approx(1 / 3, rel=1e-15), 0.5)
    np.testing.assert_allclose(m.clean, [1.0, 1.0, 1.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(m.noise, [2.0, 0.0, 0.0, 0.0], rtol=0)
    np.testing.assert_allclose(m.mixture, [3.0, 1.0, 1.0, 1.0], rtol=1e-15)
    assert m.snr_db == 0.0


def test_power_is_mean_square():
    assert power(np.array([1.0, -2.0, 3.0, 0.0], dtype=np.float32)) == pytest.approx(14 / 4, rel=0)


@pytest.mark.parametrize("which", ["clean", "noise"])
def test_silent_input_is_an_error_naming_the_input(which):
    x = np.ones(100, dtype=np.float32)
    z = np.zeros(100, dtype=np.float32)
    args = (z, x) if which == "clean" else (x, z)
    with pytest.raises(MixingError, match=rf"^{which}: silent"):
        mix_at_snr(*args, 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_an_error(bad):
    x = np.ones(10)
    y = np.ones(10)
    y[3] = bad
    with pytest.raises(MixingError, match="noise: contains NaN or Inf"):
        mix_at_snr(x, y, 0.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(MixingError, match=r"equal lengths.*noise_segment"):
        mix_at_snr(np.ones(10), np.ones(11), 0.0)


def test_non_finite_snr_is_an_error():
    with pytest.raises(MixingError, match="snr_db"):
        mix_at_snr(np.ones(10), np.ones(10), float("nan"))


# --- dataset-level scaling --------------------------------------------------------------------------


def test_dataset_noise_gain_hand_computed():
    # reference power 2, noise power 4 ([2, -2]), snr 3 dB -> g = sqrt(2 / (10^0.3 * 4)).
    g = dataset_noise_gain(np.array([2.0, -2.0]), reference_power=2.0, snr_db=3.0)
    assert g == pytest.approx(math.sqrt(2.0 / (10**0.3 * 4.0)), rel=1e-15)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 7.5])
def test_dataset_level_snr_equals_target(snr_db):
    rng = np.random.default_rng(0)
    # Clean clips of very different loudness; noises of different loudness and character.
    clean_set = [rng.standard_normal(1600) * a for a in (0.01, 0.1, 0.3, 1.0, 2.0)]
    noise_set = [rng.standard_normal(1600) * a for a in (5.0, 0.02, 1.0, 0.5, 0.1)]
    reference_power = mean_power(clean_set)
    pairs = zip(clean_set, noise_set, strict=True)
    mixes = [mix_at_dataset_snr(c, n, snr_db, reference_power) for c, n in pairs]

    set_snr_db = dataset_snr_db([m.clean for m in mixes], [m.noise for m in mixes])
    assert set_snr_db == pytest.approx(snr_db, abs=1e-9)
    # Clean is untouched; each scaled noise sits at reference_power / R; instances vary around the target.
    for m, c in zip(mixes, clean_set, strict=True):
        assert m.a1 == 1.0
        np.testing.assert_array_equal(m.clean, c)
        assert power(m.noise) == pytest.approx(reference_power / 10 ** (snr_db / 10), rel=1e-9)
    instance_snrs = [_snr_db(m.clean, m.noise) for m in mixes]
    assert max(instance_snrs) - min(instance_snrs) > 20.0


def test_dataset_level_errors():
    with pytest.raises(MixingError, match="reference_power"):
        dataset_noise_gain(np.ones(4), reference_power=0.0, snr_db=0.0)
    with pytest.raises(MixingError, match="noise: silent"):
        dataset_noise_gain(np.zeros(4), reference_power=1.0, snr_db=0.0)
    with pytest.raises(MixingError, match="clean: silent"):
        mix_at_dataset_snr(np.zeros(4), np.ones(4), 0.0, 1.0)
    with pytest.raises(MixingError, match="empty"):
        mean_power([])


# --- SNR samplers ------------------------------------------------------------------------------------


def test_samplers_are_deterministic_and_in_range():
    uniform = UniformSNR(-5.0, 5.0)
    a = uniform.sample(np.random.default_rng(7), 1000)
    b = uniform.sample(np.random.default_rng(7), 1000)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -5.0 and a.max() <= 5.0 and a.std() > 2.0  # spread, not a constant
    assert not np.array_equal(a, uniform.sample(np.random.default_rng(8), 1000))

    discrete = DiscreteSNR((-5, 0, 5))
    d = discrete.sample(np.random.default_rng(7), 3000)
    np.testing.assert_array_equal(d, discrete.sample(np.random.default_rng(7), 3000))
    assert set(np.unique(d)) == {-5.0, 0.0, 5.0}
    counts = np.unique(d, return_counts=True)[1]
    assert counts.min() > 900  # each value ~1000 of 3000

    assert FixedSNR(0.0).sample(np.random.default_rng(1)) == 0.0
    np.testing.assert_array_equal(FixedSNR(3.0).sample(np.random.default_rng(1), 4), [3.0] * 4)


def test_sampler_scalar_draws_follow_the_rng_stream():
    rng = np.random.default_rng(3)
    draws = [UniformSNR(-20.0, 40.0).sample(rng) for _ in range(5)]
    assert all(isinstance(x, float) for x in draws)
    np.testing.assert_array_equal(draws, np.random.default_rng(3).uniform(-20.0, 40.0, 5))


def test_make_snr_sampler():
    assert make_snr_sampler("fixed", snr_db=0.0) == FixedSNR(0.0)
    assert make_snr_sampler("uniform", low_db=-5, high_db=5) == UniformSNR(-5, 5)
    assert make_snr_sampler("discrete", values_db=[-5, 0]) == DiscreteSNR((-5.0, 0.0))
    with pytest.raises(ValueError, match=r"low_db=5.0 > high_db=-5.0"):
        make_snr_sampler("uniform", low_db=5.0, high_db=-5.0)
    with pytest.raises(ValueError, match=r"missing \['high_db'\]"):
        make_snr_sampler("uniform", low_db=5.0)
    with pytest.raises(ValueError, match=r"unexpected \['snr_db'\]"):
        make_snr_sampler("discrete", values_db=[0.0], snr_db=1.0)
    with pytest.raises(ValueError, match="kind='gauss'"):
        make_snr_sampler("gauss", snr_db=0.0)
    with pytest.raises(ValueError, match="values_db is empty"):
        make_snr_sampler("discrete", values_db=[])


# --- noise segments ---------------------------------------------------------------------------------


def test_noise_segment_crop_is_a_view_and_a_short_noise_loops():
    x = np.arange(100, dtype=np.float32)
    seg = noise_segment(x, 70, 30)
    np.testing.assert_array_equal(seg, np.arange(70, 100))
    assert np.shares_memory(seg, x)  # a crop is a view of the recording
    short = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(noise_segment(short, 3, 25), (3 + np.arange(25)) % 10)
    np.testing.assert_array_equal(noise_segment(short, 0, 10), short)
    with pytest.raises(ValueError, match="offset=71"):
        noise_segment(x, 71, 30)
    with pytest.raises(MixingError, match="empty"):
        noise_segment(np.zeros(0), 0, 5)


@pytest.mark.parametrize("snr_db", [-10.0, -5.0, 0.0, 3.3, 10.0])
def test_clean_level_keeps_the_clean_power_and_the_snr(snr_db):
    """mixing.level = "clean": one common gain on both parts, so the clean part is the clip itself (its power
    kept) and the SNR is exact; "unit_noise" is Eq. 3 as written (noise at unit power)."""
    from retain_asd.mixing import gains_at_snr, mix_batch_at_snr, row_powers

    rng = np.random.default_rng(7)
    clean = (0.08 * rng.standard_normal((4, 8000))).astype(np.float32)
    noise = (0.3 * rng.standard_normal((4, 8000))).astype(np.float32)
    for level in ("unit_noise", "clean"):
        one = mix_at_snr(clean[0], noise[0], snr_db, level=level)
        _, c, n = mix_batch_at_snr(clean, noise, np.full(4, snr_db), level=level)
        for part_c, part_n in ((one.clean, one.noise), (c, n)):
            ratio = np.mean(part_c.astype(np.float64) ** 2) / np.mean(part_n.astype(np.float64) ** 2)
            assert abs(10 * math.log10(ratio) - snr_db) < 0.01
        if level == "clean":
            np.testing.assert_array_equal(one.clean, clean[0])  # a1 = 1 exactly
            np.testing.assert_allclose(row_powers(c), row_powers(clean), rtol=1e-6)
        else:
            assert abs(power(one.noise) - 1.0) < 1e-5
    # int16 samples: the clean part is the clip as decoded (x / 32768), the SNR unchanged
    stored = np.round(clean * 32768).astype(np.int16)
    a1, a2 = gains_at_snr(row_powers(stored), row_powers(noise), np.full(4, snr_db), "test", "clean", 1 / 32768)
    np.testing.assert_allclose(a1, 1 / 32768, rtol=1e-7)
    part_c, part_n = stored.astype(np.float64) * a1[:, None], noise.astype(np.float64) * a2[:, None]
    np.testing.assert_allclose(10 * np.log10(np.mean(part_c**2, 1) / np.mean(part_n**2, 1)), snr_db, atol=0.01)
    with pytest.raises(ValueError, match="mixing level"):
        mix_at_snr(clean[0], noise[0], snr_db, level="loud")
