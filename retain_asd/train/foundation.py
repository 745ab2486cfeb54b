"""The stand-in foundation encoder: a small BEATs pre-trained on clean generic synthetic sounds, cached.

The paper continues pre-training BEATs iter3, an SSL encoder trained on single recordings, never on
synthetic mixtures (Sec. 2). With no BEATs checkpoint the embedded world needs an encoder in that place:
`foundation_encoder` trains one on the generic sound families of `retain_asd/corpus/generic.py` (clean,
one source per clip, none of them an evaluation machine type) and writes it in the official BEATs layout
(`{'cfg', 'model'}`), so `load_beats` reads it strictly. It is the `frozen` row, the teacher and every
student's starting point.

Objective (`FoundationConfig.objective`), all on one forward (of the masked input when masking):

* ``tagging``  (default) cross-entropy over the sound family from the mean of the last block, unmasked
               input. Measured (benchmarks/foundation_genrep.py, 200 steps x 16 clips, unseen machines fan /
               pump / gearbox, GenRep kNN official score, block 2 of 4, clean / 0 dB Factory A):
               seed 0: random init 0.768 / 0.705, tagging 0.939 / 0.788, masked_tagging 0.876 / 0.760,
               masked 0.828 / 0.722; seed 1: random 0.846 / 0.806, tagging 0.912 / 0.850, masked_tagging
               0.783 / 0.797. At this budget the family labels teach spectral structure fastest;
* ``masked``   BEATs / Audio-MAE style masked-patch prediction: 75 % of the patch tokens are replaced by a
               learned mask embedding before the encoder, and a linear head on the last block predicts each
               masked token's 16 x 16 fbank patch (normalised per patch, MAE's `norm_pix_loss`); MSE on the
               masked tokens only. BEATs predicts tokenizer labels instead: that needs a tokenizer, which a few
               CPU minutes cannot afford.
* ``masked_tagging``  the sum of both (the family head sees the masked input).
* ``ema``      data2vec / EAT style: the student sees the masked input and regresses, at the masked tokens,
               the average of the instance-normalised block outputs of an EMA teacher (the student's own
               weights averaged over steps, decay `ema_decay` rising to `ema_decay_end`) on the unmasked input.
* ``ema_tagging``  ``ema`` + the family cross-entropy on the student's (masked) last block.
* ``bestrq``   BEST-RQ style, as BEATs' first iteration uses a random-projection tokenizer: each (normalised)
               16 x 16 fbank patch is projected by a fixed random matrix to 16 dimensions and labelled with the
               nearest of 512 fixed random unit code vectors (cosine); the student sees the masked input and
               predicts, at the masked tokens, the label (cross-entropy). Projection and codebook are seeded by
               `seed`, never trained.
* ``bestrq_tagging``  ``bestrq`` + the family cross-entropy on the student's (masked) last block.

`families`: "basic" (the six machine-like families of `corpus/generic.py`) or "rich" (those plus noise textures,
impacts, hum and swells: the non-machine sounds a general-audio encoder also hears).

The mask embedding and both heads are training-only and not saved (the official layout has no such keys).

Cache: `<cache_dir>/foundation-<hash>.pt`, the hash over the settings and the code versions; a JSON
beside it records the settings and the loss curve. Written atomically under a file lock, so concurrent
callers (Tune trials) train once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from retain_asd.config import FoundationConfig
from retain_asd.corpus.generic import FAMILY_SETS, GENERIC_VERSION, generic_batch
from retain_asd.models.beats import BEATs, BEATsConfig, fbank_features, save_beats
from retain_asd.train.schedule import cosine_schedule

log = logging.getLogger(__name__)

FOUNDATION_VERSION = 1  # bump when training changes what a given FoundationConfig produces
SAMPLE_RATE_HZ = 16000


def foundation_beats_config(settings: FoundationConfig) -> BEATsConfig:
    """iter3's architecture and flags (post-LN DeepNorm, gated relative-position bias) at the settings' sizes."""
    return dataclasses.replace(
        BEATsConfig(), embed_dim=settings.patch_embed_dim, encoder_layers=settings.encoder_layers,
        encoder_embed_dim=settings.encoder_embed_dim, encoder_ffn_embed_dim=settings.encoder_ffn_embed_dim,
        encoder_attention_heads=settings.encoder_attention_heads, conv_pos=settings.conv_pos,
        conv_pos_groups=settings.conv_pos_groups,
    )


# Settings added after encoders were cached: left out of the hash at their default, so those stay valid.
_LATER_SETTINGS = {"ema_decay": 0.99, "ema_decay_end": 0.999, "families": "basic"}


def settings_hash(settings: FoundationConfig) -> str:
    """12 hex digits over the settings and the code versions (training loop, generic sound generator)."""
    values = {k: v for k, v in dataclasses.asdict(settings).items()
              if not (k in _LATER_SETTINGS and v == _LATER_SETTINGS[k])}
    identity = {"foundation_version": FOUNDATION_VERSION, "generic_version": GENERIC_VERSION, "settings": values}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def foundation_path(settings: FoundationConfig, cache_dir: str | os.PathLike) -> Path:
    """Where the encoder of these settings is (or will be) cached."""
    return Path(cache_dir) / f"foundation-{settings_hash(settings)}.pt"


def patch_targets(fbank: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """(B, T_frames, 128) fbank -> (B, T*F, p*p) patches, time-major like the tokens, each normalised."""
    b, (t, f), p = fbank.shape[0], grid, patch_size
    patches = fbank[:, : t * p, : f * p].reshape(b, t, p, f, p).permute(0, 1, 3, 2, 4)  # (B, T, F, p, p)
    patches = patches.reshape(b, t * f, p * p)  # index t*F + f, as BEATs.patch_tokens
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()  # MAE norm_pix_loss


def random_token_mask(batch: int, num_tokens: int, ratio: float, generator: torch.Generator) -> Tensor:
    """(B, N) bool, True = masked; exactly round(ratio * N) tokens per clip (at least one kept, one masked)."""
    num_masked = min(max(int(round(ratio * num_tokens)), 1), num_tokens - 1)
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    return order < num_masked  # the ranks of a random permutation: a uniform subset per row


CODEBOOK_SIZE, CODE_DIM = 512, 16  # bestrq's random-projection quantiser (BEST-RQ: 8192 x 16 on far more data)


class _Heads(nn.Module):
    """Training-only parts: the mask embedding, the prediction heads and bestrq's fixed random quantiser (none
    saved)."""

    def __init__(self, dim: int, patch_size: int, num_classes: int):
        super().__init__()
        self.mask_emb = nn.Parameter(torch.zeros(dim).normal_(0.0, 0.02))
        self.patch = nn.Linear(dim, patch_size * patch_size)
        self.family = nn.Linear(dim, num_classes)
        self.regress = nn.Linear(dim, dim)  # ema: the teacher's (normalised) features
        self.code = nn.Linear(dim, CODEBOOK_SIZE)  # bestrq: the label of each masked patch
        self.register_buffer("projection", torch.randn(patch_size * patch_size, CODE_DIM) / patch_size)
        self.register_buffer("codebook", F.normalize(torch.randn(CODEBOOK_SIZE, CODE_DIM), dim=-1))


@torch.no_grad()
def random_projection_labels(patches: Tensor, projection: Tensor, codebook: Tensor) -> Tensor:
    """BEST-RQ's labels: (B, N, p*p) normalised patches -> (B, N) index of the nearest unit code vector (cosine)
    to each patch's random projection."""
    codes = F.normalize(patches @ projection, dim=-1)  # (B, N, d)
    return (codes @ codebook.T).argmax(dim=-1)


