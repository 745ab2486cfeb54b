"""SpecAugment: masks in train mode, identity in eval mode, seeded, equal to torchaudio's masking."""

import pytest
import torch
import torchaudio.transforms as T

from retain_asd.train.specaug import SpecAugment


def _fbank(batch=4, frames=100, bins=32, seed=0):
    return torch.randn(batch, frames, bins, generator=torch.Generator().manual_seed(seed)) + 5.0  # never 0


def test_train_mode_masks_bands_eval_mode_is_identity():
    fbank = _fbank()
    aug = SpecAugment(freq_mask_bins=8, time_mask_frames=20, num_masks=2, mask_value=0.0).train()
    out = aug(fbank, generator=torch.Generator().manual_seed(1))
    assert out.shape == fbank.shape and not torch.equal(out, fbank)
    masked = out == 0.0  # (B, T, F); the input has no zeros
    assert torch.equal(out[~masked], fbank[~masked])  # unmasked values untouched
    # Every masked cell lies in a fully masked frequency bin or a fully masked frame (band masks).
    full_bins = masked.all(dim=1, keepdim=True)  # (B, 1, F)
    full_frames = masked.all(dim=2, keepdim=True)  # (B, T, 1)
    assert torch.equal(masked, full_bins | full_frames)
    # Widths are bounded: at most num_masks * (mask_param - 1) bins / frames per example.
    assert full_bins.sum(dim=(1, 2)).max().item() <= 2 * 7
    assert full_frames.sum(dim=(1, 2)).max().item() <= 2 * 19
    # iid_masks: the examples do not all share one mask.
    assert any(not torch.equal(masked[0], masked[b]) for b in range(1, 4))

    aug.eval()
    assert aug(fbank) is fbank


def test_seeded_and_leaves_global_rng_alone():
    fbank = _fbank()
    aug = SpecAugment(freq_mask_bins=8, time_mask_frames=20, num_masks=1).train()
    state = torch.random.get_rng_state()
    a = aug(fbank, generator=torch.Generator().manual_seed(5))
    b = aug(fbank, generator=torch.Generator().manual_seed(5))
    c = aug(fbank, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_equals_torchaudio_masking_on_transposed_input():
    # Reference: torchaudio's transforms on (B, F, T) from the same seeded global RNG.
    fbank = _fbank()
    aug = SpecAugment(freq_mask_bins=8, time_mask_frames=20, num_masks=2, mask_value=-1.0).train()
    torch.manual_seed(11)
    out = aug(fbank)
    torch.manual_seed(11)
    spec = fbank.transpose(1, 2)
    for _ in range(2):
        spec = T.FrequencyMasking(8, iid_masks=True)(spec, -1.0)
        spec = T.TimeMasking(20, iid_masks=True)(spec, -1.0)
    assert torch.equal(out, spec.transpose(1, 2))


def test_errors():
    with pytest.raises(ValueError, match="time_mask_frames"):
        SpecAugment(freq_mask_bins=8, time_mask_frames=200).train()(_fbank())
    with pytest.raises(ValueError, match=r"\(B, T, F\)"):
        SpecAugment(8, 20).train()(torch.ones(100, 32))
    with pytest.raises(ValueError, match="num_masks"):
        SpecAugment(8, 20, num_masks=-1)
    # No masks, or eval mode: identity even on wrong shapes (nothing is done).
    x = torch.ones(100, 32)
    assert SpecAugment(8, 20, num_masks=0).train()(x) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_seeded_on_cuda_leaves_cuda_rng_alone():
    fbank = _fbank().cuda()
    aug = SpecAugment(freq_mask_bins=8, time_mask_frames=20, num_masks=1).train()
    state = torch.cuda.get_rng_state()
    a = aug(fbank, generator=torch.Generator().manual_seed(5))
    b = aug(fbank, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, fbank)
    assert torch.equal(torch.cuda.get_rng_state(), state)
