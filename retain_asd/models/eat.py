"""EAT / SSLAM audio encoder: official fairseq checkpoint layout, every block's output, Kaldi fbank front end.

Papers: W. Chen et al., "EAT: Self-Supervised Pre-Training with Efficient Audio Transformer", IJCAI 2024,
arXiv:2401.03497; T. Alex et al., "SSLAM: Enhancing Self-Supervised Models with Audio Mixtures for
Polyphonic Soundscapes", ICLR 2025 (same encoder, other weights).
Official code: https://github.com/cwx-worst-one/EAT (`models/EAT_pretraining.py`, `base.py`, `images.py`,
`modules.py`, `mae.py`; the data2vec 2.0 multi-modal model of fairseq with its image path, 1 input
channel) and https://github.com/ta012/SSLAM (`Pre-Training/SSLAM_Stage2/models`, the same files).
This file is an independent port that keeps the official parameter names, so the released fairseq
checkpoints (`EAT-base_epoch10_pt.pt`, `EAT-base_epoch30_pt.pt`, SSLAM's pre-trained `.pt`) load strictly.

Data flow for one 10 s clip at 16 kHz (base sizes):

    waveform (160000,) - mean -> Kaldi fbank (htk_compat, hanning, 128 bins)  (998, 128)
    -> zero-pad / crop to target_length frames (1024, official)                (1024, 128)
    -> (x - (-4.268)) / (2 * 4.569)                                             official AudioSet stats
    -> patch conv 16x16 stride 16, with bias                                    (768, 64, 8)
    -> tokens time-major, index t*8 + f, + fixed 2-D sin-cos positions          (512, 768)
    -> [CLS] + tokens -> LayerNorm (context_encoder.norm; prenet_depth = 0)     (513, 768)
    -> 12 post-LN ViT blocks (qkv attention, GELU MLP x4), LayerNorm eps 1e-6
    -> block k output without CLS = "layer k" (1-based, like the paper)         (512, 768)

Every block's output is returned (the official `extract_features` returns the last one as `x`; its
`layer_results` are the MLP outputs before the residual, the teacher targets, not the block outputs).
Checked to 1e-4 against the official code with random weights, every layer, 10 s and 3 s inputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor, nn

SAMPLE_RATE_HZ = 16000  # the official preprocessing resamples everything to 16 kHz
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FBANK_MEAN = -4.268  # official AudioSet statistics (feature_extract.py, raw_audio_dataset.py)
FBANK_STD = 4.569
from retain_asd.models.ckpt_io import EAT_MODEL_NAME as MODEL_NAME  # noqa: E402
from retain_asd.models.ckpt_io import CheckpointError, is_eat_checkpoint  # noqa: E402
from retain_asd.models.layers import deepest_layer  # noqa: E402

MODALITY = "IMAGE"  # EAT runs the spectrogram through data2vec 2.0's image path
PREFIX = f"modality_encoders.{MODALITY}."

# State-dict entries of a pre-training checkpoint that the encoder does not use: the CNN decoder, the
# EMA teacher (`_ema`), and the optional heads of other losses. Present or not, they are skipped.
PRETRAINING_PREFIXES = (f"{PREFIX}decoder.", "_ema", "shared_decoder.", "recon_proj.", "cls_proj.", "center")

# Defaults of the official config classes (Data2VecMultiConfig, D2vImageConfig, task): a checkpoint
# cfg that omits a key gets these, as fairseq's dataclass merge does.
OFFICIAL_MODEL_DEFAULTS: dict[str, Any] = {
    "depth": 12, "num_heads": 12, "embed_dim": 768, "mlp_ratio": 4.0, "norm_eps": 1e-6, "norm_affine": True,
    "layer_norm_first": False,
}  # fmt: skip
OFFICIAL_IMAGE_DEFAULTS: dict[str, Any] = {
    "in_chans": 3, "patch_size": 16, "embed_dim": 768, "num_extra_tokens": 0, "prenet_depth": 4,
    "max_length": 768, "target_length": 1024, "use_alibi_encoder": False, "fixed_positions": True,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EATConfig:
    """EAT hyper-parameters; defaults are the released EAT-base / SSLAM pre-training checkpoints' cfg.

    Build from a checkpoint with `EATConfig.from_checkpoint_cfg(ckpt['cfg'])` (the fairseq cfg: `model`
    with `modalities.image`, and `task.target_length`). `to_checkpoint_cfg()` writes that layout back.
    """

    depth: int = 12  # transformer blocks
    num_heads: int = 12
    embed_dim: int = 768  # transformer width D (= patch-embedding width in every released checkpoint)
    mlp_ratio: float = 4.0  # MLP hidden = int(D * ratio)
    norm_eps: float = 1e-6
    norm_affine: bool = True
    patch_size: int = 16  # patch side in (fbank frames, mel bins)
    num_extra_tokens: int = 1  # the CLS token, prepended
    max_length: int = 768  # patch rows with a position embedding: 768 * 16 frames = 122.88 s
    target_length: int = 1024  # fbank frames every clip is padded / cropped to (official: 1024 for 10 s)
    fbank_mean: float = FBANK_MEAN
    fbank_std: float = FBANK_STD

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"EATConfig.{name}={getattr(self, name)!r}: {why}")

        if self.depth < 1:
            raise bad("depth", "must be >= 1")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if self.embed_dim % 4:
            raise bad("embed_dim", "must be divisible by 4 (2-D sin-cos position embedding)")
        if self.patch_size < 1 or NUM_MEL_BINS % self.patch_size:
            raise bad("patch_size", f"must divide the {NUM_MEL_BINS} mel bins")
        if self.num_extra_tokens < 1:
            raise bad("num_extra_tokens", "EAT has a CLS token (1); 0 is not a released configuration")
        if self.target_length < self.patch_size:
            raise bad("target_length", f"must be >= patch_size={self.patch_size} frames")
        if self.target_length > self.max_length * self.patch_size:
            raise bad("target_length", f"exceeds the position table ({self.max_length} x {self.patch_size})")
        if self.fbank_std <= 0:
            raise bad("fbank_std", "must be > 0")

    @property
    def freq_patches(self) -> int:
        return NUM_MEL_BINS // self.patch_size

    @classmethod
    def from_checkpoint_cfg(cls, cfg: Mapping[str, Any]) -> EATConfig:
        """Config from the fairseq cfg of an EAT / SSLAM pre-training checkpoint; unsupported settings raise."""
        if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
            raise ValueError("expected a fairseq cfg with a 'model' section")
        m = {**OFFICIAL_MODEL_DEFAULTS, **cfg["model"]}
        if m.get("_name") != MODEL_NAME:
            raise ValueError(f"cfg.model._name = {m.get('_name')!r}; EAT pre-training checkpoints have "
                             f"{MODEL_NAME!r} (fine-tuned classifiers are not supported: use the pre-trained one)")
        modalities = m.get("modalities") or {}
        image = {**OFFICIAL_IMAGE_DEFAULTS, **(modalities.get("image") or {})}
        task = cfg.get("task") or {}
        unsupported = {
            "model.layer_norm_first": (m["layer_norm_first"], False),
            "modalities.image.in_chans": (image["in_chans"], 1),
            "modalities.image.prenet_depth": (image["prenet_depth"], 0),
            "modalities.image.use_alibi_encoder": (image["use_alibi_encoder"], False),
            "modalities.image.fixed_positions": (image["fixed_positions"], True),
            "modalities.image.embed_dim": (image["embed_dim"], m["embed_dim"]),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(f"cfg {name} = {value!r}: only {wanted!r} (the EAT / SSLAM setting) is ported")
        return cls(
            depth=int(m["depth"]), num_heads=int(m["num_heads"]), embed_dim=int(m["embed_dim"]),
            mlp_ratio=float(m["mlp_ratio"]), norm_eps=float(m["norm_eps"]), norm_affine=bool(m["norm_affine"]),
            patch_size=int(image["patch_size"]), num_extra_tokens=int(image["num_extra_tokens"]),
            max_length=int(image["max_length"]),
            target_length=int(task.get("target_length", image["target_length"])),
        )

    def to_checkpoint_cfg(self) -> dict[str, Any]:
        """The fairseq cfg layout (the keys this port reads), as in a released checkpoint."""
        image = {
            "_name": None, "type": MODALITY, "in_chans": 1, "patch_size": self.patch_size,
            "embed_dim": self.embed_dim, "num_extra_tokens": self.num_extra_tokens, "init_extra_token_zero": False,
            "prenet_depth": 0, "max_length": self.max_length, "target_length": self.target_length,
            "use_alibi_encoder": False, "fixed_positions": True, "num_alibi_heads": self.num_heads,
            "model_depth": self.depth,
            "decoder": {"decoder_dim": self.embed_dim, "decoder_groups": 16, "decoder_kernel": 3,
                        "decoder_layers": 6, "input_dropout": 0.0},
        }
        model = {
            "_name": MODEL_NAME, "depth": self.depth, "num_heads": self.num_heads, "embed_dim": self.embed_dim,
            "mlp_ratio": self.mlp_ratio, "norm_eps": self.norm_eps, "norm_affine": self.norm_affine,
            "layer_norm_first": False, "supported_modality": MODALITY, "modalities": {"image": image},
            "encoder_dropout": 0.0, "post_mlp_drop": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        }
        task = {"_name": "mae_image_pretraining", "target_length": self.target_length, "audio_mae": True}
        out = {"model": model, "task": task}
        if (self.fbank_mean, self.fbank_std) != (FBANK_MEAN, FBANK_STD):
            out["fbank"] = {"mean": self.fbank_mean, "std": self.fbank_std}  # not an official key
        return out

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of the fields (the content identity used by the embedding cache)."""
        return {"family": "eat", **dataclasses.asdict(self)}


