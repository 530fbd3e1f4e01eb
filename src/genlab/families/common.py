"""Small pieces every family uses: finite-loss check, RNG state in checkpoints, LR warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class DivergenceError(FloatingPointError):
    """A loss became NaN or infinite; the run stops and its last checkpoint is kept."""


class SamplingUnavailableError(RuntimeError):
    """The model cannot generate images on its own (e.g. a VQ-VAE without a prior); such
    families set ``can_sample = False`` and callbacks and the evaluator skip sampling."""


def check_finite(name: str, value: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise DivergenceError(
            f"{name} is {value.item() if value.numel() == 1 else 'non-finite'} at step {step}: "
            "training diverged. Lower the learning rate or enable gradient clipping "
            "(trainer.gradient_clip_val), then resume with ckpt_path=<run>/checkpoints/last.ckpt."
        )


def rng_state() -> dict:
    """Global RNG states (CPU and, if in use, CUDA) as plain tensors (weights_only-safe)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def class_marginal_nll(nll: Callable[[torch.Tensor], torch.Tensor], num_classes: int, batch: int,
                       device) -> torch.Tensor:  # fmt: skip
    """-log p(x) = -log (1/C) sum_y p(x | y) (B,) in nats, float64, from ``nll(y)`` -> -log p(x | y)
    (B,) in nats, evaluated for every class y with uniform weight."""
    per_class = torch.stack(
        [
            -nll(torch.full((batch,), c, dtype=torch.long, device=device)).double()
            for c in range(num_classes)
        ]
    )
    return -(torch.logsumexp(per_class, 0) - math.log(num_classes))


class RNGCheckpointMixin:
    """For LightningModules: the global RNG state goes into every checkpoint and is restored
    when training resumes, so a resumed run draws the noise an uninterrupted one would have."""

    _pending_rng: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_rng = checkpoint.get("rng_state")

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None


def optimizers(optimizer_fn, lr_scheduler_fn, params):
    """``configure_optimizers``'s return value: the optimizer, with the scheduler (if any)
    stepped every optimizer step."""
    opt = optimizer_fn(params)
    if lr_scheduler_fn is None:
        return opt
    sched = lr_scheduler_fn(opt)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LinearWarmup:
    """LR multiplier rising linearly from 1/warmup_steps to 1 over ``warmup_steps`` steps.
    A class (not a lambda) so LambdaLR can save it in checkpoints."""

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 0):
    """``torch.optim.lr_scheduler.LambdaLR`` with linear warm-up; stepped every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(warmup_steps))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
