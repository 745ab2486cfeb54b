"""Tests for retain_asd.models.beats (BEATs port).

Equality with the official microsoft/unilm code is checked outside the suite (the official code is not a
dependency); here the official checkpoint layout is pinned by written-out key lists and cfg values.
"""

import dataclasses
import math

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from retain_asd.models.beats import (
    BEATS_CONFIGS,
    BEATs,
    BEATsCheckpointError,
    BEATsConfig,
    beats_base,
    beats_tiny,
    fbank_features,
    load_beats,
    patch_grid,
    reduce_padding_mask,
    relative_position_bucket,
    save_beats,
    write_random_checkpoint,
)

SR = 16000

# cfg stored in BEATs_iter3.pt (pre-trained): 23 keys, no predictor_* keys.
ITER3_CFG = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_norm_first": False,
    "conv_bias": False, "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": True,
    "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True, "deep_norm": True, "input_patch_size": 16,
    "layer_wise_gradient_decay_ratio": 0.6, "embed_dim": 512, "finetuned_model": False,
}  # fmt: skip

# Official iter3 state dict (BEATs(BEATsConfig(ITER3_CFG)).state_dict() upstream): name -> shape.
ITER3_TOP_KEYS = {
    "post_extract_proj.weight": (768, 512),
    "post_extract_proj.bias": (768,),
    "patch_embedding.weight": (512, 1, 16, 16),
    "layer_norm.weight": (512,),
    "layer_norm.bias": (512,),
    "encoder.pos_conv.0.bias": (768,),
    "encoder.pos_conv.0.weight_g": (1, 1, 128),
    "encoder.pos_conv.0.weight_v": (768, 48, 128),
    "encoder.layer_norm.weight": (768,),
    "encoder.layer_norm.bias": (768,),
}
ITER3_LAYER_KEYS = {  # under encoder.layers.{0..11}.
    "self_attn.grep_a": (1, 12, 1, 1),
    "self_attn.relative_attention_bias.weight": (320, 12),  # shared table, stored under every layer
    "self_attn.k_proj.weight": (768, 768),
    "self_attn.k_proj.bias": (768,),
    "self_attn.v_proj.weight": (768, 768),
    "self_attn.v_proj.bias": (768,),
    "self_attn.q_proj.weight": (768, 768),
    "self_attn.q_proj.bias": (768,),
    "self_attn.out_proj.weight": (768, 768),
    "self_attn.out_proj.bias": (768,),
    "self_attn.grep_linear.weight": (8, 64),
    "self_attn.grep_linear.bias": (8,),
    "self_attn_layer_norm.weight": (768,),
    "self_attn_layer_norm.bias": (768,),
    "fc1.weight": (3072, 768),
    "fc1.bias": (3072,),
    "fc2.weight": (768, 3072),
    "fc2.bias": (768,),
    "final_layer_norm.weight": (768,),
    "final_layer_norm.bias": (768,),
}


def _wave(seconds: float, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, int(seconds * SR), generator=g) * 0.1


@pytest.fixture(scope="module")
def tiny() -> BEATs:
    torch.manual_seed(0)
    return BEATs(beats_tiny()).eval()


# ---------------------------------------------------------------------------------------------- config


def test_beats_base_is_the_iter3_cfg():
    assert beats_base().to_dict() == {**ITER3_CFG, "predictor_dropout": 0.0, "predictor_class": 527}
    assert beats_base().fbank_mean == 15.41663 and beats_base().fbank_std == 6.55582


def test_from_dict_fills_official_class_defaults_and_keeps_unknown_keys():
    cfg = BEATsConfig.from_dict(ITER3_CFG)
    assert cfg == dataclasses.replace(beats_base(), predictor_dropout=0.1)  # official class default
    partial = {k: v for k, v in ITER3_CFG.items() if k != "max_distance"}
    assert BEATsConfig.from_dict(partial).max_distance == 1280  # official class default, not iter3's 800
    with_unknown = BEATsConfig.from_dict({**ITER3_CFG, "some_future_key": 3})
    assert with_unknown.extra == {"some_future_key": 3}
    assert with_unknown.to_dict()["some_future_key"] == 3


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="encoder_embed_dim"):
        dataclasses.replace(beats_tiny(), encoder_attention_heads=5)
    with pytest.raises(ValueError, match="input_patch_size"):
        BEATsConfig.from_dict({k: v for k, v in ITER3_CFG.items() if k != "input_patch_size"})
    with pytest.raises(ValueError, match="activation_fn"):
        dataclasses.replace(beats_tiny(), activation_fn="glu")


