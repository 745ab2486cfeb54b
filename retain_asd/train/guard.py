"""Divergence guard of the training loop: a non-finite loss or gradient norm never reaches the optimiser.

Called by `loop.train_fn_per_worker` once per optimiser step, after the backward passes and before
`optimizer.step()`. Every rank takes the same decision (one all-reduce of a flag per step): a NaN on one
rank reaches every rank's gradients through DDP anyway, and a rank that stopped alone would hang the others.
With `skip_nonfinite_steps` = N, up to N bad steps are dropped (gradients zeroed, no update); the next one
stops the run. A stop is reported to Ray Train as ``{"diverged": message}`` and the workers return normally,
so the failure handling (`train.max_failures`) does not replay a run that would diverge again; the driver
turns it into a `DivergenceError` (`train/recovery.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

OK, SKIP, STOP = "ok", "skip", "stop"


class DivergenceError(RuntimeError):
    """The run stopped on a non-finite loss or gradient norm; nothing was exported."""


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The global L2 norm of the gradients (what `clip_grad_norm_` returns), without touching them."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def grad_norm_tensor(parameters: Iterable[torch.nn.Parameter], clip: float = 0.0) -> torch.Tensor:
    """`grad_norm` as a 0-d tensor on the gradients' device (no host sync); with `clip` > 0 the gradients are
    clipped to that norm as well (`clip_grad_norm_`, which returns the norm before clipping)."""
    parameters = list(parameters)
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class DivergenceGuard:
    """Collects the non-finite values of one optimiser step (`observe`) and decides (`check`)."""

    def __init__(self, allowed_skips: int, skipped: int = 0):
        self.allowed_skips, self.skipped = allowed_skips, skipped
        self.bad: list[str] = []
        self.message = ""

    def observe(self, losses: Mapping[str, float], micro: int) -> None:
        """Record the non-finite losses of one micro-batch (call for each, before the optimiser step)."""
        self.bad += [f"{name} = {value} (micro-batch {micro})" for name, value in losses.items()
                     if not math.isfinite(value)]

    def fetch(self, micro_losses: list[Mapping[str, torch.Tensor]], norm: torch.Tensor, log_norm: bool = False
              ) -> tuple[dict[str, float], float]:
        """The step's losses (one dict per micro-batch) and gradient norm as floats, observed, in ONE
        device-to-host copy: the training step's only host sync outside logging and checkpoint steps.

        Returns each loss's mean over the micro-batches (a non-finite value counts 0, so a skipped step does
        not poison the logging window), plus "grad_norm" when `log_norm`, and the norm itself.
        """
        flat = [v.detach().float().reshape(()) for losses in micro_losses for v in losses.values()]
        floats = torch.stack([*flat, norm.detach().float().reshape(()).to(flat[0].device)]).tolist()
        means: dict[str, float] = {}
        i = 0
        for micro, losses in enumerate(micro_losses):
            values = dict(zip(losses, floats[i:i + len(losses)], strict=True))
            self.observe(values, micro)
            for name, value in values.items():
                means[name] = means.get(name, 0.0) + (value / len(micro_losses) if math.isfinite(value) else 0.0)
            i += len(losses)
        if log_norm:
            means["grad_norm"] = floats[-1]
        return means, floats[-1]

    def check(self, step: int, norm: float | None) -> str:
        """OK, SKIP (zero the gradients, no update) or STOP (`message` says the step and the values).

        `step` is the 1-based optimiser step that was about to be applied; `norm` its gradient norm.
        """
        if norm is not None and not math.isfinite(norm):
            self.bad.append(f"grad_norm = {norm}")
        bad, self.bad = self.bad, []
        found = _any_rank(bool(bad))
        if not found:
            return OK
        where = "; ".join(bad) or "on another rank"
        if self.skipped < self.allowed_skips:
            self.skipped += 1
            return SKIP
        self.message = (f"diverged at step {step}: non-finite {where}; the optimiser step was not applied and "
                        f"nothing was exported (skipped {self.skipped} bad step(s) of "
                        f"train.skip_nonfinite_steps = {self.allowed_skips}). Lower train.lr, set "
                        "train.grad_clip, or allow skips with train.skip_nonfinite_steps")
        return STOP


def _any_rank(flag: bool) -> bool:
    """True when `flag` is set on any rank of the process group (the flag itself without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
