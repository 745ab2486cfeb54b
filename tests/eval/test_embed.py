"""Embeddings: pooling by hand, one forward for all layers, oracle mixture, cache identity, Ray Data path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain_asd.eval.embed import Embedder, embed, embed_oracle, embed_with_ray, model_hash, pool
from retain_asd.models.beats import beats_tiny, patch_grid, write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return (write_random_checkpoint(root / "a.pt", beats_tiny(), seed=0),
            write_random_checkpoint(root / "b.pt", beats_tiny(), seed=1))


def _waves(n: int, seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((n, int(16000 * seconds)))).astype(np.float32)


def test_pool_by_hand():
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)  # B=2, T=3, F=2, D=1, index t*F+f
    # batch 0 tokens (t, f): (0,0)=0 (0,1)=1 (1,0)=2 (1,1)=3 (2,0)=4 (2,1)=5
    assert pool(hidden, (3, 2), "genrep")[0].tolist() == [2.0, 3.0]  # mean over t, per f
    assert pool(hidden, (3, 2), "spectral")[0].tolist() == [0.5, 2.5, 4.5]  # mean over f, per t
    assert pool(hidden, (3, 2), "mean")[0].tolist() == [2.5]
    with pytest.raises(ValueError, match="grid"):
        pool(hidden, (4, 2), "genrep")


def test_pooling_shape_derived_from_clip_length(checkpoints):
    embedder = Embedder(checkpoints[0], pooling="genrep")
    x = _waves(2, 5.0)  # 5 s: 1 + (80000 - 400) // 160 = 498 frames -> T = 31 patches, F = 8
    t, f = patch_grid(x.shape[1])
    assert (t, f) == (31, 8)
    d = beats_tiny().encoder_embed_dim
    shapes = {p: tuple(embed(embedder.model, x, 2, p)[2].shape) for p in ("genrep", "mean", "spectral")}
    assert shapes == {"genrep": (2, f * d), "mean": (2, d), "spectral": (2, t * d)}
    assert tuple(embed(embedder.model, _waves(1, 10.0), 1, "genrep")[1].shape) == (1, 8 * d)  # 10 s: 62 x 8


def test_all_layers_from_one_forward_equal_single_layer_calls(checkpoints):
    embedder = Embedder(checkpoints[0])
    x = _waves(3, 2.0)
    both = embed(embedder.model, x, [1, 3])
    for layer in (1, 3):
        torch.testing.assert_close(both[layer], embed(embedder.model, x, layer)[layer], rtol=0, atol=0)


def test_oracle_mixture_is_frame_level_interpolation(checkpoints):
    model = Embedder(checkpoints[0]).model
    clean, noise = _waves(2, 2.0, seed=1), _waves(2, 2.0, seed=2)
    one = embed_oracle(model, clean, noise, 2, lam=1.0)[2]
    torch.testing.assert_close(one, embed(model, clean, 2)[2])
    # Mean pooling is linear, so lam * pool(h_clean) + (1 - lam) * pool(h_noise) must equal it too.
    mixed = embed_oracle(model, clean, noise, 2, lam=0.3, pooling="spectral")[2]
    expected = 0.3 * embed(model, clean, 2, "spectral")[2] + 0.7 * embed(model, noise, 2, "spectral")[2]
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_cache_hits_and_new_checkpoint_invalidates(checkpoints, tmp_path):
    x = _waves(5, 2.0)
    keys = [f"row{i}" for i in range(5)]
    loads = []

    def load(ks):
        loads.append(list(ks))
        return x[[keys.index(k) for k in ks]]

    first = Embedder(checkpoints[0], cache_dir=tmp_path, batch_size=2)
    a = first.embed_keyed(keys, load, [1, 2])
    assert (first.num_clips_encoded, first.num_forwards) == (5, 3)
    again = Embedder(checkpoints[0], cache_dir=tmp_path, batch_size=2)  # same weights: all from disk
    b = again.embed_keyed(keys[::-1], load, [2, 1])
    assert again.num_clips_encoded == 0 and len(loads) == 1
    np.testing.assert_array_equal(b[1], a[1][::-1])
    other = Embedder(checkpoints[1], cache_dir=tmp_path, batch_size=2)  # new weights: recomputed
    assert other.checkpoint_hash != first.checkpoint_hash
    c = other.embed_keyed(keys, load, [1])
    assert other.num_clips_encoded == 5
    assert not np.allclose(c[1], a[1])
    np.testing.assert_allclose(a[2], Embedder(checkpoints[0]).embed_waveforms(x, [2])[2], rtol=1e-6)


def test_model_hash_is_content_hash(checkpoints):
    from retain_asd.models.beats import load_beats

    assert model_hash(load_beats(checkpoints[0])) == model_hash(load_beats(checkpoints[0]))
    assert model_hash(load_beats(checkpoints[0])) != model_hash(load_beats(checkpoints[1]))


def test_ray_data_actor_pool_equals_in_process(checkpoints, ray_local):
    embedder = Embedder(checkpoints[0], batch_size=2)
    x = _waves(5, 2.0)
    via_ray = embed_with_ray(embedder, x, [1, 3])
    local = embedder.embed_waveforms(x, [1, 3])
    for layer in (1, 3):
        np.testing.assert_allclose(via_ray[layer], local[layer], rtol=1e-5, atol=1e-6)
    assert embedder.num_clips_encoded == 10