def eat_base() -> EATConfig:
    """EAT-base / SSLAM sizes: 12 x 768, 12 heads, ~88 M parameters."""
    return EATConfig()


def eat_tiny() -> EATConfig:
    """Same architecture at test size (2 blocks x 64, 4 heads, positions for 20 s)."""
    return EATConfig(depth=2, num_heads=4, embed_dim=64, max_length=128)


EAT_CONFIGS: dict[str, Callable[[], EATConfig]] = {"eat_base": eat_base, "eat_tiny": eat_tiny}


# --------------------------------------------------------------------------------------------------
# Front end: waveform -> normalised Kaldi fbank of a fixed length -> patch grid
# --------------------------------------------------------------------------------------------------


def num_fbank_frames(num_samples: int) -> int:
    """Kaldi frames of a clip (snip_edges, 25 ms / 10 ms at 16 kHz)."""
    frame_length = int(SAMPLE_RATE_HZ * FRAME_LENGTH_MS * 0.001)
    frame_shift = int(SAMPLE_RATE_HZ * FRAME_SHIFT_MS * 0.001)
    if num_samples < frame_length:
        raise ValueError(f"a clip of {num_samples} samples is shorter than one 25 ms fbank frame")
    return 1 + (num_samples - frame_length) // frame_shift


