"""The per-worker training loop (Ray Train + DDP): a student BEATs learns to *retain* the noise.

One optimiser step = `grad_accum` micro-batches of (mixture, clean, noise, label, snr_db) rows from the Ray Data
stream (`retain_asd/stream/`); the student hears the SpecAugmented mixture, the frozen teacher (eval mode, no DDP)
the two scaled components (the Eq. 5 target). A micro-batch's cost is `student.compute_losses`; this file is the
algorithm: setup, schedule, losses + step, log and validation, checkpoint. `cfg`: `launch.loop_config_from`.
"""

import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext

from retain_asd.mixing import make_snr_sampler
from retain_asd.stream import iter_train_batches
from retain_asd.train import guard as guard_mod
from retain_asd.train import objectives as obj
from retain_asd.train.checkpoint import (
    checkpoint_room,
    load_train_state,
    rng_state,
    save_train_state,
    seed_rngs,
    set_rng_state,
    weights_digest,
)
from retain_asd.train.loop_config import LoopConfig, snr_sampler_args
from retain_asd.train.schedule import cosine_schedule
from retain_asd.train.specaug import SpecAugment
from retain_asd.train.student import build_models, compile_models, compute_losses, make_optimizer
from retain_asd.train.validate import score_student

BATCH_COLUMNS = ("mixture", "clean", "noise", "label", "snr_db", "clip_idx")  # clip_idx: mixup partners


def micro_batches(shard, batch_size: int, seed: int, noise_bank, skip: int = 0) -> Iterator[dict]:
    """Endless per-worker micro-batches (`stream.iter_train_batches`, the audio formed with the stream's
    `noise_bank`); the first `skip` are drawn and dropped.

    The stream is deterministic for its seed, so skipping the batches a resumed run already consumed
    puts it back at its position instead of replaying the first rows (costs data work only).
    """
    seen = 0
    while True:  # the stream holds every epoch the run needs; a re-iteration would repeat it
        for batch in iter_train_batches(shard, batch_size, seed, noise_bank=noise_bank, columns=BATCH_COLUMNS,
                                        device="cpu"):
            seen += 1
            if seen > skip:
                yield batch