def test_strict_key_set_equals_the_official_iter3_one():
    expected = dict(ITER3_TOP_KEYS)
    for i in range(12):
        expected.update({f"encoder.layers.{i}.{k}": v for k, v in ITER3_LAYER_KEYS.items()})
    assert len(expected) == 250
    state = BEATs(beats_base()).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # one shared relative-position table: the same tensor under every layer key
    tables = [state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] for i in range(12)]
    assert all(t.data_ptr() == tables[0].data_ptr() for t in tables)


def test_finetuned_cfg_adds_the_predictor():
    keys = BEATs(dataclasses.replace(beats_tiny(), finetuned_model=True, predictor_class=7)).state_dict()
    assert tuple(keys["predictor.weight"].shape) == (7, 64) and tuple(keys["predictor.bias"].shape) == (7,)


# ---------------------------------------------------------------------------------------------- front end


@pytest.mark.parametrize(
    ("num_samples", "grid"),
    [(160000, (62, 8)), (16000, (6, 8)), (52800, (20, 8)), (2800, (1, 8)), (2799 + 160 * 16, (1, 8)),
     (2800 + 160 * 16, (2, 8))],
)
def test_patch_grid_hand_values(num_samples, grid):
    # frames = 1 + (S - 400) // 160; T = frames // 16; F = 128 // 16
    assert patch_grid(num_samples) == grid


def test_patch_grid_rejects_too_short_clips():
    with pytest.raises(ValueError, match="2800 samples"):
        patch_grid(2799)


def test_fbank_features_scale_and_normalisation():
    wav = _wave(1.0, batch=1)
    ref = kaldi.fbank(wav * 32768, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
    assert torch.equal(fbank_features(wav)[0], (ref - 15.41663) / (2 * 6.55582))


def test_reduce_padding_mask_hand_example():
    mask = torch.tensor([[False] * 5 + [True] * 5])  # 10 samples -> 3 groups of 3 (1 dropped)
    assert reduce_padding_mask(mask, 3).tolist() == [[False, False, True]]


def test_relative_position_bucket_hand_values():
    offsets = torch.tensor([0, 1, -1, -79, 79, -80, 80, -160, 160, -799, 800, -100000])
    # half = 160 per direction, exact below 80, then 80 + int(log10(d / 80) * 80), capped at 159
    expected = [0, 161, 1, 79, 239, 80, 240, 104, 264, 159, 319, 159]
    assert relative_position_bucket(offsets, 320, 800).tolist() == expected
    assert 80 + int(math.log10(160 / 80) * 80) == 104


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("seconds", [10.0, 3.3, 1.0, 0.175])
def test_layer_shapes_follow_the_clip_length(tiny, seconds):
    wav = _wave(seconds)
    with torch.no_grad():
        layers, grid = tiny.extract_layers(wav)
    assert grid == patch_grid(wav.shape[1])
    assert len(layers) == 3
    for x in layers:
        assert x.shape == (2, grid[0] * grid[1], 64)
    assert tiny(wav).shape == layers[-1].shape


def test_tokens_are_time_major(tiny):
    """A tone from second 5 on changes exactly the tokens of patches t >= 31 (index t*8 + f).

    Holds for the patch tokens (encoder input): fbank frames and 16x16 patches are local, and frame j
    covers samples [160 j, 160 j + 400), so patch 30 (frames 480..495) ends at sample 79599 < 80000.
    After `pos_conv` and attention every token sees the whole clip, so the blocks' outputs cannot be used.
    """
    silence = torch.zeros(1, 10 * SR)
    tone = silence.clone()
    t = torch.arange(5 * SR) / SR
    tone[0, 5 * SR:] = 0.3 * torch.sin(2 * math.pi * 1000.0 * t)
    with torch.no_grad():
        a, grid = tiny.patch_tokens(tiny.preprocess(silence))
        b, _ = tiny.patch_tokens(tiny.preprocess(tone))
    changed = (a != b).reshape(1, grid[0], grid[1], -1).any(-1).any(-1)[0]  # (T,)
    assert grid == (62, 8)
    assert changed.nonzero().flatten().tolist() == list(range(31, 62))


def test_eval_forward_is_deterministic(tiny):
    wav = _wave(2.0)
    tiny.layerdrop = True  # no effect in eval mode
    try:
        with torch.no_grad():
            assert torch.equal(tiny(wav), tiny(wav))
    finally:
        tiny.layerdrop = False


def test_early_exit_equals_full_forward_and_runs_fewer_blocks(tiny):
    wav = _wave(2.0)
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in tiny.encoder.layers]
    try:
        with torch.no_grad():
            full, _ = tiny.extract_layers(wav)
            assert len(calls) == 3
            calls.clear()
            part, _ = tiny.extract_layers(wav, layers=2)
            assert len(calls) == 2
            some, _ = tiny.extract_layers(wav, layers=[1, 2])
    finally:
        for h in hooks:
            h.remove()
    assert len(part) == 2 and all(torch.equal(p, f) for p, f in zip(part, full[:2], strict=True))
    assert len(some) == 2 and torch.equal(some[1], full[1])


