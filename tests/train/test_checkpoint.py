"""Checkpoint state round trips bit-exactly (weights, optimizer, RNGs, digests); digests see one bit;
`seed_rngs` derives every worker RNG from (seed, rank)."""

from __future__ import annotations

import numpy as np
import torch

from retain_asd.models.beats import load_beats
from retain_asd.train.checkpoint import (
    load_train_state,
    read_digests,
    rng_state,
    save_train_state,
    seed_rngs,
    set_rng_state,
    state_digest,
    weights_digest,
)
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import compute_losses

from .rows import generators, loop_config, make_batch, make_models


def test_checkpoint_round_trip_is_bit_exact(init_path, tmp_path):
    student, _ = make_models(init_path)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-3)
    batch = make_batch(2)
    for _ in range(2):
        compute_losses(student, None, SpecAugment(8, 20, 2), batch, loop_config(objective="tagging"),
                       *generators()).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    spec_gen, np_rng = generators()
    save_train_state(tmp_path, rank=0, step=2, student=student.encoder, head=student.head, optimizer=optimizer,
                     data={"micro_batches_seen": 4}, rng=rng_state(spec_gen, np_rng))
    expected_next = (torch.rand(3), np_rng.random(3), torch.randint(0, 9, (4,), generator=spec_gen))

    fresh, _ = make_models(init_path)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=1e-3)
    state, rng = load_train_state(tmp_path, rank=0, student=fresh.encoder, head=fresh.head, optimizer=fresh_opt)
    assert state["step"] == 2 and state["data"] == {"micro_batches_seen": 4}
    assert state_digest(fresh.state_dict()) == state_digest(student.state_dict())
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    for index, tensors in saved["state"].items():
        for name, value in tensors.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    assert state_digest(saved) == state_digest(loaded) == state["optimizer_sha256"]
    gen2, rng2 = generators()
    set_rng_state(rng, gen2, rng2)
    got = (torch.rand(3), rng2.random(3), torch.randint(0, 9, (4,), generator=gen2))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected_next))
    student_digest = state_digest({"student": student.encoder.state_dict(), "head": student.head.state_dict()})
    assert read_digests(tmp_path) == {0: {"step": 2, "student": student_digest, "teacher": None,
                                          "teacher_initial": None, "node_id": None}}


def test_state_digest_sees_one_bit():
    a = {"w": torch.zeros(3), "s": [torch.ones(2, dtype=torch.int64)], "n": 1}
    b = {"w": torch.zeros(3), "s": [torch.ones(2, dtype=torch.int64)], "n": 1}
    assert state_digest(a) == state_digest(b)
    b["w"][1] = torch.finfo(torch.float32).tiny  # a single bit differs
    assert state_digest(a) != state_digest(b)
    assert state_digest({"w": torch.zeros(3)}) != state_digest({"w": torch.zeros(3, dtype=torch.float64)})


def test_seed_rngs_is_a_function_of_seed_and_rank(init_path):
    a, b, other = seed_rngs(3, 1), seed_rngs(3, 1), seed_rngs(3, 0)
    assert a.stream_seed == 3001 and other.stream_seed == 3000
    assert torch.equal(torch.randint(0, 99, (5,), generator=a.spec), torch.randint(0, 99, (5,), generator=b.spec))
    assert np.array_equal(a.np.random(4), b.np.random(4)) and not np.array_equal(b.np.random(4), other.np.random(4))
    seed_rngs(3, 1)
    first = torch.rand(3)
    seed_rngs(3, 1)
    assert torch.equal(torch.rand(3), first)  # torch's global RNG is seeded per rank too
    assert weights_digest(None) is None
    assert weights_digest(load_beats(init_path)) == state_digest(load_beats(init_path).state_dict())
