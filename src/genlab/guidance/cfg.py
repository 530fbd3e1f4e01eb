"""Classifier-free guidance (Ho & Salimans 2021) for a class-conditional diffusion model
trained with condition dropout (``model=diffusion_cond``)."""

from __future__ import annotations

import torch

from genlab.families.contract import Denoiser, Denoising, TextConditional
from genlab.guidance.base import Guidance, GuidanceError


class ClassifierFree(Guidance):
    """x0 = x0(x_t | no class) + scale * (x0(x_t | y) - x0(x_t | no class)).

    scale 0 is the unconditional model, 1 the conditional one, > 1 trades diversity for class
    fidelity. In x0 space this equals the usual rule on eps: x0 is affine in eps with the same
    coefficients for both terms, and the weights (1 - scale, scale) sum to one. Each step runs
    the network twice (the NFE the evaluation reports doubles), except at scale 0 and 1.
    """

    name = "cfg"

    def __init__(self, scale: float = 3.0):
        self.scale = float(scale)

    def check(self, model) -> None:
        if not isinstance(model, Denoising):
            raise GuidanceError(
                f"guidance=cfg needs a diffusion model; {type(model).__name__} has no denoiser "
                "(use guidance=none)"
            )
        conditional = model.num_classes > 0 or isinstance(model, TextConditional)
        if not conditional or not model.cond_drop_prob:
            raise GuidanceError(
                "guidance=cfg needs a class- or text-conditional diffusion model trained with "
                "condition dropout (model=diffusion_cond or model=text_flow, "
                "model.cond_drop_prob > 0)"
            )

    def wrap_denoiser(self, model, denoise: Denoiser, y, *, index=None, n=None) -> Denoiser:
        """The guided denoiser for labels y (unlabelled sampling stays unconditional)."""
        if y is None or self.scale == 1.0:
            return denoise
        uncond = model.denoiser(None, use_ema=False)  # the weights in place
        if self.scale == 0.0:
            return uncond
        scale = self.scale

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            free = uncond(x, sigma)
            return free + scale * (denoise(x, sigma) - free)

        return guided

    def protocol(self) -> dict:
        return {"name": self.name, "scale": self.scale}
