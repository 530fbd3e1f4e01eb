"""Gradient guidance of a denoising model: the gradient of a per-image objective (a
log-probability of the target, up to scale) with respect to the noisy image steers every step.

In the sigma frame (x = x0 + sigma eps) Tweedie's formula D(x) = x + sigma^2 grad log p(x)
makes the guided denoiser D'(x) = D(x) + scale sigma^2 grad_x log p(y | x). In a VP model's
own frame (x_t = x / sqrt(1 + sigma^2), a_t = 1 / (1 + sigma^2)) that is x0' = x0 + scale
(1 - a_t) / sqrt(a_t) grad_{x_t}, i.e. eps' = eps - scale sqrt(1 - a_t) grad_{x_t}
(Dhariwal & Nichol 2021, Algorithm 2 in its DDIM form). It therefore works with every
sampler and every denoising family (DDPM, EDM, flow).
"""

from __future__ import annotations

import torch

from genlab.families.contract import Denoiser, Denoising
from genlab.guidance.base import Guidance, GuidanceError


class GradientGuidance(Guidance):
    """Subclasses define ``objective(x, sigma, x0, targets) -> (B,)`` (x in the sigma frame)
    and ``targets_for(n)`` (the target of each of the n images one ``sample`` call draws).
    With ``through_denoiser`` the objective sees x0 = denoise(x, sigma) with its graph, so the
    gradient flows back through the network (CLIP on the predicted clean image); otherwise x0
    is computed without one (a noise-aware classifier reads the noisy image itself)."""

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

    def objective(self, x, sigma, x0, targets: list) -> torch.Tensor:
        """(B,) the objective whose gradient with respect to ``x`` steers the step; ``x0`` is
        the predicted clean image (B, C, H, W) in [-1, 1], decoded for a latent model."""
        raise NotImplementedError

    def wrap_denoiser(
        self, model, denoise: Denoiser, y, *, index: slice | None = None, n: int | None = None
    ) -> Denoiser:
        """The guided denoiser for the images ``index`` of a request for ``n``."""
        if self.scale == 0.0:
            return denoise
        state = {"targets": None}

        def guided(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if state["targets"] is None:  # the batch size is known at the first call
                total = n if n is not None else x_in.shape[0]
                part = index if index is not None else slice(0, x_in.shape[0])
                state["targets"] = self.batch_targets(total, part, y)
            with torch.enable_grad():
                x = x_in.detach().requires_grad_(True)
                if self.through_denoiser:  # the image: a latent model's decoded latents
                    x0 = denoise(x, sigma)
                    image = model.decode(x0)
                else:
                    with torch.no_grad():
                        x0 = image = denoise(x_in, sigma)
                value = self.objective(x, sigma, image, state["targets"])
                (grad,) = torch.autograd.grad(value.sum(), x)
            var = (sigma**2).to(x_in.dtype).view(-1, *([1] * (x_in.ndim - 1)))
            return x0.detach() + self.scale * var * grad

        return guided
