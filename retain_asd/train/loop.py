"""The per-worker training loop (Ray Train + DDP): a student BEATs learns to *retain* the noise.

One optimiser step = `grad_accum` micro-batches of (mixture, clean, noise, label, snr_db) rows from the
Ray Data stream (`retain_asd/stream.py`). The student hears the SpecAugmented mixture; the frozen
teacher (the initial checkpoint, eval mode, never wrapped in DDP) hears the two scaled components and
gives the Eq. 5 target. Losses come from `objectives.py` by name (Eq. 1, 4, 6, 7 and the mixup baselines).

Choices where the paper is silent (all in `compute_losses` / `Student`):
  * the tagging head pools the encoder *output* (last block) by the mean over all T*F tokens, like
    BEATs' own fine-tuning head (`BEATs.logits`); the mixture loss reads `align_layer` (1-based).
    When only the mixture loss is used the blocks above `align_layer` are not computed.
  * single-term objectives (tagging, mixture, denoise, mixups) are unweighted; alpha and beta weight
    only Eq. 7 (`tagging_mixture`).
  * the mixup baselines pair each sample with the batch rolled by one; snr_mixup draws its SNR from
    the configured SNR sampler.

`config` is a flat dict of plain values built by `launch.loop_config_from`; the loop never reads a Config.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from retain_asd.mixing import make_snr_sampler
from retain_asd.models.beats import BEATs, load_beats
from retain_asd.stream import iter_train_batches
from retain_asd.train import objectives as obj
from retain_asd.train.checkpoint import load_train_state, rng_state, save_train_state, set_rng_state, state_digest
from retain_asd.train.schedule import cosine_schedule
from retain_asd.train.specaug import SpecAugment

BATCH_COLUMNS = ("mixture", "clean", "noise", "label", "snr_db")


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


def compute_losses(student: nn.Module, teacher: BEATs | None, specaug: SpecAugment, batch: dict, config: dict,
                   spec_generator: torch.Generator, np_rng: np.random.Generator) -> obj.LossTerms:
    """The objective `config["objective"]` on one micro-batch; `student` may be DDP-wrapped."""
    terms = obj.objective_terms(config["objective"])
    encoder = getattr(student, "module", student).encoder
    mixture, label = batch["mixture"], batch["label"]  # (B, S), (B, C + N)
    batch_size, device = mixture.shape[0], mixture.device
    if terms.mixup == "linear":  # baseline: mixup of two noisy clips, soft labels
        ratio = obj.sample_mixup_ratio(np_rng, batch_size, config["mixup_beta"]).to(device)
        mixture, label = obj.linear_mixup(mixture, mixture.roll(1, 0), label, label.roll(1, 0), ratio)
    elif terms.mixup == "snr":  # baseline: two noisy clips mixed by Eq. 3, union of the labels
        snr_db = torch.as_tensor(make_snr_sampler(**config["snr_sampler"]).sample(np_rng, batch_size),
                                 dtype=torch.float32, device=device)
        mixture, label = obj.snr_mixup(mixture, mixture.roll(1, 0), label, label.roll(1, 0), snr_db)

    fbank = specaug(encoder.preprocess(mixture), spec_generator)  # (B, T_frames, 128), student only
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        hidden, logits = student(fbank)
    tagging = mixture_term = None
    if terms.uses_tagging:  # Eq. 4 over C + N classes
        tagging = obj.tagging_loss(logits.float(), label)
    if terms.uses_denoise:  # Eq. 1 over the machine classes only
        tagging = obj.denoise_loss(logits.float(), label, config["num_machine_classes"])
    if terms.uses_mixture:  # Eq. 5-6 at align_layer; the teacher hears the components, no grad
        layer = config["align_layer"]
        clean, noise = obj.teacher_components(batch["clean"], batch["noise"], config["teacher_inputs"])
        with torch.no_grad(), autocast:
            target_layers, _ = teacher.extract_layers(torch.cat([clean, noise]), layers=layer)
        teacher_clean, teacher_noise = target_layers[layer - 1].chunk(2)  # (B, N, D) each
        lam = obj.resolve_lam(config["lam_mode"], config["lam"], batch["snr_db"])  # (B,)
        mixture_term = obj.mixture_loss(hidden[layer - 1], teacher_clean, teacher_noise, lam)
    both = tagging is not None and mixture_term is not None
    return obj.combined_loss(tagging, mixture_term, config["alpha"] if both else 1.0,
                             config["beta"] if both else 1.0)


def micro_batches(shard, batch_size: int, seed: int, skip: int = 0) -> Iterator[dict]:
    """Endless per-worker micro-batches (`stream.iter_train_batches`); the first `skip` are drawn and dropped.

    The stream is deterministic for its seed, so skipping the batches a resumed run already consumed
    puts it back at its position instead of replaying the first rows (costs data work only).
    """
    seen = 0
    while True:  # the stream holds every epoch the run needs; a re-iteration would repeat it
        for batch in iter_train_batches(shard, batch_size, seed, columns=BATCH_COLUMNS, device="cpu"):
            seen += 1
            if seen > skip:
                yield batch


def train_fn_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    # ---- setup: student (DDP) + head, frozen teacher, SpecAugment, AdamW, RNGs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    terms = obj.objective_terms(config["objective"])
    if not terms.trains_student:
        raise ValueError(f"objective {config['objective']!r} trains nothing; export the initial encoder instead")
    torch.manual_seed(config["seed"])  # same head init on every rank (DDP also broadcasts rank 0's)
    encoder = load_beats(config["init_checkpoint"])
    encoder.layerdrop, encoder.grad_decay = config["layerdrop"], config["grad_decay"]
    top_layer = encoder.num_layers if terms.needs_head else config["align_layer"]
    model = Student(encoder, config["num_classes"] if terms.needs_head else None, top_layer).to(device).train()
    teacher = load_beats(config["init_checkpoint"]).freeze().to(device) if terms.needs_teacher else None
    teacher_initial = state_digest(teacher.state_dict()) if teacher is not None else None
    specaug = SpecAugment(config["freq_mask_bins"], config["time_mask_frames"],
                          config["num_masks"] if config["specaugment"] else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    spec_generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    np_rng = np.random.default_rng([config["seed"], rank])
    torch.manual_seed(config["seed"] * 1000 + rank)  # dropout / layerdrop differ per rank

    start_step, resumed = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume: weights, optimizer, step and RNGs from the latest checkpoint
        with checkpoint.as_directory() as directory:
            state, rng = load_train_state(directory, rank=rank, student=model.encoder, head=model.head,
                                          optimizer=optimizer)
        start_step = state["step"]
        if rng is not None:
            set_rng_state(rng, spec_generator, np_rng)
        resumed = {"resumed_from_step": start_step,
                   "optimizer_sha256_at_resume": state_digest(optimizer.state_dict())}
    unused = top_layer < encoder.num_layers or config["layerdrop"]  # blocks that may get no gradient
    student = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    grad_accum = config["grad_accum"]
    skip = start_step * grad_accum if config["skip_seen_batches"] else 0
    batches = micro_batches(ray.train.get_dataset_shard("train"), config["batch_size_per_worker"],
                            config["seed"] * 1000 + rank, skip)

    # ---- schedule: precomputed per optimiser step (MAE style), indexed lr[step]
    lr = cosine_schedule(config["lr"], config["total_steps"], config["warmup_steps"])
    stop = min(config["total_steps"], config.get("stop_at_step") or config["total_steps"])

    window, clips, t0 = defaultdict(float), 0, time.perf_counter()
    for step in range(start_step, stop):
        for group in optimizer.param_groups:
            group["lr"] = float(lr[step])
        # ---- losses + step: grad_accum micro-batches, DDP all-reduce only on the last one
        for micro in range(grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            last = micro == grad_accum - 1
            with nullcontext() if last or world == 1 else student.no_sync():
                losses = compute_losses(student, teacher, specaug, batch, config, spec_generator, np_rng)
                (losses.total / grad_accum).backward()
            for name, value in losses.as_floats().items():
                window[name.replace("tagging", "denoise") if terms.uses_denoise else name] += value / grad_accum
            clips += batch["mixture"].shape[0]
        if config["grad_clip"] > 0:
            window["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(student.parameters(), config["grad_clip"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # ---- log: window means on rank 0's data; clips/s over all workers
        save = done % config["checkpoint_every"] == 0 or done == stop
        if not (save or done % config["log_every"] == 0):
            continue
        steps_in_window = clips / (grad_accum * config["batch_size_per_worker"])
        metrics = {"step": done, "lr": float(lr[step]),
                   "clips_per_s": clips * world / (time.perf_counter() - t0),
                   **{k: v / steps_in_window for k, v in window.items()}, **resumed}
        window, clips, t0, resumed = defaultdict(float), 0, time.perf_counter(), {}
        if not save:
            ray.train.report(metrics)
            continue

        # ---- checkpoint: every rank adds its RNG state and weight digests; rank 0 the train state
        with tempfile.TemporaryDirectory() as directory:
            digests = {"student": state_digest(model.state_dict()), "teacher_initial": teacher_initial,
                       "teacher": state_digest(teacher.state_dict()) if teacher is not None else None,
                       "node_id": ray.get_runtime_context().get_node_id()}  # where this rank ran
            save_train_state(directory, rank=rank, step=done, student=model.encoder, head=model.head,
                             optimizer=optimizer, rng=rng_state(spec_generator, np_rng), digests=digests,
                             data={"micro_batches_seen": done * grad_accum, "seed": config["seed"]})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
