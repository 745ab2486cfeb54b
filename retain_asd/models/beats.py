"""BEATs audio encoder: official checkpoint layout, every block's output, Kaldi fbank front end.

Paper: S. Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", ICML 2023, arXiv:2212.09058.
Official code: https://github.com/microsoft/unilm/tree/master/beats (`BEATs.py`, `backbone.py`,
`modules.py`). This file is an independent port that keeps the official parameter names, so the released
checkpoints (`BEATs_iter3.pt`, `BEATs_iter3_plus_AS2M.pt`, the fine-tuned `..._cpt1/2.pt`) load strictly
and what `save_beats` writes loads strictly into the official code.

Data flow for one 10 s clip at 16 kHz (iter3 sizes):

    waveform (160000,) x 2^15 -> Kaldi fbank (998, 128) -> (x - 15.41663) / (2 * 6.55582)
    -> patch conv 16x16 stride 16, no bias          (512, 62, 8)
    -> tokens time-major, index t*8 + f             (496, 512)
    -> LayerNorm(512) -> Linear 512->768            (496, 768)
    -> x + GELU(weight-norm grouped conv k=128)     convolutional position embedding
    -> LayerNorm (post-LN model)
    -> 12 post-LN DeepNorm blocks, alpha = (2 L)^(1/4); gated relative-position bias
       (one table of 320 buckets shared by all blocks, gated per block)
    -> block k output = "layer k" (1-based, like the paper)

Numerics: fp32 or bf16 autocast only. fp16 overflows in the attention logits (a known upstream issue;
the official code's `alpha = 32` rescaling does not prevent it), so fp16 parameters or fp16 autocast
raise an error here. The attention runs through `F.scaled_dot_product_attention` with the gated
relative-position bias as an additive float mask; softmax is shift invariant, so this equals the
official `(q k^T * scaling / 32 - max) * 32 + bias` formulation up to float rounding (checked to 1e-4
against the official code with random weights, every layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain_asd import fsio
from retain_asd.models.ckpt_io import CheckpointError, read_checkpoint
from retain_asd.models.fbank import kaldi_fbank
from retain_asd.models.layers import deepest_layer

SAMPLE_RATE_HZ = 16000  # the official preprocessing hard-codes 16 kHz
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
WAVEFORM_SCALE = 2**15  # official: float waveform in [-1, 1] -> int16 range before Kaldi fbank

AttnImpl = Literal["sdpa", "explicit"]

# The keys of the official `BEATsConfig` class, in its order; `to_dict()` writes exactly these.
OFFICIAL_CFG_KEYS = (
    "input_patch_size", "embed_dim", "conv_bias",
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "activation_fn", "layer_wise_gradient_decay_ratio", "layer_norm_first", "deep_norm",
    "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
    "conv_pos", "conv_pos_groups",
    "relative_position_embedding", "num_buckets", "max_distance", "gru_rel_pos",
    "finetuned_model", "predictor_dropout", "predictor_class",
)  # fmt: skip

# Defaults of the official `BEATsConfig` class (BEATs.py). They differ from iter3's: a checkpoint cfg
# that omits a key gets these values, exactly as `BEATsConfig(checkpoint['cfg'])` does upstream.
OFFICIAL_CLASS_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1, "embed_dim": 512, "conv_bias": False,
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0, "layer_norm_first": False, "deep_norm": False,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
    "dropout_input": 0.0, "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280, "gru_rel_pos": False,
    "finetuned_model": False, "predictor_dropout": 0.1, "predictor_class": 527,
}  # fmt: skip


def _gelu_fp32(x: Tensor) -> Tensor:
    return F.gelu(x.float()).type_as(x)  # official `gelu`: computed in fp32 under autocast


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _gelu_fp32,
    "gelu_accurate": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    """BEATs hyper-parameters with the official key names; defaults are the BEATs_iter3 checkpoint's cfg.

    Build from a checkpoint with `BEATsConfig.from_dict(ckpt['cfg'])` (missing keys take the official
    *class* defaults, unknown keys are kept in `extra` and written back by `to_dict()`).
    """

    input_patch_size: int = 16  # patch side in (fbank frames, mel bins); official class default is -1
    embed_dim: int = 512  # patch-embedding width
    conv_bias: bool = False  # bias in the patch conv
    encoder_layers: int = 12  # transformer blocks
    encoder_embed_dim: int = 768  # transformer width D
    encoder_ffn_embed_dim: int = 3072  # FFN hidden width
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"  # FFN activation: gelu | gelu_accurate | relu | tanh | linear
    layer_wise_gradient_decay_ratio: float = 0.6  # gradient x ratio before every block (pre-training)
    layer_norm_first: bool = False  # pre-LN if True; iter3 is post-LN
    deep_norm: bool = True  # residual x (2 L)^(1/4) (DeepNet, Wang et al. 2022)
    dropout: float = 0.0  # after attention / FFN and on the encoder input
    attention_dropout: float = 0.0  # on attention probabilities
    activation_dropout: float = 0.0  # after the FFN activation
    encoder_layerdrop: float = 0.05  # probability of skipping a block in training
    dropout_input: float = 0.0  # on the patch tokens after projection
    conv_pos: int = 128  # kernel of the convolutional position embedding (in tokens)
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320  # relative-position buckets (half per direction)
    max_distance: int = 800  # tokens; beyond this all offsets share the last bucket
    gru_rel_pos: bool = True  # gate the relative-position bias per query (grep_linear, grep_a)
    finetuned_model: bool = False  # adds `predictor` (AudioSet head) as in the fine-tuned checkpoints
    predictor_dropout: float = 0.0  # value in the fine-tuned iter3 cfgs (official class default 0.1)
    predictor_class: int = 527  # AudioSet classes
    fbank_mean: float = 15.41663  # fbank normalisation (official `preprocess` arguments, not cfg keys)
    fbank_std: float = 6.55582
    extra: dict = dataclasses.field(default_factory=dict)  # unknown cfg keys, kept for the round trip

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"BEATsConfig.{name}={getattr(self, name)!r}: {why}")

        if self.input_patch_size < 1:
            raise bad("input_patch_size", "must be >= 1 (BEATs checkpoints use 16); the official class "
                      "default -1 means the checkpoint cfg did not set it")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise bad("encoder_embed_dim", f"must be divisible by encoder_attention_heads="
                      f"{self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise bad("conv_pos_groups", f"must divide encoder_embed_dim={self.encoder_embed_dim}")
        if self.activation_fn not in _ACTIVATIONS:
            raise bad("activation_fn", f"supported: {sorted(_ACTIVATIONS)} ('glu' is not used by any "
                      "released BEATs checkpoint and is not ported)")
        if self.deep_norm and self.layer_norm_first:
            raise bad("deep_norm", "DeepNorm is a post-LN scheme; set layer_norm_first=False")
        if self.fbank_std <= 0:
            raise bad("fbank_std", "must be > 0")
        if self.encoder_layers < 1:
            raise bad("encoder_layers", "must be >= 1")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BEATsConfig:
        """Config from an official cfg dict (as stored in `ckpt['cfg']`), filled like the official class."""
        if not isinstance(cfg, Mapping):
            raise TypeError(f"BEATs cfg must be a dict, got {type(cfg).__name__}")
        merged = {**OFFICIAL_CLASS_DEFAULTS, **cfg}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in merged.items() if k in names}
        extra = {k: v for k, v in merged.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Official cfg layout: the 25 official keys (+ fbank stats when not the defaults, + extra)."""
        out = {k: getattr(self, k) for k in OFFICIAL_CFG_KEYS}
        for name in ("fbank_mean", "fbank_std"):
            if getattr(self, name) != _FIELD_DEFAULTS[name]:
                out[name] = getattr(self, name)  # the official class stores unknown keys as attributes
        out.update(self.extra)
        return out


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BEATsConfig) if f.name != "extra"}