def train_fn_per_worker(cfg: LoopConfig) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    # ---- setup: student (DDP) + head, frozen teacher, SpecAugment, AdamW, RNGs
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    o, t = cfg.objective, cfg.train
    if not obj.objective_terms(o.name).trains_student:
        raise ValueError(f"objective {o.name!r} trains nothing; export the initial encoder instead")
    model, teacher = build_models(cfg, device)  # same init on every rank (DDP also broadcasts rank 0's)
    teacher_initial = weights_digest(teacher)
    specaug = SpecAugment(o.freq_mask_bins, o.time_mask_frames, o.num_masks if o.specaugment else 0)
    snr_sampler = make_snr_sampler(**snr_sampler_args(cfg.mixing))  # snr_mixup's SNRs; built once per worker
    optimizer = make_optimizer(model, cfg, device)  # AdamW, fused on a GPU
    rngs = seed_rngs(t.seed, rank)  # dropout, layerdrop, masks, mixup draws and data order differ per rank

    start_step, resumed, skipped = 0, {}, 0
    # a worker-group restart gets Ray's latest checkpoint of this fit; a new fit the newest complete one on disk
    # (or in the bucket: `resume_fs`)
    checkpoint = ray.train.get_checkpoint() or (cfg.resume_from
                                                and Checkpoint(cfg.resume_from, filesystem=cfg.resume_fs))
    if checkpoint:  # resume: weights, optimizer, step and RNGs from the latest checkpoint
        with checkpoint.as_directory() as directory:
            state, rng = load_train_state(directory, rank=rank, student=model.encoder, head=model.head,
                                          optimizer=optimizer)
        start_step, skipped = state["step"], state["data"].get("skipped_steps", 0)
        if rng is not None:
            set_rng_state(rng, rngs.spec, rngs.np)
        resumed = {"resumed_from_step": start_step, "optimizer_sha256_at_resume": state["optimizer_sha256"]}
    unused = model.top_layer < model.encoder.num_layers or cfg.model.layerdrop  # blocks that may get no gradient
    student = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    student, teacher = compile_models(student, teacher) if t.compile else (student, teacher)  # train.compile
    skip = start_step * t.grad_accum if cfg.skip_seen_batches else 0
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.batch_size_per_worker, rngs.stream_seed,
                            cfg.noise_bank, skip)

    # ---- schedule: precomputed per optimiser step (MAE style), indexed lr[step]
    lr = cosine_schedule(t.lr, t.total_steps, t.warmup_steps)
    window, clips, t0 = defaultdict(float), 0, time.perf_counter()
    guard = guard_mod.DivergenceGuard(t.skip_nonfinite_steps, skipped)
    for step in range(start_step, cfg.stop):
        for group in optimizer.param_groups:
            group["lr"] = float(lr[step])
        # ---- losses + step: grad_accum micro-batches, DDP all-reduce only on the last one; no host sync
        step_losses = []
        for micro in range(t.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            last = micro == t.grad_accum - 1
            with nullcontext() if last or world == 1 else student.no_sync():
                losses = compute_losses(student, teacher, specaug, batch, cfg, rngs.spec, rngs.np, snr_sampler)
                (losses.total / t.grad_accum).backward()
            step_losses.append(losses.as_tensors())  # stays on the device
            clips += batch["mixture"].shape[0]
        norm = guard_mod.grad_norm_tensor(student.parameters(), clip=t.grad_clip)  # clips when grad_clip > 0
        # ---- divergence guard (train/guard.py): the step's one host sync; a non-finite step is never applied
        means, norm = guard.fetch(step_losses, norm, log_norm=t.grad_clip > 0)  # a skipped step's NaN -> 0
        window.update({name: window[name] + value for name, value in means.items()})
        decision = guard.check(step + 1, norm)
        if decision == guard_mod.STOP:  # every rank reports it and returns: no retry, no checkpoint
            ray.train.report({"diverged": guard.message})
            return
        if decision == guard_mod.OK:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # ---- log: window means on rank 0's data; clips/s over all workers; val/hmean_low from rank 0
        save = done % t.checkpoint_every == 0 or done == cfg.stop
        validate = t.validate_every > 0 and done % t.validate_every == 0
        if not (save or validate or done % t.log_every == 0):
            continue
        steps_in_window = clips / (t.grad_accum * cfg.batch_size_per_worker)
        metrics = {"step": done, "lr": float(lr[step]),
                   "clips_per_s": clips * world / (time.perf_counter() - t0),
                   **{k: v / steps_in_window for k, v in window.items()}, **resumed,
                   **({"skipped_steps": guard.skipped} if guard.skipped else {}),
                   **(score_student(model.encoder, cfg.validation) if validate and rank == 0 else {})}
        window, clips, t0, resumed = defaultdict(float), 0, time.perf_counter(), {}
        if not save:
            ray.train.report(metrics)
            continue

        # ---- checkpoint: every rank adds its RNG state and weight digests; rank 0 the train state
        with tempfile.TemporaryDirectory() as directory:
            save_train_state(directory, rank=rank, step=done, student=model.encoder, head=model.head,
                             optimizer=optimizer, rng=rng_state(rngs.spec, rngs.np), teacher=teacher,
                             teacher_initial=teacher_initial, node_id=ray.get_runtime_context().get_node_id(),
                             data={"micro_batches_seen": done * t.grad_accum, "seed": t.seed,
                                   "skipped_steps": guard.skipped})
            full = checkpoint_room(cfg.checkpoint_dir, directory, done, device)  # the same answer on every rank
            if full:  # a clean stop (no retry): the previous checkpoint stays the newest complete one
                ray.train.report({"disk_full": full})
                return
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
