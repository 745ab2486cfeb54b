"""The student and its objective: what one micro-batch costs (like MAE's model, which owns its loss).

`Student` = the trainable BEATs encoder + a linear tagging head, one module so DDP averages both.
`compute_losses` runs the objective named in the `LoopConfig` (Eq. 1, 4, 5-6, 7 and the Table-2 mixup
baselines, all from `objectives.py`) on one micro-batch; `build_models` makes student and frozen teacher.

Choices where the paper is silent:
  * the tagging head pools the encoder *output* (last block) by the mean over all T*F tokens, like
    BEATs' own fine-tuning head (`BEATs.logits`); the mixture loss reads `align_layer` (1-based).
    When only the mixture loss is used the blocks above `align_layer` are not computed.
  * Eq. 7 weights every objective: alpha the classification term (Eq. 4, or Eq. 1 for the denoising
    baselines), beta the mixture term (`objectives.combined_loss`); an unused weight is a config error.
  * the mixup baselines pair each sample with another clip of the batch (a seeded derangement,
    `objectives.mixup_partners`); snr_mixup draws its SNR from the configured SNR sampler.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retain_asd.mixing import SNRSampler, make_snr_sampler
from retain_asd.models.beats import BEATs, load_beats
from retain_asd.train import objectives as obj
from retain_asd.train.loop_config import LoopConfig, snr_sampler_args
from retain_asd.train.specaug import SpecAugment


class Student(nn.Module):
    """Trainable encoder + linear tagging head as one module, so DDP averages the gradients of both.

    `forward` starts from the fbank, not the waveform: SpecAugment sits between BEATs' fbank front end
    and its patch embedding (`BEATs.extract_layers_from_fbank`).
    """

    def __init__(self, encoder: BEATs, num_classes: int | None, top_layer: int):
        super().__init__()
        self.encoder = encoder
        self.top_layer = top_layer  # blocks above it are not computed
        self.head = nn.Linear(encoder.cfg.encoder_embed_dim, num_classes) if num_classes else None

    def forward(self, fbank: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        hidden, _ = self.encoder.extract_layers_from_fbank(fbank, layers=self.top_layer)  # [(B, N, D)]
        logits = self.head(hidden[-1].mean(dim=1)) if self.head is not None else None  # (B, C + N)
        return hidden, logits


def build_models(cfg: LoopConfig, device: torch.device) -> tuple[Student, BEATs | None]:
    """The student (train mode) and, when the objective needs one, the frozen teacher (eval mode, never
    wrapped in DDP), both from `cfg.init_checkpoint`. Seeded with train.seed: the same init on every rank."""
    terms = obj.objective_terms(cfg.objective.name)
    torch.manual_seed(cfg.train.seed)
    with init_checkpoint_file(cfg) as init_path:
        encoder = load_beats(init_path)
        teacher = load_beats(init_path).freeze().to(device) if terms.needs_teacher else None
    encoder.layerdrop, encoder.grad_decay = cfg.model.layerdrop, cfg.model.grad_decay
    top_layer = encoder.num_layers if terms.needs_head else cfg.align_layer
    student = Student(encoder, cfg.num_classes if terms.needs_head else None, top_layer).to(device).train()
    return student, teacher


def make_optimizer(model: nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the configured lr and weight decay; `fused` (one kernel for all parameters) on a GPU."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             fused=device.type == "cuda")


def compile_models(student: nn.Module, teacher: BEATs | None) -> tuple[nn.Module, BEATs | None]:
    """`train.compile`: `torch.compile` of the student (its forward from the fbank, maybe DDP-wrapped) and of the
    teacher's layer extraction (fbank included). Attributes still reach the wrapped modules (`.module`,
    `.no_sync()`, `.parameters()`), so the loop and `compute_losses` are unchanged."""
    if teacher is not None:
        teacher.extract_layers = torch.compile(teacher.extract_layers)
    return torch.compile(student), teacher


@contextlib.contextmanager
def init_checkpoint_file(cfg: LoopConfig) -> Iterator[str]:
    """The init checkpoint as a local file while the models are built: `cfg.init_checkpoint` itself, or, when it
    is in an object store (`cfg.init_fs`, data.storage), a copy in a temporary folder removed afterwards, so no
    node needs the driver's disk and nothing stays behind."""
    if cfg.init_fs is None:
        yield cfg.init_checkpoint
        return
    if cfg.init_fs.get_file_info(cfg.init_checkpoint).size is None:
        raise FileNotFoundError(f"{cfg.init_checkpoint}: the init checkpoint is not in the object store; "
                                "re-run pretrain (it uploads it)")
    with tempfile.TemporaryDirectory(prefix="retain_asd_init_") as folder:
        local = Path(folder) / Path(cfg.init_checkpoint).name
        with cfg.init_fs.open_input_stream(cfg.init_checkpoint) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield str(local)


