"""Small pieces families use: the finite-loss check, the class-marginal likelihood, LR warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from genlab.utils import UserError


class DivergenceError(UserError, FloatingPointError):
    """A loss became NaN or infinite; the run stops and its last checkpoint is kept."""


def check_finite(name: str, value: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise DivergenceError(
            f"{name} is {value.item() if value.numel() == 1 else 'non-finite'} at step {step}: "
            "training diverged"  # genlab.train adds the command that resumes it
        )


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
