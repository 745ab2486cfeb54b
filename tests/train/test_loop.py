"""Training loop: losses against a hand-built reference, SpecAugment on the student only, checkpoint state
round trips bit-exactly, and one real 2-worker DDP fit (gloo, tiny encoder) on a fixed set of rows."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from retain_asd.config import load_config
from retain_asd.corpus.labels import LabelVocab
from retain_asd.models.beats import beats_tiny, load_beats, write_random_checkpoint
from retain_asd.train import objectives as obj
from retain_asd.train.checkpoint import (
    load_train_state,
    read_digests,
    read_train_state,
    rng_state,
    save_train_state,
    set_rng_state,
    state_digest,
)
from retain_asd.train.loop_config import LoopConfig
from retain_asd.train.schedule import cosine_schedule
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import Student, compute_losses

NUM_MACHINE, NUM_NOISE = 3, 2
CLIP_SAMPLES = 32000  # 2 s: 198 fbank frames, a (12, 8) patch grid


def _rows(n: int, seed: int = 0) -> list[dict]:
    """n mixed rows like the stream's: Eq. 3 at a per-row SNR, multi-hot machine + noise label."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / 16000
    rows = []
    for i in range(n):
        m, k = i % NUM_MACHINE, i % NUM_NOISE
        clean = (np.sin(2 * np.pi * (200 + 150 * m) * t) + 0.05 * rng.standard_normal(CLIP_SAMPLES))
        noise = rng.standard_normal(CLIP_SAMPLES) * (1 + k)
        snr_db = float(rng.uniform(-5, 5))
        a2 = 1 / np.sqrt(np.mean(noise**2))
        a1 = np.sqrt(10 ** (snr_db / 10) / np.mean(clean**2))
        label = np.zeros(NUM_MACHINE + NUM_NOISE, np.float32)
        label[m] = label[NUM_MACHINE + k] = 1.0
        rows.append({"mixture": (a1 * clean + a2 * noise).astype(np.float32),
                     "clean": (a1 * clean).astype(np.float32), "noise": (a2 * noise).astype(np.float32),
                     "label": label, "machine_idx": np.int64(m), "noise_idx": np.int64(k),
                     "snr_db": np.float32(snr_db)})
    return rows


def _batch(n: int, seed: int = 0) -> dict:
    rows = _rows(n, seed)
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("mixture", "clean", "noise", "label",
                                                                           "snr_db")}


BASE = LoopConfig(
    init_checkpoint="unused.pt", layerdrop=False, grad_decay=False, num_classes=NUM_MACHINE + NUM_NOISE,
    num_machine_classes=NUM_MACHINE, objective="tagging_mixture", alpha=0.7, beta=1.3, lam=0.5, lam_mode="fixed",
    align_layer=2, teacher_inputs="scaled", mixup_beta=0.5, snr_sampler={"kind": "fixed", "snr_db": 0.0},
    specaugment=False, freq_mask_bins=8, time_mask_frames=20, num_masks=0, lr=1e-3, weight_decay=1e-3,
    warmup_steps=0, total_steps=2, batch_size_per_worker=2, grad_accum=1, grad_clip=0.0, log_every=1,
    checkpoint_every=1, seed=0)


def _config(**over) -> LoopConfig:
    return dataclasses.replace(BASE, **over)


@pytest.fixture(scope="module")
def init_path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("init") / "init_beats.pt", beats_tiny(), seed=3)


def _models(init_path, head=True, top_layer=3):
    torch.manual_seed(0)
    student = Student(load_beats(init_path), NUM_MACHINE + NUM_NOISE if head else None, top_layer).train()
    return student, load_beats(init_path).freeze()


def _gens():
    return torch.Generator().manual_seed(1), np.random.default_rng(2)


