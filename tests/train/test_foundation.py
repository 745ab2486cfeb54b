"""The stand-in foundation encoder: cache by settings hash, loss goes down, official layout, deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retain_asd.config import ConfigError, FoundationConfig, from_dict
from retain_asd.corpus.generic import FAMILIES, generic_batch, generic_clip
from retain_asd.models.beats import load_beats
from retain_asd.train import foundation
from retain_asd.train.foundation import (
    foundation_beats_config,
    foundation_encoder,
    foundation_path,
    patch_targets,
    random_projection_labels,
    random_token_mask,
    train_foundation,
)

# 2 blocks x 32 wide, 0.5 s clips (3 x 8 tokens): a few steps take about a second.
TINY = FoundationConfig(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                        patch_embed_dim=16, conv_pos=4, conv_pos_groups=4, clip_s=0.5, steps=3, batch_size=4,
                        warmup_steps=1, lr=2e-3, objective="masked_tagging")  # both heads


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_generic_clips_are_clean_bounded_and_seeded():
    for family in FAMILIES:
        x = generic_clip(family, np.random.default_rng([0, 1]), num_samples=8000)
        assert x.shape == (8000,) and np.isfinite(x).all()
        assert 0.02 < np.sqrt(np.mean(x**2)) < 0.2 and np.abs(x).max() <= 0.99
    a, la = generic_batch(3, 7, 6, num_samples=8000)
    b, lb = generic_batch(3, 7, 6, num_samples=8000)
    c, _ = generic_batch(3, 8, 6, num_samples=8000)
    assert a.dtype == np.float32 and np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="family 'fan'"):
        generic_clip("fan", np.random.default_rng(0), num_samples=8000)


def test_patch_targets_follow_token_order_and_mask_count():
    fbank = torch.arange(2 * 50 * 128, dtype=torch.float32).reshape(2, 50, 128)
    target = patch_targets(fbank, (3, 8), 16)  # (B, T*F, 256)
    assert target.shape == (2, 24, 256)
    raw = fbank[1, 16:32, 32:48].reshape(-1)  # patch t=1, f=2 -> token 1*8 + 2
    assert torch.allclose(target[1, 10], (raw - raw.mean()) / (raw.var() + 1e-6).sqrt())
    mask = random_token_mask(5, 24, 0.75, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [18] * 5 and not torch.equal(mask[0], mask[1])


def test_cache_hit_returns_the_same_file_without_training(tmp_path, monkeypatch):
    calls = []
    real = foundation.train_foundation

    def counting(settings, **kwargs):
        calls.append(settings)
        return real(settings, **kwargs)

    monkeypatch.setattr(foundation, "train_foundation", counting)
    first = foundation_encoder(TINY, tmp_path)
    stat, data = first.stat(), first.read_bytes()
    second = foundation_encoder(TINY, tmp_path)
    assert second == first == foundation_path(TINY, tmp_path) and len(calls) == 1
    assert second.stat().st_mtime_ns == stat.st_mtime_ns and second.read_bytes() == data
    assert first.with_suffix(".json").is_file()
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == sorted([first.name, first.with_suffix(".json").name])  # no temp file left behind
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    other = foundation_encoder(dataclasses.replace(TINY, seed=1), tmp_path)  # other settings: other entry
    assert other != first and len(calls) == 2


def test_checkpoint_round_trips_through_the_beats_loader(tmp_path):
    path = foundation_encoder(TINY, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"cfg", "model"}  # official layout; mask embedding and heads are not saved
    model = load_beats(path)  # strict
    assert model.cfg == foundation_beats_config(TINY)
    trained, _ = train_foundation(TINY)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    hidden, grid = model.extract_layers(torch.randn(2, 8000) * 0.05, layers=2)
    assert grid == (3, 8) and hidden[-1].shape == (2, 24, 32)


def test_short_training_reduces_the_loss():
    settings = dataclasses.replace(TINY, steps=40, batch_size=8, warmup_steps=4)
    _, record = train_foundation(settings)
    curve = record["curve"]
    first = {k: float(np.mean(v[:5])) for k, v in curve.items()}
    last = {k: float(np.mean(v[-5:])) for k, v in curve.items()}
    assert first["tagging"] == pytest.approx(np.log(len(FAMILIES)), abs=0.3)  # chance over 6 families
    # Measured here (first 5 -> last 5 steps): masked 1.281 -> 1.016, tagging 1.817 -> 1.691, sum 3.098 -> 2.706.
    assert first["loss"] == pytest.approx(3.098, abs=0.02)
    assert last["masked"] < first["masked"] - 0.15
    assert last["tagging"] < first["tagging"] - 0.06
    assert last["loss"] < 0.92 * first["loss"]


@pytest.mark.parametrize("objective", ["masked", "tagging", "bestrq"])
def test_each_objective_trains_its_own_head(objective):
    _, record = train_foundation(dataclasses.replace(TINY, objective=objective, steps=2))
    assert sorted(record["curve"]) == sorted(["loss", objective])
    assert record["curve"]["loss"] == record["curve"][objective]


def test_bestrq_labels_are_the_nearest_code_of_the_random_projection():
    """BEST-RQ's tokenizer: the label of a patch is the code vector nearest (Euclidean, both unit length) to its
    normalised random projection; a patch scaled up keeps its label; the quantiser is fixed by the seed."""
    g = torch.Generator().manual_seed(0)
    patches, projection = torch.randn(3, 20, 256, generator=g), torch.randn(256, 16, generator=g) / 16
    codebook = torch.nn.functional.normalize(torch.randn(512, 16, generator=g), dim=-1)
    labels = random_projection_labels(patches, projection, codebook)
    unit = torch.nn.functional.normalize(patches @ projection, dim=-1)
    nearest = ((unit.unsqueeze(-2) - codebook) ** 2).sum(-1).argmin(-1)  # (3, 20)
    assert labels.shape == (3, 20) and torch.equal(labels, nearest) and len(labels.unique()) > 20
    assert torch.equal(random_projection_labels(7.5 * patches, projection, codebook), labels)
    a, b = (foundation._Heads(32, 16, 6) for _ in range(2))
    assert not torch.equal(a.codebook, b.codebook)  # drawn from the RNG (train_foundation seeds it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        c = foundation._Heads(32, 16, 6)
        torch.manual_seed(0)
        d = foundation._Heads(32, 16, 6)
    assert torch.equal(c.codebook, d.codebook) and torch.equal(c.projection, d.projection)


def test_seed_makes_training_deterministic():
    a, ra = train_foundation(TINY)
    b, rb = train_foundation(TINY)
    c, rc = train_foundation(dataclasses.replace(TINY, seed=1))
    assert ra["curve"] == rb["curve"] and ra["curve"] != rc["curve"]
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_foundation(dataclasses.replace(TINY, steps=1, warmup_steps=0))
    assert torch.equal(torch.rand(3), expected)


def test_config_section_defaults_and_errors():
    assert from_dict({}).foundation == FoundationConfig()
    assert from_dict({"foundation": {"steps": 10, "warmup_steps": 2}}).foundation.steps == 10
    with pytest.raises(ConfigError, match="foundation.objective"):
        from_dict({"foundation": {"objective": "denoise"}})
    with pytest.raises(ConfigError, match="foundation.conv_pos_groups"):
        from_dict({"foundation": {"conv_pos_groups": 3}})


def test_cli_trains_once_then_reuses(tmp_path, capsys):
    from pipelines.foundation import main

    overrides = [f"foundation.{k}={v}" for k, v in dataclasses.asdict(TINY).items()]
    assert main(["--out", str(tmp_path), *overrides]) == 0
    expected = foundation_path(TINY, tmp_path)
    assert f"model.checkpoint={expected}" in capsys.readouterr().out
    mtime = expected.stat().st_mtime_ns
    assert main(["--out", str(tmp_path), *overrides]) == 0
    assert expected.stat().st_mtime_ns == mtime
    assert main(["--out", str(tmp_path), "foundation.objective=denoise"]) == 2
    assert "foundation.objective = 'denoise'" in capsys.readouterr().err
