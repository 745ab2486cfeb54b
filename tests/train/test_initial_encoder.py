"""With no BEATs checkpoint, the stand-in foundation encoder is the initial encoder of every run, the teacher,
and the `frozen` row; model.init=random keeps the seeded random init of the smoke runs."""

from __future__ import annotations

import pytest
import torch

from retain_asd.config import ConfigError, load_config
from retain_asd.corpus.labels import LabelVocab
from retain_asd.experiments import resolve_checkpoint
from retain_asd.models.beats import load_beats
from retain_asd.train.checkpoint import state_digest
from retain_asd.train.launch import foundation_cache_dir, initial_encoder, loop_config_from, resolve_init_checkpoint

# the foundation section of test_foundation.py's TINY: a few steps take about a second
TINY = ["foundation.encoder_layers=2", "foundation.encoder_embed_dim=32", "foundation.encoder_ffn_embed_dim=64",
        "foundation.encoder_attention_heads=2", "foundation.patch_embed_dim=16", "foundation.conv_pos=4",
        "foundation.clip_s=0.5", "foundation.steps=3", "foundation.batch_size=4", "foundation.warmup_steps=1"]


def _cfg(tmp_path, *more):
    return load_config("smoke", overrides=[f"data.work_dir={tmp_path / 'work'}", "model.init=foundation",
                                           "objective.align_layer=2", "eval.layer=1", "eval.ssl_layer=2",
                                           *TINY, *more])


def test_foundation_is_the_init_the_teacher_source_and_the_frozen_row(tmp_path):
    cfg = _cfg(tmp_path)
    init = resolve_init_checkpoint(cfg, tmp_path / "out")
    assert init.parent == foundation_cache_dir(cfg) == (tmp_path / "work" / "foundation").resolve()
    assert init.name.startswith("foundation-") and not list((tmp_path / "out").glob("init_beats_*"))
    mtime = init.stat().st_mtime_ns
    name, path, frozen = resolve_checkpoint("frozen", cfg, tmp_path / "eval")
    assert (name, path, frozen) == ("frozen", str(init), True)
    assert initial_encoder(cfg) == init and init.stat().st_mtime_ns == mtime  # cached: trained once
    model = load_beats(init)
    assert model.num_layers == 2 and model.cfg.encoder_embed_dim == 32  # the foundation section's sizes
    # another seed of the study: same initial encoder (the seed is the student's, not the encoder's)
    assert resolve_init_checkpoint(_cfg(tmp_path, "train.seed=5"), tmp_path / "out5") == init


def test_layers_must_fit_the_foundation_depth(tmp_path):
    cfg = _cfg(tmp_path, "objective.align_layer=4")
    init = resolve_init_checkpoint(cfg, tmp_path / "out")
    labels = tmp_path / "labels.json"
    LabelVocab(("fan_a",), ("noise_hum",)).to_json(labels)
    with pytest.raises(ConfigError, match="objective.align_layer"):
        loop_config_from(cfg, labels, init)  # 2 blocks
    assert loop_config_from(_cfg(tmp_path), labels, init).align_layer == 2


def test_random_init_stays_for_smoke_runs(tmp_path):
    cfg = load_config("smoke", overrides=[f"data.work_dir={tmp_path / 'work'}"])
    assert cfg.model.init == "random"
    with pytest.warns(UserWarning, match="RANDOM tiny BEATs"):
        a = resolve_init_checkpoint(cfg, tmp_path / "out")
    assert a.name == "init_beats_tiny_seed0.pt" and not (tmp_path / "work" / "foundation").exists()
    with pytest.warns(UserWarning, match="RANDOM"):
        _, frozen, _ = resolve_checkpoint("frozen", cfg, tmp_path / "eval")
    assert state_digest(load_beats(frozen).state_dict()) != state_digest({"x": torch.zeros(1)})
    assert load_config().model.init == "foundation"  # the default: never a random encoder by accident
    with pytest.raises(ConfigError, match="model.init"):
        load_config(overrides=["model.init=imagenet"])