def test_tagging_mixture_equals_eq7_built_by_hand(init_path):
    student, teacher = _models(init_path)
    batch, config = _batch(4), _config()
    losses = compute_losses(student, teacher, SpecAugment(8, 20, 0), batch, config, *_gens())

    # Reference straight from the BEATs API and Eqs. 4-7 (no SpecAugment).
    hidden, _ = student.encoder.extract_layers(batch["mixture"])  # 3 blocks
    logits = student.head(hidden[-1].mean(dim=1))  # pooled encoder output -> (B, C + N)
    tagging = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
    t_clean = teacher.extract_layers(batch["clean"], layers=2)[0][1]
    t_noise = teacher.extract_layers(batch["noise"], layers=2)[0][1]
    mixture = ((hidden[1] - (0.5 * t_clean + 0.5 * t_noise)) ** 2).mean()
    torch.testing.assert_close(losses.tagging, tagging, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.mixture, mixture, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses.total, 0.7 * tagging + 1.3 * mixture, rtol=1e-5, atol=1e-6)
    assert math.isfinite(losses.total.item()) and losses.mixture.item() > 0

    # lam_mode "snr": one lambda per sample, R / (1 + R), weighting teacher(clean) in Eq. 5.
    snr = compute_losses(student, teacher, SpecAugment(8, 20, 0), batch, _config(lam_mode="snr"), *_gens())
    ratio = 10 ** (batch["snr_db"].double() / 10)
    lam = (ratio / (1 + ratio)).float().view(-1, 1, 1)  # (B, 1, 1)
    expected = ((hidden[1] - (lam * t_clean + (1 - lam) * t_noise)) ** 2).mean()
    torch.testing.assert_close(snr.mixture, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(snr.mixture, losses.mixture)


def test_single_term_objectives_are_unweighted_and_denoise_ignores_noise_classes(init_path):
    student, teacher = _models(init_path)
    batch = _batch(4)
    aug = SpecAugment(8, 20, 0)
    tagging = compute_losses(student, None, aug, batch, _config(objective="tagging"), *_gens())
    both = compute_losses(student, teacher, aug, batch, _config(), *_gens())
    assert tagging.mixture is None and torch.equal(tagging.total, both.tagging)  # alpha only in Eq. 7

    denoise = compute_losses(student, None, aug, batch, _config(objective="denoise"), *_gens())
    flipped = dict(batch, label=batch["label"].clone())
    flipped["label"][:, NUM_MACHINE:] = 1 - flipped["label"][:, NUM_MACHINE:]  # change only noise columns
    denoise_flipped = compute_losses(student, None, aug, flipped, _config(objective="denoise"), *_gens())
    assert torch.equal(denoise.total, denoise_flipped.total)
    assert not torch.equal(denoise.total, tagging.total)

    mixture_only = compute_losses(_models(init_path, head=False, top_layer=2)[0], teacher, aug, batch,
                                  _config(objective="mixture"), *_gens())
    assert mixture_only.tagging is None and torch.equal(mixture_only.total, both.mixture)


def test_mixup_baselines_mix_the_student_input(init_path):
    student, _ = _models(init_path)
    batch, aug = _batch(4), SpecAugment(8, 20, 0)
    plain = compute_losses(student, None, aug, batch, _config(objective="denoise"), *_gens())
    linear = compute_losses(student, None, aug, batch, _config(objective="linear_mixup"), *_gens())
    snr = compute_losses(student, None, aug, batch, _config(objective="snr_mixup"), *_gens())
    # Reference for linear mixup: the same Beta draw (numpy rng seeded 2), rolled partner.
    ratio = obj.sample_mixup_ratio(np.random.default_rng(2), 4, 0.5)
    x, y = obj.linear_mixup(batch["mixture"], batch["mixture"].roll(1, 0), batch["label"],
                            batch["label"].roll(1, 0), ratio)
    logits = student.head(student.encoder.extract_layers(x)[0][-1].mean(1))
    torch.testing.assert_close(linear.total, obj.denoise_loss(logits, y, NUM_MACHINE), rtol=1e-5, atol=1e-6)
    assert len({plain.total.item(), linear.total.item(), snr.total.item()}) == 3


def test_specaugment_masks_student_input_only(init_path):
    """The student's fbank is masked; the teacher hears exactly the clean / noise components either way."""
    student, teacher = _models(init_path)
    batch = _batch(2)
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()))
    extract = teacher.extract_layers

    def spy(waveforms, *args, **kwargs):
        out = extract(waveforms, *args, **kwargs)
        seen["teacher"].append((waveforms.clone(), out[0][-1].clone()))
        return out

    teacher.extract_layers = spy
    for num_masks in (0, 2):
        compute_losses(student, teacher, SpecAugment(8, 20, num_masks), batch, _config(), *_gens())
    plain_fbank = student.encoder.preprocess(batch["mixture"])
    assert torch.equal(seen["student"][0], plain_fbank)  # no masks: the plain fbank
    masked = seen["student"][1]
    assert not torch.equal(masked, plain_fbank)
    changed = masked != plain_fbank
    assert torch.all(masked[changed] == 0.0)  # masked cells are set to 0 (the normalised mean)
    (wave_off, target_off), (wave_on, target_on) = seen["teacher"]
    assert torch.equal(wave_off, torch.cat([batch["clean"], batch["noise"]]))
    assert torch.equal(wave_on, wave_off) and torch.equal(target_on, target_off)


