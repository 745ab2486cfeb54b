"""The student and its objective: losses against a hand-built reference, single terms unweighted, the mixup
baselines, SpecAugment on the student only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retain_asd.mixing import make_snr_sampler
from retain_asd.train import objectives as obj
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import compute_losses

from .rows import NUM_MACHINE, generators, loop_config, make_batch, make_models


def test_tagging_mixture_equals_eq7_built_by_hand(init_path):
    student, teacher = make_models(init_path)
    batch, config = make_batch(4), loop_config()
    losses = compute_losses(student, teacher, SpecAugment(8, 20, 0), batch, config, *generators())

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
    snr = compute_losses(student, teacher, SpecAugment(8, 20, 0), batch, loop_config(lam_mode="snr"), *generators())
    ratio = 10 ** (batch["snr_db"].double() / 10)
    lam = (ratio / (1 + ratio)).float().view(-1, 1, 1)  # (B, 1, 1)
    expected = ((hidden[1] - (lam * t_clean + (1 - lam) * t_noise)) ** 2).mean()
    torch.testing.assert_close(snr.mixture, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(snr.mixture, losses.mixture)


def test_every_objective_is_weighted_by_eq7_and_denoise_ignores_noise_classes(init_path):
    student, teacher = make_models(init_path)
    batch = make_batch(4)
    aug = SpecAugment(8, 20, 0)
    tagging = compute_losses(student, None, aug, batch, loop_config(objective="tagging"), *generators())
    both = compute_losses(student, teacher, aug, batch, loop_config(), *generators())
    assert tagging.mixture is None and torch.allclose(tagging.total, 0.7 * both.tagging)  # Eq. 7: alpha L_tag

    denoise = compute_losses(student, None, aug, batch, loop_config(objective="denoise"), *generators())
    flipped = dict(batch, label=batch["label"].clone())
    flipped["label"][:, NUM_MACHINE:] = 1 - flipped["label"][:, NUM_MACHINE:]  # change only noise columns
    denoise_flipped = compute_losses(student, None, aug, flipped, loop_config(objective="denoise"), *generators())
    assert torch.equal(denoise.total, denoise_flipped.total)
    assert not torch.equal(denoise.total, tagging.total)

    mixture_only = compute_losses(make_models(init_path, head=False, top_layer=2)[0], teacher, aug, batch,
                                  loop_config(objective="mixture"), *generators())
    assert mixture_only.tagging is None and torch.allclose(mixture_only.total, 1.3 * both.mixture)  # beta L_mix
    assert torch.allclose(denoise.total, 0.7 * denoise.denoise)  # the denoise baselines: alpha L_denoise


def test_mixup_baselines_mix_the_student_input(init_path):
    student, _ = make_models(init_path)
    batch, aug = make_batch(4), SpecAugment(8, 20, 0)
    plain = compute_losses(student, None, aug, batch, loop_config(objective="denoise"), *generators())
    linear = compute_losses(student, None, aug, batch, loop_config(objective="linear_mixup"), *generators())
    snr = compute_losses(student, None, aug, batch, loop_config(objective="snr_mixup"), *generators())
    # Reference for linear mixup: the same Beta draw (numpy rng seeded 2), rolled partner.
    ratio = obj.sample_mixup_ratio(np.random.default_rng(2), 4, 0.5)
    x, y = obj.linear_mixup(batch["mixture"], batch["mixture"].roll(1, 0), batch["label"],
                            batch["label"].roll(1, 0), ratio)
    logits = student.head(student.encoder.extract_layers(x)[0][-1].mean(1))
    torch.testing.assert_close(linear.total, 0.7 * obj.denoise_loss(logits, y, NUM_MACHINE), rtol=1e-5, atol=1e-6)
    assert len({plain.total.item(), linear.total.item(), snr.total.item()}) == 3
    # snr_mixup draws from the sampler the worker built once (default: made from cfg.mixing, fixed 0 dB here)
    same = compute_losses(student, None, aug, batch, loop_config(objective="snr_mixup"), *generators(),
                          make_snr_sampler(kind="fixed", snr_db=0.0))
    louder = compute_losses(student, None, aug, batch, loop_config(objective="snr_mixup"), *generators(),
                            make_snr_sampler(kind="fixed", snr_db=20.0))
    assert same.total.item() == snr.total.item() and louder.total.item() != snr.total.item()


def test_specaugment_masks_student_input_only(init_path):
    """The student's fbank is masked; the teacher hears exactly the clean / noise components either way."""
    student, teacher = make_models(init_path)
    batch = make_batch(2)
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()))
    extract = teacher.extract_layers

    def spy(waveforms, *args, **kwargs):
        out = extract(waveforms, *args, **kwargs)
        seen["teacher"].append((waveforms.clone(), out[0][-1].clone()))
        return out

    teacher.extract_layers = spy
    for num_masks in (0, 2):
        compute_losses(student, teacher, SpecAugment(8, 20, num_masks), batch, loop_config(), *generators())
    plain_fbank = student.encoder.preprocess(batch["mixture"])
    assert torch.equal(seen["student"][0], plain_fbank)  # no masks: the plain fbank
    masked = seen["student"][1]
    assert not torch.equal(masked, plain_fbank)
    changed = masked != plain_fbank
    assert torch.all(masked[changed] == 0.0)  # masked cells are set to 0 (the normalised mean)
    (wave_off, target_off), (wave_on, target_on) = seen["teacher"]
    assert torch.equal(wave_off, torch.cat([batch["clean"], batch["noise"]]))
    assert torch.equal(wave_on, wave_off) and torch.equal(target_on, target_off)