def beats_base() -> BEATsConfig:
    """BEATs_iter3 sizes (the cfg stored in BEATs_iter3.pt / BEATs_iter3_plus_AS2M.pt): 12 x 768, ~90 M."""
    return BEATsConfig()


def beats_tiny() -> BEATsConfig:
    """Same architecture at test size (3 blocks x 64, 4 heads): every code path of iter3, fast on a CPU."""
    return dataclasses.replace(
        BEATsConfig(), embed_dim=32, encoder_layers=3, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
        encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4,
    )


BEATS_CONFIGS: dict[str, Callable[[], BEATsConfig]] = {"beats_base": beats_base, "beats_tiny": beats_tiny}


# --------------------------------------------------------------------------------------------------
# Front end: waveform -> normalised Kaldi fbank -> patch grid
# --------------------------------------------------------------------------------------------------


def patch_grid(
    num_samples: int, sample_rate_hz: int = SAMPLE_RATE_HZ, patch_size: int = 16,
    num_mel_bins: int = NUM_MEL_BINS,
) -> tuple[int, int]:
    """(T, F) patch grid of a clip: Kaldi frames (snip_edges) // patch, mel bins // patch. 10 s -> (62, 8)."""
    # Same integer arithmetic as torchaudio.compliance.kaldi (`int(sample_frequency * ms * 0.001)`).
    frame_length = int(sample_rate_hz * FRAME_LENGTH_MS * 0.001)
    frame_shift = int(sample_rate_hz * FRAME_SHIFT_MS * 0.001)
    min_samples = frame_length + (patch_size - 1) * frame_shift
    if num_samples < min_samples:
        raise ValueError(f"a clip of {num_samples} samples gives fewer than {patch_size} fbank frames; "
                         f"BEATs needs >= {min_samples} samples ({min_samples / sample_rate_hz:.3f} s)")
    num_frames = 1 + (num_samples - frame_length) // frame_shift
    return num_frames // patch_size, num_mel_bins // patch_size