def test_checkpoint_round_trip_is_bit_exact(init_path, tmp_path):
    student, _ = _models(init_path)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-3)
    batch = _batch(2)
    for _ in range(2):
        compute_losses(student, None, SpecAugment(8, 20, 2), batch, _config(objective="tagging"),
                       *_gens()).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    spec_gen, np_rng = _gens()
    save_train_state(tmp_path, rank=0, step=2, student=student.encoder, head=student.head, optimizer=optimizer,
                     data={"micro_batches_seen": 4}, rng=rng_state(spec_gen, np_rng))
    expected_next = (torch.rand(3), np_rng.random(3), torch.randint(0, 9, (4,), generator=spec_gen))

    fresh, _ = _models(init_path)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=1e-3)
    state, rng = load_train_state(tmp_path, rank=0, student=fresh.encoder, head=fresh.head, optimizer=fresh_opt)
    assert state["step"] == 2 and state["data"] == {"micro_batches_seen": 4}
    assert state_digest(fresh.state_dict()) == state_digest(student.state_dict())
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    for index, tensors in saved["state"].items():
        for name, value in tensors.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    assert state_digest(saved) == state_digest(loaded) == state["optimizer_sha256"]
    gen2, rng2 = _gens()
    set_rng_state(rng, gen2, rng2)
    got = (torch.rand(3), rng2.random(3), torch.randint(0, 9, (4,), generator=gen2))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected_next))
    student_digest = state_digest({"student": student.encoder.state_dict(), "head": student.head.state_dict()})
    assert read_digests(tmp_path) == {0: {"step": 2, "student": student_digest, "teacher": None,
                                          "teacher_initial": None}}


def test_state_digest_sees_one_bit():
    a = {"w": torch.zeros(3), "s": [torch.ones(2, dtype=torch.int64)], "n": 1}
    b = {"w": torch.zeros(3), "s": [torch.ones(2, dtype=torch.int64)], "n": 1}
    assert state_digest(a) == state_digest(b)
    b["w"][1] = torch.finfo(torch.float32).tiny  # a single bit differs
    assert state_digest(a) != state_digest(b)
    assert state_digest({"w": torch.zeros(3)}) != state_digest({"w": torch.zeros(3, dtype=torch.float64)})


# ------------------------------------------------------------------------------------------------ real DDP
def test_ddp_two_workers_fixed_rows(ray_local, tmp_path, init_path):
    """2 gloo workers, tiny encoder, 4 fixed rows: losses finite and falling, teacher untouched, ranks equal."""
    import ray.data

    from retain_asd.train.launch import build_trainer, loop_config_from, read_metrics

    cfg = load_config("smoke", overrides=[
        "name=ddp_fixed", "train.total_steps=12", "train.warmup_steps=0", "train.lr=1e-3", "train.log_every=2",
        "train.checkpoint_every=6", "train.batch_size=4", "train.grad_accum=2", "train.grad_clip=1.0",
        "objective.freq_mask_bins=8", "objective.time_mask_frames=20"])
    labels = tmp_path / "labels.json"
    LabelVocab(("fan_a", "fan_b", "pump_a"), ("noise_hum", "noise_tools")).to_json(labels)
    config = loop_config_from(cfg, labels, init_path)
    assert config.batch_size_per_worker == 2 and config.align_layer == 2
    rows = _rows(4) * (12 * 2 * 4 // 4)  # exactly the rows 12 steps x 2 micro-batches x 4 need
    result = build_trainer(cfg, config, ray.data.from_items(rows), tmp_path / "out").fit()

    history = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in history] == [2, 4, 6, 8, 10, 12]
    lr = cosine_schedule(1e-3, 12, 0)
    assert [m["lr"] for m in history] == [float(lr[s - 1]) for s in (2, 4, 6, 8, 10, 12)]
    for key in ("loss", "loss_tagging", "loss_mixture", "grad_norm", "clips_per_s"):
        assert all(math.isfinite(m[key]) for m in history), key
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]  # measured: 0.92 -> 0.69
    assert history[-1]["loss_mixture"] < 0.5 * history[0]["loss_mixture"]  # measured: 0.26 -> 0.04

    with result.checkpoint.as_directory() as directory:
        digests = read_digests(directory)
        state = read_train_state(directory)
    assert sorted(digests) == [0, 1] and state["step"] == 12
    assert digests[0]["student"] == digests[1]["student"]  # DDP kept the ranks identical
    initial = state_digest(load_beats(init_path).state_dict())
    for rank in (0, 1):
        assert digests[rank]["teacher"] == digests[rank]["teacher_initial"] == initial
    assert state_digest(state["student"]) != initial  # the student did move
    assert all(int(s["step"]) == 12 for s in state["optimizer"]["state"].values())
