"""Eq. 3 has one home, `mixing.snr_gains`: the training stream, the evaluation sets and the SNR-mixup
baseline all produce exactly its gains (numpy float64, float32 and torch inputs alike)."""

from __future__ import annotations

import numpy as np
import torch

from retain_asd import mixing
from retain_asd.train import objectives as obj


def _clips(seed: int, batch: int = 4, samples: int = 3000):
    rng = np.random.default_rng(seed)
    clean = (rng.normal(size=(batch, samples)) * rng.uniform(0.01, 2.0, (batch, 1))).astype(np.float32)
    noise = (rng.normal(size=(batch, samples)) * rng.uniform(0.01, 2.0, (batch, 1))).astype(np.float32)
    return clean, noise, np.asarray([-7.5, 0.0, 3.0, 20.0][:batch])


def test_formula_on_numbers():
    a1, a2 = mixing.snr_gains(4.0, 0.25, 10.0)  # R = 10
    assert abs(a1 - np.sqrt(2.5)) < 1e-15 and a2 == 2.0
    a1, a2 = mixing.snr_gains(np.asarray([1.0, 2.0]), np.asarray([4.0, 1.0]), np.asarray([0.0, 3.0]))
    np.testing.assert_allclose(a1**2 * np.asarray([1.0, 2.0]) / (a2**2 * np.asarray([4.0, 1.0])),
                               [1.0, 10**0.3], rtol=1e-12)  # a1^2 P1 / (a2^2 P2) = R


def test_stream_mixes_with_the_eq3_gains():
    """The stream's tasks compute a1, a2 with `row_powers` + `gains_at_snr` (int16 clips as stored) and the
    consumer applies them (`stream.form_audio`): exactly `snr_gains` of the float32 dot powers, and the same
    products as the batched form `mix_batch_at_snr`."""
    from retain_asd import stream

    clean, noise, snr_db = _clips(0)
    mixture, clean_part, noise_part = mixing.mix_batch_at_snr(clean, noise, snr_db)
    p_clean = np.asarray([float(x @ x) for x in clean]) / clean.shape[1]
    p_noise = np.asarray([float(x @ x) for x in noise]) / noise.shape[1]
    a1, a2 = mixing.snr_gains(p_clean, p_noise, snr_db)
    np.testing.assert_array_equal(clean_part, clean * a1.astype(np.float32)[:, None])
    np.testing.assert_array_equal(noise_part, noise * a2.astype(np.float32)[:, None])
    np.testing.assert_array_equal(mixture, clean_part + noise_part)
    g1, g2 = mixing.gains_at_snr(mixing.row_powers(clean), mixing.row_powers(list(noise)), snr_db, "test")
    np.testing.assert_array_equal(g1, a1.astype(np.float32))
    np.testing.assert_array_equal(g2, a2.astype(np.float32))
    stored = np.round(clean * 1000).astype(np.int16)  # int16 rows: the power of the stored samples as float32
    p16 = np.asarray([float(x @ x) for x in stored.astype(np.float32)]) / stored.shape[1]
    np.testing.assert_array_equal(mixing.row_powers(stored), p16)
    bank = stream.NoiseBank(audio=noise.reshape(-1), starts=np.arange(len(noise)) * noise.shape[1],
                            lengths=np.full(len(noise), noise.shape[1]), noise_ids=np.asarray(["a", "b", "c", "d"]),
                            noise_idx=np.zeros(len(noise), np.int64))
    rows = {"clean_stored": clean, "clean_gain": g1, "noise_gain": g2, "noise_rec": np.arange(len(noise)),
            "noise_offset": np.zeros(len(noise), np.int64)}
    for got, want in zip(stream.form_audio(rows, bank), (clean_part, noise_part, mixture), strict=True):
        np.testing.assert_array_equal(got, want)
    for b in range(len(clean)):  # the single-clip form gives the same gains (float64 powers)
        single = mixing.mix_at_snr(clean[b], noise[b], float(snr_db[b]))
        g1, g2 = mixing.snr_gains(mixing.power(clean[b]), mixing.power(noise[b]), float(snr_db[b]))
        assert (single.a1, single.a2) == (float(g1), float(g2))
        np.testing.assert_allclose([single.a1, single.a2], [a1[b], a2[b]], rtol=1e-6)


def test_eval_sets_scale_noise_by_the_eq3_gains():
    """Eval sets (`evalsets._recipes`) store `dataset_noise_gain`: Eq. 3 at P1 = the set's mean clean power,
    the mixture divided by a1 (the clean clip keeps its loudness)."""
    clean, noise, snr_db = _clips(1)
    reference_power = float(np.mean([mixing.power(c) for c in clean]))
    for b in range(len(noise)):
        a1, a2 = mixing.snr_gains(reference_power, mixing.power(noise[b]), float(snr_db[b]))
        gain = mixing.dataset_noise_gain(noise[b], reference_power, float(snr_db[b]))
        assert gain == float(a2 / a1)
        np.testing.assert_allclose(gain**2 * mixing.power(noise[b]), reference_power / 10 ** (snr_db[b] / 10),
                                   rtol=1e-9)


def test_snr_mixup_mixes_with_the_eq3_gains():
    clean, noise, snr_db = _clips(2)
    mix1, mix2 = torch.from_numpy(clean), torch.from_numpy(noise)
    y1, y2 = torch.eye(4)[:, :3], torch.eye(4).roll(1, 0)[:, :3]
    x, y = obj.snr_mixup(mix1, mix2, y1, y2, torch.from_numpy(snr_db).float())
    p1, p2 = mix1.square().mean(dim=1), mix2.square().mean(dim=1)
    a1, a2 = mixing.snr_gains(p1, p2, torch.from_numpy(snr_db).float())
    torch.testing.assert_close(x, a1[:, None] * mix1 + a2[:, None] * mix2, rtol=0, atol=0)
    assert torch.equal(y, torch.maximum(y1, y2))
    # the same gains as the numpy stream up to float32 rounding of the powers
    np.testing.assert_allclose(a1.numpy(), mixing.snr_gains(p1.double().numpy(), p2.double().numpy(), snr_db)[0],
                               rtol=1e-5)