def _partners(batch: dict, np_rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    """Mixup partner rows (`obj.mixup_partners`): another clip per row (by `clip_idx`, else another row)."""
    clip_idx = batch.get("clip_idx")
    clip_idx = np.arange(batch["mixture"].shape[0]) if clip_idx is None else clip_idx
    return torch.as_tensor(obj.mixup_partners(clip_idx, np_rng), device=device)


def compute_losses(student: nn.Module, teacher: BEATs | None, specaug: SpecAugment, batch: dict, cfg: LoopConfig,
                   spec_generator: torch.Generator, np_rng: np.random.Generator,
                   snr_sampler: SNRSampler | None = None) -> obj.LossTerms:
    """The objective `cfg.objective` on one micro-batch; `student` may be DDP-wrapped. `snr_sampler`: what
    snr_mixup draws its SNRs from, built once per worker (default: made here from `cfg.mixing`)."""
    o = cfg.objective
    terms = obj.objective_terms(o.name)
    encoder = getattr(student, "module", student).encoder
    mixture, label = batch["mixture"], batch["label"]  # (B, S), (B, C + N)
    batch_size, device = mixture.shape[0], mixture.device
    if terms.mixup == "linear":  # baseline: mixup of two noisy clips, soft labels
        ratio = obj.sample_mixup_ratio(np_rng, batch_size, o.mixup_beta).to(device)
        j = _partners(batch, np_rng, device)
        mixture, label = obj.linear_mixup(mixture, mixture[j], label, label[j], ratio)
    elif terms.mixup == "snr":  # baseline: two noisy clips mixed by Eq. 3, union of the labels
        sampler = snr_sampler or make_snr_sampler(**snr_sampler_args(cfg.mixing))
        snr_db = torch.as_tensor(sampler.sample(np_rng, batch_size), dtype=torch.float32, device=device)
        j = _partners(batch, np_rng, device)
        mixture, label = obj.snr_mixup(mixture, mixture[j], label, label[j], snr_db)

    fbank = specaug(encoder.preprocess(mixture), spec_generator)  # (B, T_frames, 128), student only
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        hidden, logits = student(fbank)
    tagging = denoise = mixture_term = None
    if terms.uses_tagging:  # Eq. 4 over C + N classes
        tagging = obj.tagging_loss(logits.float(), label)
    if terms.uses_denoise:  # Eq. 1 over the machine classes only
        denoise = obj.denoise_loss(logits.float(), label, cfg.num_machine_classes)
    if terms.uses_mixture:  # Eq. 5-6 at align_layer; the teacher hears the components, no grad
        layer = cfg.align_layer
        clean, noise = obj.teacher_components(batch["clean"], batch["noise"], o.teacher_inputs)
        with torch.inference_mode(), autocast:  # no autograd bookkeeping at all for the frozen teacher
            target_layers, _ = teacher.extract_layers(torch.cat([clean, noise]), layers=layer)
        # a normal tensor again (one copy of (2B, N, D)): the MSE's backward saves its target
        teacher_clean, teacher_noise = target_layers[layer - 1].clone().chunk(2)  # (B, N, D) each
        lam = obj.resolve_lam(o.lam_mode, o.lam, batch["snr_db"])  # (B,)
        mixture_term = obj.mixture_loss(hidden[layer - 1], teacher_clean, teacher_noise, lam)
    return obj.combined_loss(tagging, mixture_term, o.alpha, o.beta, denoise=denoise)
