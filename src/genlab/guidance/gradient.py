"""Gradient guidance of a diffusion model: the gradient of a per-image objective (a
log-probability of the target, up to scale) with respect to the noisy image steers every step.

eps' = eps - scale sqrt(1 - a_t) grad (Dhariwal & Nichol 2021, Algorithm 2 in its DDIM form),
which in the x0 space every genlab sampler works in is x0' = x0 + scale (1 - a_t)/sqrt(a_t)
grad. It therefore works with DDPM, DDIM and any sampler that calls the denoiser.
"""

from __future__ import annotations

import torch

from genlab.families.contract import Denoiser, Denoising
from genlab.guidance.base import Guidance, GuidanceError


class GradientGuidance(Guidance):
    """Subclasses define ``objective(x_t, t, x0, targets, schedule) -> (B,)`` and
    ``targets_for(n)`` (the target of each of the n images one ``sample`` call draws). With
    ``through_denoiser`` the objective sees x0 = denoise(x_t, t) with its graph, so the
    gradient flows back through the network (CLIP on the predicted clean image); otherwise x0
    is computed without one (a noise-aware classifier reads x_t itself)."""

    name = "gradient"
    through_denoiser = True

    def __init__(self, scale: float):
        self.scale = float(scale)

    def check(self, model) -> None:
        if not isinstance(model, Denoising):
            raise GuidanceError(
                f"guidance={self.name} (gradient) needs a diffusion model; "
                f"{type(model).__name__} has no denoiser"
            )

    def targets_for(self, n: int) -> list:
        """The target of each of the n images one ``sample`` call draws."""
        raise NotImplementedError

    def batch_targets(self, n: int, index: slice, y: torch.Tensor | None) -> list:
        """The targets of the images ``index`` of n (``y``: this batch's labels, if any)."""
        return self.targets_for(n)[index]

    def objective(self, x_t, t, x0, targets: list, schedule) -> torch.Tensor:
        """(B,) the objective whose gradient with respect to ``x_t`` steers the step."""
        raise NotImplementedError

    def wrap_denoiser(
        self, model, denoise: Denoiser, y, *, index: slice | None = None, n: int | None = None
    ) -> Denoiser:
        """The guided denoiser for the images ``index`` of a request for ``n``."""
        if self.scale == 0.0:
            return denoise
        schedule = model.schedule
        state = {"targets": None}

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if state["targets"] is None:  # the batch size is known at the first call
                total = n if n is not None else x_t.shape[0]
                part = index if index is not None else slice(0, x_t.shape[0])
                state["targets"] = self.batch_targets(total, part, y)
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                if self.through_denoiser:
                    x0 = denoise(x, t)
                else:
                    with torch.no_grad():
                        x0 = denoise(x_t, t)
                value = self.objective(x, t, x0, state["targets"], schedule)
                (grad,) = torch.autograd.grad(value.sum(), x)
            ab = schedule.alpha_bar(t).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
            return x0.detach() + self.scale * (1 - ab) / ab.sqrt() * grad

        return guided