def fbank_features(waveforms: Tensor, fbank_mean: float = 15.41663, fbank_std: float = 6.55582) -> Tensor:
    """(B, S) waveforms at 16 kHz -> normalised log-mel fbank (B, T_frames, 128), as official `preprocess`.

    Always computed in fp32 with autocast off: the fbank's FFT/mel matmul in bf16 would shift the
    features the checkpoints were trained on (the official code has no guard; identical in fp32). The whole
    batch in one pass (`fbank.kaldi_fbank`), equal to the official per-clip `kaldi.fbank` loop.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    patch_grid(waveforms.shape[1])  # clear error for too-short clips
    fbank = kaldi_fbank(waveforms.float() * WAVEFORM_SCALE, NUM_MEL_BINS, SAMPLE_RATE_HZ, FRAME_LENGTH_MS,
                        FRAME_SHIFT_MS)  # (B, T_frames, 128), fp32, one batched pass (models/fbank.py)
    return (fbank - fbank_mean) / (2 * fbank_std)  # official normalisation: note the factor 2


def reduce_padding_mask(padding_mask: Tensor, length: int) -> Tensor:
    """(B, S) bool padding mask -> (B, length): drop the remainder, group, pad where the whole group is.

    Port of the official `forward_padding_mask`, applied as upstream: samples -> fbank frames, then
    frames -> tokens. For tokens it groups frames [k i, k i + k) with k = frames // tokens, which is
    only an approximation of patch t = i // F in the time-major order; kept so the fine-tuned
    checkpoints see the masks they were trained with and outputs match the official code.
    """
    extra = padding_mask.size(1) % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.view(padding_mask.size(0), length, -1).all(-1)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5-style buckets (backbone.py `_relative_positions_bucket`).

    Half the buckets per direction (key after query -> upper half); within a direction the first half
    are exact offsets, the rest log-spaced up to `max_distance`, clamped to the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those small offsets take the exact branch below anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


@functools.lru_cache(maxsize=16)
def _bucket_grid(num_tokens: int, num_buckets: int, max_distance: int) -> Tensor:
    """(N, N) bucket of key j for query i (offset j - i); cached per length, never modified in place."""
    position = torch.arange(num_tokens)
    return relative_position_bucket(position[None, :] - position[:, None], num_buckets, max_distance)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                       dropout_p: float) -> Tensor:
    """softmax(q k^T * scale + mask) v, written out; the reference the SDPA path is benchmarked against."""
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ v  # (B, H, N, hd)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient x scale backward (official `GradMultiply`)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight normalisation over dim 2 (Salimans & Kingma 2016).

    Owns `weight_g` (1, 1, K) and `weight_v` (C, C/groups, K) so the official keys
    `encoder.pos_conv.0.weight_g/_v` load as they are (the deprecated `nn.utils.weight_norm` used
    upstream creates the same names; the parametrizations version would rename them).
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.padding = kernel_size // 2
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N) -> (B, C, N + 1 - K % 2)
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)  # g * v / ||v||, norm over dims != 2
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class GatedRelPosAttention(nn.Module):
    """Multi-head self-attention with a gated relative-position bias (BEATs / WavLM, backbone.py).

    bias_h(i, j) = gate_h(i) * table[bucket(j - i), h], gate = a * (b * grep_a - 1) + 2 with
    (a, b) = sigmoid of the summed halves of `grep_linear(q_h(i))` (q before scaling).
    """

    def __init__(self, embed_dim: int, num_heads: int, attention_dropout: float, gru_rel_pos: bool,
                 relative_attention_bias: nn.Embedding | None, attn_impl: AttnImpl = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.attn_impl = attn_impl
        if relative_attention_bias is not None:
            # The same module in every block: its key appears under every layer, as in official checkpoints.
            self.relative_attention_bias = relative_attention_bias
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def rel_pos_gate(self, q: Tensor) -> Tensor:
        """(B, H, N, hd) unscaled queries -> (B, H, N, 1) gate in (1, 2 + ...) per query and head.

        Official: sigmoid(grep_linear(q).view(..., 2, 4).sum(-1)); the sum over each group of 4 outputs is
        folded into the weights first (a linear map of 2 outputs, not 8 then a sum: same value).
        """
        w = self.grep_linear.weight.view(2, 4, -1).sum(1)  # (2, hd)
        b = self.grep_linear.bias.view(2, 4).sum(1)  # (2,)
        gate_a, gate_b = torch.sigmoid(F.linear(q, w, b)).chunk(2, dim=-1)  # (B, H, N, 1) each
        return gate_a * (gate_b * self.grep_a - 1.0) + 2.0

    def forward(self, x: Tensor, position_bias: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        B, N, D = x.shape
        # q, k, v in one matrix product (one pass over x); the parameters keep the official names.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3D, D)
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, weight, bias).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each

        mask = None
        if position_bias is not None:
            mask = position_bias.unsqueeze(0)  # (1, H, N, N)
            if self.gru_rel_pos:
                mask = self.rel_pos_gate(q) * mask  # (B, H, N, N)
        if key_padding_mask is not None:
            pad = torch.zeros(B, 1, 1, N, device=x.device).masked_fill(key_padding_mask[:, None, None, :],
                                                                       float("-inf"))
            mask = pad if mask is None else mask + pad
        if mask is not None:
            mask = mask.to(q.dtype)  # SDPA wants the mask in the query dtype (bf16 under autocast)

        dropout_p = self.attention_dropout if self.training else 0.0
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 scale=self.scaling)
        else:
            out = explicit_attention(q, k, v, mask, self.scaling, dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class EncoderLayer(nn.Module):
    """One transformer block: post-LN with DeepNorm residual scaling (iter3) or pre-LN."""

    def __init__(self, embed_dim: int, ffn_embed_dim: int, num_heads: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, activation_fn: str,
                 layer_norm_first: bool, deep_norm_alpha: float, gru_rel_pos: bool,
                 relative_attention_bias: nn.Embedding | None):
        super().__init__()
        self.self_attn = GatedRelPosAttention(embed_dim, num_heads, attention_dropout, gru_rel_pos,
                                              relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.activation = _ACTIVATIONS[activation_fn]
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.layer_norm_first = layer_norm_first
        self.deep_norm_alpha = deep_norm_alpha

    def _ffn(self, x: Tensor) -> Tensor:
        x = F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)

    def forward(self, x: Tensor, position_bias: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            attn = self.self_attn(self.self_attn_layer_norm(x), position_bias, key_padding_mask)
            x = x + F.dropout(attn, self.dropout, self.training)
            return x + self._ffn(self.final_layer_norm(x))
        # DeepNet (arXiv:2203.00555): x_{l+1} = LN(alpha * x_l + f(x_l)).
        attn = F.dropout(self.self_attn(x, position_bias, key_padding_mask), self.dropout, self.training)
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + attn)
        return self.final_layer_norm(x * self.deep_norm_alpha + self._ffn(x))


class TransformerEncoder(nn.Module):
    """Convolutional position embedding + blocks; the official `encoder.*` sub-tree."""

    def __init__(self, embed_dim: int, ffn_embed_dim: int, num_layers: int, num_heads: int, conv_pos: int,
                 conv_pos_groups: int, dropout: float, attention_dropout: float, activation_dropout: float,
                 activation_fn: str, layer_norm_first: bool, deep_norm: bool,
                 relative_position_embedding: bool, num_buckets: int, max_distance: int, gru_rel_pos: bool):
        super().__init__()
        # nn.Sequential only for the official key prefix `pos_conv.0.`; trim + GELU happen in forward.
        self.pos_conv = nn.Sequential(WeightNormConv1d(embed_dim, conv_pos, conv_pos_groups))
        self.trim_last = conv_pos % 2 == 0  # official SamePad: an even kernel yields one extra frame
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        table = nn.Embedding(num_buckets, num_heads) if relative_position_embedding else None
        alpha = (2 * num_layers) ** 0.25 if deep_norm else 1.0
        self.layers = nn.ModuleList([
            EncoderLayer(embed_dim, ffn_embed_dim, num_heads, dropout, attention_dropout, activation_dropout,
                         activation_fn, layer_norm_first, alpha, gru_rel_pos, table)
            for _ in range(num_layers)
        ])
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.layer_norm_first = layer_norm_first
        self.dropout = dropout

    def position_bias(self, num_tokens: int) -> Tensor | None:
        """(H, N, N) ungated relative-position bias from the shared table; computed once per forward."""
        attn = self.layers[0].self_attn
        if not hasattr(attn, "relative_attention_bias"):
            return None
        buckets = _bucket_grid(num_tokens, self.num_buckets, self.max_distance)
        table = attn.relative_attention_bias
        return table(buckets.to(table.weight.device)).permute(2, 0, 1)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, num_layers: int, layerdrop: float,
                grad_decay_ratio: float) -> list[Tensor]:
        """(B, N, D) projected patch tokens -> outputs of blocks 1..num_layers, each (B, N, D)."""
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        x_conv = self.pos_conv(x.transpose(1, 2))  # (B, D, N + 1) for an even kernel
        if self.trim_last:
            x_conv = x_conv[:, :, :-1]
        x = x + F.gelu(x_conv).transpose(1, 2)  # (B, N, D)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)

        position_bias = self.position_bias(x.shape[1])
        outputs = []
        for layer in self.layers[:num_layers]:  # early exit: blocks above num_layers never run
            if grad_decay_ratio != 1.0:
                x = _ScaleGrad.apply(x, grad_decay_ratio)
            if not (self.training and layerdrop > 0 and torch.rand(()).item() < layerdrop):
                x = layer(x, position_bias, key_padding_mask)
            outputs.append(x)
        return outputs


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class BEATs(nn.Module):
    """BEATs encoder with the official parameter names (strict load both ways).

    Train-mode switches (attributes, both default False):
      * `layerdrop`: skip each block with probability `cfg.encoder_layerdrop` in train mode.
      * `grad_decay`: multiply the gradient by `cfg.layer_wise_gradient_decay_ratio` before every block.
    iter3's cfg turns both on for its own pre-training. They stay off by default here because our
    student is fine-tuned end to end and read at a fixed layer (6): layerdrop makes layer k's output
    stochastic (the layer-k loss would sometimes train a copy of layer k-1), and a 0.6 decay over 12
    blocks scales the bottom block's gradient by 0.6^12 ~ 2e-3, nearly freezing it at lr 1e-4. Turn them
    on explicitly to reproduce the official training behaviour. A teacher uses `freeze()`.
    """

    def __init__(self, cfg: BEATsConfig, attn_impl: AttnImpl = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.layerdrop = False
        self.grad_decay = False
        self.label_dict: dict | None = None  # AudioSet index -> label, from fine-tuned checkpoints
        self._frozen = False
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.input_patch_size,
                                         stride=cfg.input_patch_size, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.encoder = TransformerEncoder(
            cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_layers, cfg.encoder_attention_heads,
            cfg.conv_pos, cfg.conv_pos_groups, cfg.dropout, cfg.attention_dropout, cfg.activation_dropout,
            cfg.activation_fn, cfg.layer_norm_first, cfg.deep_norm, cfg.relative_position_embedding,
            cfg.num_buckets, cfg.max_distance, cfg.gru_rel_pos,
        )
        self.predictor = (nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
                          if cfg.finetuned_model else None)
        self.attn_impl = attn_impl
        _init_weights(self)

    # -- switches ----------------------------------------------------------------------------------

    @property
    def attn_impl(self) -> AttnImpl:
        """"sdpa" (F.scaled_dot_product_attention) or "explicit" (softmax(QK^T + bias) V written out)."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: AttnImpl) -> None:
        if impl not in ("sdpa", "explicit"):
            raise ValueError(f"attn_impl={impl!r}: use 'sdpa' or 'explicit'")
        self._attn_impl = impl
        for layer in self.encoder.layers:
            layer.self_attn.attn_impl = impl

    @property
    def num_layers(self) -> int:
        return self.cfg.encoder_layers

    @property
    def embed_dim(self) -> int:
        return self.cfg.encoder_embed_dim  # D of every layer's (B, T*F, D) output

    def freeze(self) -> BEATs:
        """Teacher mode: eval, no gradients, and later `.train()` calls keep it in eval. Returns self."""
        self._frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> BEATs:
        return super().train(mode and not self._frozen)

    def grid(self, num_samples: int) -> tuple[int, int]:
        """(T, F) token grid for clips of `num_samples` samples at 16 kHz."""
        return patch_grid(num_samples, SAMPLE_RATE_HZ, self.cfg.input_patch_size)

    # -- forward -----------------------------------------------------------------------------------

    def preprocess(self, waveforms: Tensor) -> Tensor:
        """(B, S) waveforms at 16 kHz in [-1, 1] -> normalised fbank (B, T_frames, 128), fp32."""
        return fbank_features(waveforms, self.cfg.fbank_mean, self.cfg.fbank_std)

    def patch_tokens(self, fbank: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, T_frames, 128) fbank -> encoder input tokens (B, T*F, D), time-major, and the grid (T, F).

        Token-local (each token sees only its own 16x16 fbank patch); mixing starts at `pos_conv`.
        """
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, T, F)
        grid = (x.shape[2], x.shape[3])
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # (B, T*F, E), index t*F + f
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, N, D)
        return x, grid

    def extract_layers_from_fbank(
        self, fbank: Tensor, frame_padding_mask: Tensor | None = None,
        layers: int | Sequence[int] | None = None,
    ) -> tuple[list[Tensor], tuple[int, int]]:
        """Like `extract_layers` from a precomputed (e.g. SpecAugmented) fbank (B, T_frames, 128).

        `frame_padding_mask` (B, T_frames) bool, True = padded frame.
        """
        hidden, grid, _ = self._encode(fbank, frame_padding_mask, deepest_layer(layers, self.num_layers))
        return hidden, grid

    def extract_layers(
        self, waveforms: Tensor, padding_mask: Tensor | None = None,
        layers: int | Sequence[int] | None = None,
    ) -> tuple[list[Tensor], tuple[int, int]]:
        """Outputs of blocks 1..max(layers) (1-based), each (B, N = T*F, D) time-major, and the grid (T, F).

        waveforms: (B, S) at 16 kHz; padding_mask: (B, S) bool, True = padded sample. Blocks above
        max(layers) are not computed. `layers=None` -> all blocks.
        """
        max_layer = deepest_layer(layers, self.num_layers)
        fbank = self.preprocess(waveforms)
        frame_mask = None if padding_mask is None else reduce_padding_mask(padding_mask, fbank.shape[1])
        hidden, grid, _ = self._encode(fbank, frame_mask, max_layer)
        return hidden, grid

    def forward(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Final features (B, N, D), as official `extract_features` of a pre-trained checkpoint."""
        return self._final(waveforms, padding_mask)[0]

    def logits(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Fine-tuned checkpoints: AudioSet logits (B, C), mean over non-padded tokens (official)."""
        if self.predictor is None:
            raise RuntimeError("this BEATs has no predictor: load a fine-tuned checkpoint "
                               "(cfg finetuned_model=True)")
        x, token_mask = self._final(waveforms, padding_mask)
        logits = self.predictor(F.dropout(x, self.cfg.predictor_dropout, self.training))  # (B, N, C)
        if token_mask is not None and token_mask.any():
            keep = (~token_mask).unsqueeze(-1)  # (B, N, 1)
            return (logits * keep).sum(1) / keep.sum(1)
        return logits.mean(dim=1)

    def predict(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """sigmoid(logits) (B, C): what official `extract_features` returns for a fine-tuned model."""
        return torch.sigmoid(self.logits(waveforms, padding_mask))

    def _final(self, waveforms: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        fbank = self.preprocess(waveforms)
        frame_mask = None if padding_mask is None else reduce_padding_mask(padding_mask, fbank.shape[1])
        hidden, _, token_mask = self._encode(fbank, frame_mask, self.num_layers)
        x = hidden[-1]
        if self.cfg.layer_norm_first:
            x = self.encoder.layer_norm(x)  # pre-LN models normalise once after the last block
        return x, token_mask

    def _encode(self, fbank: Tensor, frame_mask: Tensor | None,
                num_layers: int) -> tuple[list[Tensor], tuple[int, int], Tensor | None]:
        self._check_dtype()
        x, grid = self.patch_tokens(fbank)
        token_mask = None if frame_mask is None else reduce_padding_mask(frame_mask, x.shape[1])
        x = F.dropout(x, self.cfg.dropout_input, self.training)
        hidden = self.encoder(
            x, token_mask, num_layers,
            layerdrop=self.cfg.encoder_layerdrop if self.layerdrop else 0.0,
            grad_decay_ratio=self.cfg.layer_wise_gradient_decay_ratio if self.grad_decay else 1.0,
        )
        return hidden, grid, token_mask

    def _check_dtype(self) -> None:
        device = self.patch_embedding.weight.device.type
        fp16_autocast = (torch.is_autocast_enabled(device)
                         and torch.get_autocast_dtype(device) == torch.float16)
        if self.patch_embedding.weight.dtype == torch.float16 or fp16_autocast:
            raise RuntimeError("BEATs overflows to NaN in fp16 (known upstream issue); run in fp32 or "
                               "under torch.autocast(dtype=torch.bfloat16)")


@torch.no_grad()
def _init_weights(model: BEATs) -> None:
    """Official initialisation (backbone.py): BERT normal(0.02), DeepNorm xavier gains, pos-conv normal."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
    cfg = model.cfg
    conv = model.encoder.pos_conv[0]
    conv.weight_v.normal_(0.0, math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim)))
    conv.weight_g.copy_(torch.norm_except_dim(conv.weight_v, 2, 2))  # weight_norm starts with g = ||v||
    if cfg.deep_norm:
        beta = (8 * cfg.encoder_layers) ** -0.25  # DeepNet init for an encoder-only model
        for layer in model.encoder.layers:
            attn = layer.self_attn
            nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
            nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
            for weight in (attn.v_proj.weight, attn.out_proj.weight, layer.fc1.weight, layer.fc2.weight):
                nn.init.xavier_normal_(weight, gain=beta)