@torch.no_grad()
def ema_targets(teacher: BEATs, fbank: Tensor) -> Tensor:
    """data2vec's targets: the teacher's block outputs on the unmasked input, each instance-normalised over the
    tokens (per channel), averaged over the blocks. (B, N, D)"""
    tokens, _ = teacher.patch_tokens(fbank)
    blocks = teacher.encoder(tokens, None, teacher.num_layers, layerdrop=0.0, grad_decay_ratio=1.0)
    normed = [F.instance_norm(h.transpose(1, 2)).transpose(1, 2) for h in blocks]  # (B, N, D) each
    return torch.stack(normed).mean(0)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def foundation_losses(model: BEATs, heads: _Heads, waveforms: Tensor, labels: Tensor, objective: str,
                      mask_ratio: float, generator: torch.Generator,
                      teacher: BEATs | None = None) -> dict[str, Tensor]:
    """One forward; {"masked": MSE on masked patches, "ema": MSE to the EMA teacher's targets on masked tokens,
    "bestrq": CE on the masked patches' random-projection labels, "tagging": family CE} as the objective asks."""
    fbank = fbank_features(waveforms, model.cfg.fbank_mean, model.cfg.fbank_std)  # (B, T_frames, 128)
    tokens, grid = model.patch_tokens(fbank)  # (B, N, D)
    masked = any(name in objective for name in ("masked", "ema", "bestrq"))
    if masked:
        mask = random_token_mask(tokens.shape[0], tokens.shape[1], mask_ratio, generator)  # (B, N)
        tokens = torch.where(mask.unsqueeze(-1), heads.mask_emb.to(tokens.dtype), tokens)
    last = model.encoder(tokens, None, model.num_layers, layerdrop=0.0, grad_decay_ratio=1.0)[-1]  # (B, N, D)
    losses = {}
    if "masked" in objective:
        target = patch_targets(fbank, grid, model.cfg.input_patch_size)  # (B, N, p*p)
        losses["masked"] = F.mse_loss(heads.patch(last)[mask], target[mask])
    if "ema" in objective:
        if teacher is None:
            raise ValueError(f"objective {objective!r} needs the EMA teacher")
        target = ema_targets(teacher, fbank)  # (B, N, D)
        losses["ema"] = F.mse_loss(heads.regress(last)[mask], target[mask])
    if "bestrq" in objective:
        labels_rq = random_projection_labels(patch_targets(fbank, grid, model.cfg.input_patch_size),
                                             heads.projection, heads.codebook)  # (B, N)
        losses["bestrq"] = F.cross_entropy(heads.code(last)[mask], labels_rq[mask])
    if "tagging" in objective:
        losses["tagging"] = F.cross_entropy(heads.family(last.mean(dim=1)), labels)
    return losses


