"""SpecAugment (Park et al. 2019) on fbank features, for the student's mixture input only.

Frequency and time masks from torchaudio (`FrequencyMasking`, `TimeMasking`, `iid_masks=True`: each
example in the batch gets its own masks). The paper does not give mask sizes; the defaults are AST's
AudioSet recipe for 128-bin fbanks (Gong et al. 2021: freqm 48, timem 192, one mask of each).

Determinism: torchaudio draws the masks from the global RNG of the tensor's device. Pass a
`torch.Generator` to `forward` and the module draws one seed from it, then masks inside
`torch.random.fork_rng` seeded with that seed: same generator state -> same masks, and the global RNG
is left as it was. Without a generator the global RNG is used (seed it per rank in the loop).
"""

from __future__ import annotations

import torch
import torchaudio.transforms as T
from torch import nn


class SpecAugment(nn.Module):
    """Masks `num_masks` frequency bands (<= `freq_mask_bins` wide) and `num_masks` time spans
    (<= `time_mask_frames` long) per example with `mask_value`; identity unless `self.training`.

    Input and output: fbank (B, T, F), e.g. BEATs' normalised 128-bin fbank, where 0 (the default
    `mask_value`) is the dataset mean.
    """

    def __init__(
        self,
        freq_mask_bins: int = 48,
        time_mask_frames: int = 192,
        num_masks: int = 1,
        mask_value: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("freq_mask_bins", freq_mask_bins), ("time_mask_frames", time_mask_frames),
                            ("num_masks", num_masks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SpecAugment {name}: must be an integer >= 0, got {value!r}")
        self.freq_mask_bins = freq_mask_bins
        self.time_mask_frames = time_mask_frames
        self.num_masks = num_masks
        self.mask_value = mask_value
        # torchaudio masks a (..., freq, time) tensor; iid_masks needs the batch dim in front.
        self.freq_masking = T.FrequencyMasking(freq_mask_bins, iid_masks=True)
        self.time_masking = T.TimeMasking(time_mask_frames, iid_masks=True)

    def extra_repr(self) -> str:
        return (f"freq_mask_bins={self.freq_mask_bins}, time_mask_frames={self.time_mask_frames}, "
                f"num_masks={self.num_masks}, mask_value={self.mask_value}")

    def _mask(self, fbank: torch.Tensor) -> torch.Tensor:
        spec = fbank.transpose(1, 2)  # (B, F, T), torchaudio's layout
        for _ in range(self.num_masks):
            spec = self.freq_masking(spec, self.mask_value)
            spec = self.time_masking(spec, self.mask_value)
        return spec.transpose(1, 2)  # (B, T, F)

    def forward(self, fbank: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training or self.num_masks == 0:
            return fbank
        if fbank.dim() != 3:
            raise ValueError(f"SpecAugment: expected fbank (B, T, F), got shape {tuple(fbank.shape)}")
        _, num_frames, num_bins = fbank.shape
        if self.freq_mask_bins > num_bins or self.time_mask_frames > num_frames:
            # torchaudio would place such a mask partly outside the axis; say so instead.
            raise ValueError(f"SpecAugment: freq_mask_bins={self.freq_mask_bins} / time_mask_frames="
                             f"{self.time_mask_frames} exceed the input's {num_bins} bins / {num_frames} "
                             "frames; lower them in the config")
        if generator is None:
            return self._mask(fbank)
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        device = fbank.device
        forked = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked, device_type="cuda"):
            # Seed only the generator that torchaudio will draw from (not every GPU's).
            if device.type == "cuda":
                torch.cuda.default_generators[forked[0]].manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
            return self._mask(fbank)