# --------------------------------------------------------------------------------------------------
# Checkpoints: {'cfg': dict, 'model': state_dict} (+ 'label_dict' when fine-tuned)
# --------------------------------------------------------------------------------------------------


class BEATsCheckpointError(CheckpointError, RuntimeError):
    """A BEATs checkpoint that is missing, unreadable, or does not match its own cfg."""


def check_state_dict(model: BEATs, state_dict: Mapping[str, Any],
                     source: str | os.PathLike = "state dict") -> None:
    """Raise BEATsCheckpointError naming `source` and the first differing keys/shapes (`ckpt_io.check_state_dict`),
    or when the layers' relative-position tables differ (BEATs shares layer 0's); else return."""
    from retain_asd.models.ckpt_io import check_state_dict as check_strict

    check_strict(model, state_dict, source, family="BEATs", error=BEATsCheckpointError)
    tables = [v for k, v in state_dict.items() if k.endswith("self_attn.relative_attention_bias.weight")]
    if any(not torch.equal(t, tables[0]) for t in tables[1:]):
        raise BEATsCheckpointError(f"{source}: relative_attention_bias differs between layers, but BEATs "
                                   "shares one table across all layers (layer 0's)")


def load_beats(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> BEATs:
    """Build BEATs from `ckpt['cfg']` and load `ckpt['model']` strictly (weights_only torch.load).

    Works for pre-trained (BEATs_iter3*.pt) and fine-tuned checkpoints (`predictor.*`, `label_dict`,
    kept as `model.label_dict`). Returns the model in eval mode on `map_location`.
    """
    path = Path(path)
    try:
        ckpt = read_checkpoint(path, map_location, what="a BEATs checkpoint such as BEATs_iter3.pt")
    except CheckpointError as err:
        raise BEATsCheckpointError(str(err)) from err
    return from_checkpoint(ckpt, path, map_location)


def is_checkpoint(ckpt: Any) -> bool:
    """A loaded checkpoint in the official BEATs layout: a flat cfg (with encoder_layers) and 'model'."""
    return isinstance(ckpt, Mapping) and isinstance(ckpt.get("cfg"), Mapping) and "model" in ckpt and \
        "encoder_layers" in ckpt["cfg"]


def from_checkpoint(ckpt: Any, path: str | os.PathLike,
                    map_location: str | torch.device | None = "cpu") -> BEATs:
    """BEATs built from a loaded checkpoint's cfg with its weights loaded strictly (`check_state_dict`); eval mode."""
    if not isinstance(ckpt, Mapping) or "cfg" not in ckpt or "model" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise BEATsCheckpointError(f"{path}: not a BEATs checkpoint; expected a dict with 'cfg' and 'model', "
                                   f"found {found}")
    from retain_asd.models.ckpt_io import is_eat_checkpoint

    if is_eat_checkpoint(ckpt):
        raise BEATsCheckpointError(f"{path}: this is an EAT / SSLAM checkpoint (fairseq data2vec_multi cfg), "
                                   "not a BEATs one; load it with load_eat or set model.family=eat")
    try:
        cfg = BEATsConfig.from_dict(ckpt["cfg"])
    except (TypeError, ValueError) as err:
        raise BEATsCheckpointError(f"{path}: invalid cfg: {err}") from err
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
        model = BEATs(cfg)
    check_state_dict(model, ckpt["model"], path)
    model.load_state_dict(ckpt["model"], strict=True)
    model.label_dict = ckpt.get("label_dict")
    if isinstance(map_location, str | torch.device):
        model.to(map_location)
    return model.eval()


def save_beats(model: BEATs, path: str | os.PathLike) -> Path:
    """Write `{'cfg', 'model'[, 'label_dict']}` atomically (temp file + os.replace), official layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] = {
        "cfg": model.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if model.label_dict is not None:
        ckpt["label_dict"] = model.label_dict
    return fsio.save_torch(ckpt, path)


def write_random_checkpoint(path: str | os.PathLike, cfg: BEATsConfig, seed: int = 0) -> Path:
    """Official-layout checkpoint of a freshly initialised BEATs (seeded; the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BEATs(cfg)
    return save_beats(model, path)


__all__ = [
    "BEATS_CONFIGS", "BEATs", "BEATsCheckpointError", "BEATsConfig", "OFFICIAL_CFG_KEYS", "beats_base",
    "beats_tiny", "check_state_dict", "explicit_attention", "fbank_features", "from_checkpoint", "is_checkpoint",
    "load_beats", "patch_grid",
    "reduce_padding_mask", "relative_position_bucket", "save_beats", "write_random_checkpoint",
]