@pytest.mark.parametrize("layers", [0, 4, [], [1, 5], True])
def test_bad_layer_requests_raise(tiny, layers):
    with pytest.raises(ValueError, match="layer"):
        tiny.extract_layers(_wave(1.0), layers=layers)


def test_sdpa_equals_explicit_attention(tiny):
    wav = _wave(2.0)
    with torch.no_grad():
        sdpa, _ = tiny.extract_layers(wav)
        tiny.attn_impl = "explicit"
        explicit, _ = tiny.extract_layers(wav)
        tiny.attn_impl = "sdpa"
    for a, b in zip(sdpa, explicit, strict=True):
        assert (a - b).abs().max().item() < 1e-5


def test_bf16_autocast_is_finite_and_close_to_fp32(tiny):
    wav = _wave(2.0)
    with torch.no_grad():
        ref = tiny(wav)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(wav)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low.float(), ref, dim=-1)
    assert cos.min().item() > 0.99
    assert (low.float() - ref).abs().mean().item() < 0.05  # LayerNorm output, unit scale


def test_fp16_is_refused(tiny):
    with pytest.raises(RuntimeError, match="bfloat16"):
        with torch.autocast("cpu", dtype=torch.float16):
            tiny(_wave(1.0))


def test_padding_mask_hides_padded_samples(tiny):
    """Content behind the padding mask does not reach the unpadded tokens.

    4 s clip: 398 frames, 24 x 8 = 192 tokens. The official mask mapping gives frame j <- samples
    [160 j, 160 j + 160) and token i <- frames {2i, 2i + 1}, so a mask from sample p = 2560 k masks
    tokens i >= 8 k (patches t >= k). Patch k - 1 still reads samples up to p + 240 (25 ms windows),
    so the changed content starts there.
    """
    k = 12
    p = 2560 * k
    wav = _wave(4.0, batch=1)
    other = wav.clone()
    other[0, p + 240:] = torch.randn(4 * SR - p - 240)
    mask = torch.zeros(1, 4 * SR, dtype=torch.bool)
    mask[0, p:] = True
    with torch.no_grad():
        a = tiny(wav, padding_mask=mask)
        b = tiny(other, padding_mask=mask)
        c = tiny(other)
    token_mask = reduce_padding_mask(reduce_padding_mask(mask, 398), 192)[0]
    assert token_mask.nonzero().flatten().tolist() == list(range(8 * k, 192))
    keep = ~token_mask
    assert (a[0, keep] - b[0, keep]).abs().max().item() < 1e-5
    assert (a[0, keep] - c[0, keep]).abs().max().item() > 1e-2  # without the mask the content leaks in


def test_predict_masked_mean_for_finetuned_model():
    torch.manual_seed(0)
    model = BEATs(dataclasses.replace(beats_tiny(), finetuned_model=True, predictor_class=5)).eval()
    wav = _wave(2.0)
    mask = torch.zeros_like(wav, dtype=torch.bool)
    mask[1, SR:] = True
    with torch.no_grad():
        probs = model.predict(wav, padding_mask=mask)
        x = model(wav, padding_mask=mask)
    frames = 1 + (2 * SR - 400) // 160
    keep = ~reduce_padding_mask(reduce_padding_mask(mask, frames), x.shape[1])
    manual = torch.stack([model.predictor(x[i, keep[i]]).mean(0) for i in range(2)]).sigmoid()
    assert probs.shape == (2, 5)
    assert (probs - manual).abs().max().item() < 1e-6
    with pytest.raises(RuntimeError, match="predictor"):
        BEATs(beats_tiny()).predict(wav)


def test_freeze_keeps_the_teacher_in_eval_without_grad():
    model = BEATs(beats_tiny()).train()
    assert model.freeze() is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.nn.Sequential(model).train()  # a parent switching to train must not wake the teacher
    assert not model.training and not any(m.training for m in model.modules())