def train_foundation(settings: FoundationConfig, *, progress: bool | None = None) -> tuple[BEATs, dict]:
    """Train the encoder from scratch (no cache). Returns the model (eval mode) and a record of the run.

    Every step draws a fresh batch of generic clips (no clip is seen twice, so no epochs, no overfitting).
    Deterministic for a seed on a given machine: init, clips and masks are all seeded; the global RNG is
    left as it was.
    """
    s = settings
    num_samples = int(round(s.clip_s * SAMPLE_RATE_HZ))
    lr = cosine_schedule(s.lr, s.steps, s.warmup_steps)
    families = FAMILY_SETS[s.families]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = BEATs(foundation_beats_config(s))
        heads = _Heads(s.encoder_embed_dim, model.cfg.input_patch_size, len(families))
    teacher = None
    if "ema" in s.objective:
        teacher = BEATs(foundation_beats_config(s)).eval()
        teacher.load_state_dict(model.state_dict())
        teacher.requires_grad_(False)
    decay = np.linspace(s.ema_decay, s.ema_decay_end, s.steps)  # data2vec: linear from start to end
    generator = torch.Generator().manual_seed(s.seed + 1)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    model.train()
    curve: dict[str, list[float]] = {"loss": []}
    start = time.perf_counter()
    bar = tqdm(range(s.steps), desc="foundation encoder", unit="step", disable=None if progress is None
               else not progress, leave=False)
    for step in bar:
        # schedule
        for group in optimizer.param_groups:
            group["lr"] = float(lr[step])
        # losses
        clips, labels = generic_batch(s.seed, step, s.batch_size, num_samples=num_samples, families=families)
        losses = foundation_losses(model, heads, torch.from_numpy(clips), torch.from_numpy(labels), s.objective,
                                   s.mask_ratio, generator, teacher)
        loss = sum(losses.values())
        # step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if teacher is not None:
            ema_update(teacher, model, float(decay[step]))
        # log
        curve["loss"].append(loss.item())
        for name, value in losses.items():
            curve.setdefault(name, []).append(value.item())
        bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}", refresh=False)
    bar.close()
    record = {"settings": dataclasses.asdict(s), "hash": settings_hash(s), "foundation_version": FOUNDATION_VERSION,
              "generic_version": GENERIC_VERSION, "families": list(families), "train_s": time.perf_counter() - start,
              "curve": curve}
    return model.eval(), record


def _first_last(values: list[float], n: int = 10) -> tuple[float, float]:
    n = max(1, min(n, len(values) // 2 or 1))
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def foundation_encoder(settings: FoundationConfig, cache_dir: str | os.PathLike, *,
                       progress: bool | None = None) -> Path:
    """Path of the stand-in encoder for `settings`: the cached file, or trained once and cached.

    Official BEATs layout, written atomically (`save_beats`) under an exclusive lock on
    `<cache_dir>/.foundation-<hash>.lock`, so concurrent callers wait for one training instead of racing.
    """
    path = foundation_path(settings, cache_dir)
    if path.is_file():
        log.info("foundation encoder: %s (cached)", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.is_file():  # another process trained it while we waited
            log.info("foundation encoder: %s (cached)", path)
            return path
        model, record = train_foundation(settings, progress=progress)
        first, last = _first_last(record["curve"]["loss"])
        record.update(loss_first=first, loss_last=last, beats_cfg=model.cfg.to_dict())
        meta = path.with_suffix(".json")
        tmp = meta.with_name(f".{meta.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, meta)
        save_beats(model, path)  # last: the .pt existing means the cache entry is complete
    log.info("foundation encoder: %s (trained %d steps in %.0f s, loss %.3f -> %.3f)", path, settings.steps,
             record["train_s"], first, last)
    return path


__all__ = ["FOUNDATION_VERSION", "ema_targets", "ema_update", "foundation_beats_config", "foundation_encoder",
           "foundation_losses",
           "foundation_path", "patch_targets", "random_token_mask", "settings_hash", "train_foundation"]