def input_frames(num_samples: int, target_length: int | None, patch_size: int = 16) -> int:
    """Frames the encoder sees: `target_length` (official: pad / crop), or None = the clip's frames
    rounded up to a multiple of the patch (the official README's recipe for variable lengths)."""
    if target_length is not None:
        return target_length
    return -(-num_fbank_frames(num_samples) // patch_size) * patch_size


def fbank_features(waveforms: Tensor, target_length: int | None = 1024, fbank_mean: float = FBANK_MEAN,
                   fbank_std: float = FBANK_STD, patch_size: int = 16) -> Tensor:
    """(B, S) waveforms at 16 kHz in [-1, 1] -> normalised fbank (B, frames, 128), as the official front end.

    Per clip: remove the mean, Kaldi fbank (htk_compat, hanning window, no energy, no dither), zero-pad
    or crop to the frame count (`input_frames`), then (x - mean) / (2 std). Padding happens before the
    normalisation, as upstream. Always fp32 with autocast off.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    frames = input_frames(waveforms.shape[1], target_length, patch_size)
    with torch.autocast(device_type=waveforms.device.type, enabled=False):
        feats = []
        for w in waveforms:  # kaldi.fbank reads one channel only
            w = w.float()
            fb = kaldi.fbank((w - w.mean()).unsqueeze(0), htk_compat=True, sample_frequency=SAMPLE_RATE_HZ,
                             use_energy=False, window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0,
                             frame_length=FRAME_LENGTH_MS, frame_shift=FRAME_SHIFT_MS)  # (frames, 128)
            fb = F.pad(fb, (0, 0, 0, frames - fb.shape[0])) if fb.shape[0] < frames else fb[:frames]
            feats.append(fb)
        fbank = torch.stack(feats)
    return (fbank - fbank_mean) / (2 * fbank_std)


def sincos_positions(embed_dim: int, rows: int, cols: int) -> Tensor:
    """(rows * cols, D) fixed 2-D sin-cos embedding, row-major (index r * cols + c), as `mae.py`.

    First half of D encodes the column (mel patch), second half the row (time patch): upstream's
    meshgrid puts the width first. Each half is [sin(p w), cos(p w)], w_i = 10000^(-i / (D / 4)).
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_d(pos: Tensor) -> Tensor:
        out = pos.double()[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    row = torch.arange(rows).repeat_interleave(cols)
    col = torch.arange(cols).repeat(rows)
    return torch.cat([one_d(col), one_d(row)], dim=1).float()


# --------------------------------------------------------------------------------------------------
# Modules (named as upstream so the state dict keys match)
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (modules.py `AltAttention`, no ALiBi)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale hd^-0.5, as upstream
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm `Mlp`, the keys `mlp.fc1` / `mlp.fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block (modules.py `AltBlock`, layer_norm_first=False)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, affine: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)  # mae.py `PatchEmbed_new`


class _Positions(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(1, num, dim), requires_grad=False)  # fixed, stored


class _ContextEncoder(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)  # prenet_depth = 0: norm only


class _ImageEncoder(nn.Module):
    """The `modality_encoders.IMAGE` sub-tree: patch conv, CLS, fixed positions, input LayerNorm."""

    def __init__(self, cfg: EATConfig):
        super().__init__()
        self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, cfg.embed_dim))
        self.local_encoder = _PatchEmbed(cfg.embed_dim, cfg.patch_size)
        self.fixed_positional_encoder = _Positions(cfg.max_length * cfg.freq_patches, cfg.embed_dim)
        self.context_encoder = _ContextEncoder(cfg.embed_dim, cfg.norm_eps, cfg.norm_affine)


class EAT(nn.Module):
    """EAT / SSLAM encoder with the official parameter names (strict load of the released checkpoints).

    `target_length` (attribute, default `cfg.target_length` = 1024 frames): every clip is padded or
    cropped to it, as the official pipelines do; set it to None to use each batch's own length rounded up
    to 16 frames (shorter clips then get a shorter grid, e.g. 3 s -> (19, 8) instead of (64, 8)).
    """

    def __init__(self, cfg: EATConfig):
        super().__init__()
        self.cfg = cfg
        self.target_length: int | None = cfg.target_length
        self._frozen = False
        self.modality_encoders = nn.ModuleDict({MODALITY: _ImageEncoder(cfg)})
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.norm_affine)
            for _ in range(cfg.depth)
        ])
        _init_weights(self)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim  # D of every layer's (B, T*F, D) output

    @property
    def image(self) -> _ImageEncoder:
        return self.modality_encoders[MODALITY]

    def freeze(self) -> EAT:
        """Eval, no gradients, and later `.train()` calls keep it in eval. Returns self."""
        self._frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> EAT:
        return super().train(mode and not self._frozen)

    def grid(self, num_samples: int) -> tuple[int, int]:
        """(T, F) patch grid for clips of `num_samples` samples at 16 kHz. 10 s -> (64, 8)."""
        frames = input_frames(num_samples, self.target_length, self.cfg.patch_size)
        return frames // self.cfg.patch_size, self.cfg.freq_patches

    # -- forward -----------------------------------------------------------------------------------

    def preprocess(self, waveforms: Tensor) -> Tensor:
        """(B, S) waveforms at 16 kHz in [-1, 1] -> normalised fbank (B, frames, 128), fp32."""
        return fbank_features(waveforms, self.target_length, self.cfg.fbank_mean, self.cfg.fbank_std,
                              self.cfg.patch_size)

    def patch_tokens(self, fbank: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, frames, 128) fbank -> encoder input (B, 1 + T*F, D) with the CLS first, and the grid (T, F)."""
        image = self.image
        x = image.local_encoder.proj(fbank.unsqueeze(1).to(image.local_encoder.proj.weight.dtype))
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, T*F, D), index t*F + f
        positions = image.fixed_positional_encoder.positions
        if x.shape[1] > positions.shape[1]:
            raise ValueError(f"{grid[0]} patch rows exceed the {self.cfg.max_length} rows with a position "
                             f"embedding ({self.cfg.max_length * self.cfg.patch_size / 100:.2f} s of audio)")
        x = x + positions[:, : x.shape[1]]
        x = torch.cat([image.extra_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return image.context_encoder.norm(x), grid

    def encode(self, waveforms: Tensor, layers: int | Sequence[int] | None = None,
               ) -> tuple[list[Tensor], list[Tensor], tuple[int, int]]:
        """Blocks 1..max(layers): patch tokens (B, T*F, D) time-major, CLS tokens (B, D), grid (T, F)."""
        return self.encode_fbank(self.preprocess(waveforms), layers)

    def encode_fbank(self, fbank: Tensor, layers: int | Sequence[int] | None = None,
                     ) -> tuple[list[Tensor], list[Tensor], tuple[int, int]]:
        """`encode` from a precomputed normalised fbank (B, frames, 128), frames a multiple of 16."""
        max_layer = deepest_layer(layers, self.num_layers)
        x, grid = self.patch_tokens(fbank)
        extra = self.cfg.num_extra_tokens
        tokens, cls = [], []
        for block in self.blocks[:max_layer]:  # blocks above max_layer never run
            x = block(x)
            tokens.append(x[:, extra:])
            cls.append(x[:, extra - 1])
        return tokens, cls, grid

    def extract_layers(self, waveforms: Tensor, padding_mask: Tensor | None = None,
                       layers: int | Sequence[int] | None = None) -> tuple[list[Tensor], tuple[int, int]]:
        """Outputs of blocks 1..max(layers) (1-based) without the CLS, each (B, N = T*F, D), and (T, F).

        Same contract as `BEATs.extract_layers`. `padding_mask` is not supported (the official
        feature extraction has none: clips are zero-padded in the fbank domain) and must be None.
        """
        if padding_mask is not None:
            raise ValueError("EAT.extract_layers takes no padding_mask: clips are padded to target_length "
                             "in the fbank domain, as the official feature extraction does")
        tokens, _, grid = self.encode(waveforms, layers)
        return tokens, grid

    def forward(self, waveforms: Tensor) -> Tensor:
        """Last block's patch tokens (B, N, D): official `extract_features(...)['x']` without the CLS."""
        return self.encode(waveforms)[0][-1]


@torch.no_grad()
def _init_weights(model: EAT) -> None:
    """Official initialisation: BERT normal(0.02) for Linear, xavier-uniform patch conv, N(0, 1) CLS
    (`init_extra_token_zero: false`), fixed sin-cos positions."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.02)
            module.bias.zero_()
    image = model.image
    w = image.local_encoder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(image.extra_tokens)
    cfg = model.cfg
    image.fixed_positional_encoder.positions.copy_(
        sincos_positions(cfg.embed_dim, cfg.max_length, cfg.freq_patches).unsqueeze(0))


# --------------------------------------------------------------------------------------------------
# Checkpoints: fairseq layout {'cfg': {'model', 'task', ...}, 'model': state_dict, ...}
# --------------------------------------------------------------------------------------------------


class EATCheckpointError(CheckpointError):
    """An EAT checkpoint that is missing, unreadable, of another family, or does not match its own cfg."""


def encoder_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a checkpoint's state dict into (encoder entries, skipped pre-training-only keys)."""
    encoder, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith(PRETRAINING_PREFIXES):
            skipped.append(key)
        else:
            encoder[key] = value
    return encoder, skipped


def check_state_dict(model: EAT, state_dict: Mapping[str, Any], source: str | os.PathLike = "state dict") -> None:
    """Raise EATCheckpointError naming `source` and the first differing keys/shapes (`ckpt_io.check_state_dict`)."""
    from retain_asd.models.ckpt_io import check_state_dict as check_strict

    check_strict(model, state_dict, source, family="EAT", error=EATCheckpointError)


def is_checkpoint(ckpt: Any) -> bool:
    """A loaded checkpoint in the fairseq layout of EAT / SSLAM (cfg.model._name = data2vec_multi)."""
    return is_eat_checkpoint(ckpt)


def from_checkpoint(ckpt: Mapping[str, Any], source: str | os.PathLike,
                    map_location: str | torch.device | None = "cpu") -> EAT:
    """EAT built from a loaded checkpoint dict, its encoder weights loaded strictly; eval mode on `map_location`."""
    model = model_from_checkpoint(ckpt, source)
    return model.to(map_location) if isinstance(map_location, str | torch.device) else model


def model_from_checkpoint(ckpt: Mapping[str, Any], source: str | os.PathLike) -> EAT:
    """Build EAT from a loaded checkpoint dict and load its encoder weights strictly."""
    if not is_eat_checkpoint(ckpt):
        raise EATCheckpointError(f"{source}: not an EAT checkpoint; expected the fairseq layout with "
                                 f"cfg.model._name = {MODEL_NAME!r} and 'model'")
    if "model" not in ckpt:
        raise EATCheckpointError(f"{source}: EAT checkpoint without 'model' (the state dict)")
    try:
        cfg = EATConfig.from_checkpoint_cfg(ckpt["cfg"])
    except (TypeError, ValueError) as err:
        raise EATCheckpointError(f"{source}: invalid cfg: {err}") from err
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
        model = EAT(cfg)
    if not isinstance(ckpt["model"], Mapping):
        raise EATCheckpointError(f"{source}: 'model' must be a state dict, got {type(ckpt['model']).__name__}")
    encoder, _ = encoder_state_dict(ckpt["model"])
    check_state_dict(model, encoder, source)
    model.load_state_dict(encoder, strict=True)
    return model.eval()


def load_eat(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> EAT:
    """Build EAT from `ckpt['cfg']` and load the encoder of `ckpt['model']` strictly (weights_only load).

    Pre-training-only entries (CNN decoder, `_ema` teacher, other heads: `PRETRAINING_PREFIXES`) are
    skipped; every other key must be an encoder parameter of the shape its cfg gives. Eval mode.
    """
    from retain_asd.models.ckpt_io import CheckpointError, detect_family, read_checkpoint

    path = Path(path)
    try:
        ckpt = read_checkpoint(path, map_location, what="an EAT / SSLAM checkpoint such as EAT-base_epoch30_pt.pt")
    except CheckpointError as err:
        raise EATCheckpointError(str(err)) from err
    if detect_family(ckpt) == "beats":
        raise EATCheckpointError(f"{path}: this is a BEATs checkpoint (flat BEATs cfg), not an EAT one; "
                                 "load it with load_beats or set model.family=beats")
    model = model_from_checkpoint(ckpt, path)
    if isinstance(map_location, str | torch.device):
        model.to(map_location)
    return model


def checkpoint_dict(model: EAT, pretraining_heads: bool = True, seed: int = 0) -> dict[str, Any]:
    """Official fairseq layout of `model`: cfg, state dict (+ a random CNN decoder as a real
    pre-training checkpoint carries one), and the bookkeeping entries fairseq writes."""
    cfg = model.cfg.to_checkpoint_cfg()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if pretraining_heads:
        dec = cfg["model"]["modalities"]["image"]["decoder"]
        gen = torch.Generator().manual_seed(seed + 1)
        dim, groups, kernel = dec["decoder_dim"], dec["decoder_groups"], dec["decoder_kernel"]
        for i in range(dec["decoder_layers"]):  # Decoder2d: grouped conv per block, then a Linear
            in_dim = model.cfg.embed_dim if i == 0 else dim
            state[f"{PREFIX}decoder.blocks.{i}.0.weight"] = 0.02 * torch.randn(dim, in_dim // groups, kernel,
                                                                              kernel, generator=gen)
            state[f"{PREFIX}decoder.blocks.{i}.0.bias"] = torch.zeros(dim)
        state[f"{PREFIX}decoder.proj.weight"] = 0.02 * torch.randn(model.cfg.embed_dim, dim, generator=gen)
        state[f"{PREFIX}decoder.proj.bias"] = torch.zeros(model.cfg.embed_dim)
        state["_ema"] = {k: v.clone() for k, v in state.items() if k.startswith("blocks.")}
    return {"args": None, "cfg": cfg, "model": state, "criterion": None, "optimizer_history": [],
            "task_state": {}, "extra_state": {"previous_training_time": 0.0}, "last_optimizer_state": None}


def save_eat(model: EAT, path: str | os.PathLike, pretraining_heads: bool = True) -> Path:
    """Write the official fairseq layout atomically (`checkpoint_dict`)."""
    from retain_asd.models.ckpt_io import atomic_save

    return atomic_save(checkpoint_dict(model, pretraining_heads), path)


def write_random_checkpoint(path: str | os.PathLike, cfg: EATConfig, seed: int = 0,
                            pretraining_heads: bool = True) -> Path:
    """Official-layout checkpoint of a freshly initialised EAT (seeded; the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EAT(cfg)
    return save_eat(model, path, pretraining_heads)


# Released checkpoints of the paper's Table-2 rows (presets eat10, eat30, sslam): what to download.
RELEASED = {
    "eat10": "the EAT-base pre-trained checkpoint, 10 epochs (EAT-base_epoch10_pt.pt; github.com/cwx-worst-one/EAT, "
             "README 'Pre-trained (10 epochs)')",
    "eat30": "the EAT-base pre-trained checkpoint, 30 epochs (EAT-base_epoch30_pt.pt; github.com/cwx-worst-one/EAT, "
             "README 'EAT-base (Epoch 30, Pre-trained)', Google Drive link)",
    "sslam": "the SSLAM pre-trained checkpoint (github.com/ta012/SSLAM, README 'Pre-Trained', Google Drive link)",
}

__all__ = [
    "EAT", "EATCheckpointError", "EATConfig", "EAT_CONFIGS", "FBANK_MEAN", "FBANK_STD", "PRETRAINING_PREFIXES",
    "RELEASED", "check_state_dict", "checkpoint_dict", "eat_base", "eat_tiny", "encoder_state_dict",
    "fbank_features", "from_checkpoint", "input_frames", "is_checkpoint", "is_eat_checkpoint", "load_eat",
    "model_from_checkpoint", "num_fbank_frames",
    "save_eat", "sincos_positions", "write_random_checkpoint",
]