def test_init_checkpoint_from_an_object_store_is_read_through_its_filesystem(init_path, tmp_path, monkeypatch):
    """`init_fs` set (data.storage): the worker copies the init checkpoint through that filesystem into a temporary
    folder, bit-exact, and removes it once the models are built."""
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    from retain_asd.train.student import init_checkpoint_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node_tmp"))
    (tmp_path / "node_tmp").mkdir()
    remote = tmp_path / "bucket" / "run" / "init" / "init_beats.pt"
    remote.parent.mkdir(parents=True)
    shutil.copyfile(init_path, remote)
    with init_checkpoint_file(loop_config(init_checkpoint=str(remote), init_fs=pafs.LocalFileSystem())) as local:
        assert local.startswith(str(tmp_path / "node_tmp")) and open(local, "rb").read() == remote.read_bytes()
    assert not list((tmp_path / "node_tmp").iterdir())  # nothing stays behind
    with init_checkpoint_file(loop_config(init_checkpoint=str(remote))) as local:
        assert local == str(remote)  # a local path is used as it is
    with pytest.raises(FileNotFoundError, match="not in the object store"):
        with init_checkpoint_file(loop_config(init_checkpoint=str(tmp_path / "no.pt"), init_fs=pafs.LocalFileSystem())):
            pass


def test_losses_with_the_batched_fbank_equal_the_per_clip_front_end(init_path, monkeypatch):
    """Every loss of a step (SpecAugment on) with the batched fbank against torchaudio's per-clip loop, and the
    gradients they give: equal to 1e-5 relative (the two fbanks agree to float rounding, tests/models/test_fbank.py)."""
    from retain_asd.models import beats
    from retain_asd.models.fbank import kaldi_fbank_per_clip

    def step(student, teacher):
        config = loop_config(specaugment=True, num_masks=1)
        losses = compute_losses(student, teacher, SpecAugment(8, 20, 1), make_batch(4), config, *generators())
        losses.total.backward()
        return losses.as_floats(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    batched, batched_grad = step(*make_models(init_path))
    monkeypatch.setattr(beats, "kaldi_fbank", kaldi_fbank_per_clip)
    per_clip, per_clip_grad = step(*make_models(init_path))
    assert batched.keys() == per_clip.keys() == {"loss", "loss_tagging", "loss_mixture"}
    for name, value in batched.items():
        assert value == pytest.approx(per_clip[name], rel=1e-5), name
    torch.testing.assert_close(batched_grad, per_clip_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_student_and_teacher_give_the_eager_losses(init_path, monkeypatch):
    """`train.compile`: torch.compile of student and teacher (`compile_models`) on the CPU, tiny size: the losses
    and gradients of a step equal eager ones to 1e-4 relative (the compiled kernels fuse and reorder float sums)."""
    import torch._inductor.config

    from retain_asd.train.student import compile_models

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 2)  # a pool of 2: 60 s here against 79 s for 1
    torch._dynamo.reset()

    def step(student, teacher):
        losses = compute_losses(student, teacher, SpecAugment(8, 20, 0), make_batch(2), loop_config(), *generators())
        losses.total.backward()
        return losses.as_floats(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    eager, eager_grad = step(*make_models(init_path))
    compiled, compiled_grad = step(*compile_models(*make_models(init_path)))
    for name, value in eager.items():
        assert compiled[name] == pytest.approx(value, rel=1e-4), name
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