def test_switches_default_off_and_reproduce_official_train_behaviour():
    torch.manual_seed(0)
    model = BEATs(dataclasses.replace(beats_tiny(), encoder_layerdrop=1.0)).train()
    wav = _wave(1.0)
    assert not model.layerdrop and not model.grad_decay
    with torch.no_grad():
        ref = model.eval()(wav)
        assert torch.equal(model.train()(wav), ref)  # iter3 dropouts are 0 and layerdrop is off
        model.layerdrop = True  # p = 1: every block skipped, all layer outputs equal the encoder input
        layers, _ = model.extract_layers(wav)
    assert all(torch.equal(x, layers[0]) for x in layers)

    def patch_grad(grad_decay: bool) -> torch.Tensor:
        model.zero_grad()
        model.layerdrop, model.grad_decay = False, grad_decay
        (model(wav) * torch.linspace(-1, 1, 64)).sum().backward()
        return model.patch_embedding.weight.grad.clone()

    # every path from the output to the patch embedding crosses the 3 blocks' gradient scaling once each
    decayed, plain = patch_grad(True), patch_grad(False)
    assert (decayed - 0.6**3 * plain).abs().max().item() < 1e-5 * plain.abs().max().item()


@pytest.mark.parametrize("name", sorted(BEATS_CONFIGS))
def test_forward_backward_every_constructor_at_tiny_size(name):
    cfg = dataclasses.replace(BEATS_CONFIGS[name](), encoder_layers=2, encoder_embed_dim=32,
                              encoder_ffn_embed_dim=64, encoder_attention_heads=4, embed_dim=16,
                              conv_pos=8, conv_pos_groups=4)
    torch.manual_seed(0)
    model = BEATs(cfg).train()
    layers, grid = model.extract_layers(_wave(1.0))
    sum(x.square().mean() for x in layers).backward()
    assert grid == (6, 8)
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny):
    tiny.label_dict = {0: "/m/09x0r"}
    try:
        path = save_beats(tiny, tmp_path / "sub" / "ckpt.pt")
    finally:
        tiny.label_dict = None
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"cfg", "model", "label_dict"} and raw["cfg"] == beats_tiny().to_dict()
    loaded = load_beats(path)
    assert loaded.cfg == tiny.cfg and loaded.label_dict == {0: "/m/09x0r"} and not loaded.training
    want, got = tiny.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    wav = _wave(1.0)
    with torch.no_grad():
        assert torch.equal(loaded(wav), tiny(wav))


def test_write_random_checkpoint_is_seeded_and_leaves_global_rng(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = load_beats(write_random_checkpoint(tmp_path / "a.pt", beats_tiny(), seed=1))
    b = load_beats(write_random_checkpoint(tmp_path / "b.pt", beats_tiny(), seed=1))
    c = load_beats(write_random_checkpoint(tmp_path / "c.pt", beats_tiny(), seed=2))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.encoder.layers[0].fc1.weight, b.encoder.layers[0].fc1.weight)
    assert not torch.equal(a.encoder.layers[0].fc1.weight, c.encoder.layers[0].fc1.weight)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(BEATsCheckpointError, match=r"nope\.pt: no such file"):
        load_beats(tmp_path / "nope.pt")


def test_load_non_checkpoint_files_name_them(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BEATsCheckpointError, match=r"garbage\.pt: not a readable torch checkpoint"):
        load_beats(garbage)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(BEATsCheckpointError, match=r"other\.pt: not a BEATs checkpoint.*state_dict"):
        load_beats(other)


def test_load_mismatched_keys_names_the_first_differences(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state.pop("encoder.layers.1.fc1.bias")
    state["encoder.layers.1.fc3.bias"] = torch.zeros(3)
    state["layer_norm.weight"] = torch.ones(7)
    path = tmp_path / "bad.pt"
    torch.save({"cfg": tiny.cfg.to_dict(), "model": state}, path)
    with pytest.raises(BEATsCheckpointError) as err:
        load_beats(path)
    msg = str(err.value)
    assert "bad.pt" in msg and "missing: encoder.layers.1.fc1.bias" in msg
    assert "unexpected: encoder.layers.1.fc3.bias" in msg and "layer_norm.weight (7,) != (32,)" in msg


def test_load_rejects_differing_shared_tables(tmp_path, tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["encoder.layers.2.self_attn.relative_attention_bias.weight"] += 1.0
    path = tmp_path / "tables.pt"
    torch.save({"cfg": tiny.cfg.to_dict(), "model": state}, path)
    with pytest.raises(BEATsCheckpointError, match="relative_attention_bias differs"):
        load_beats(path)
