"""Guidance: steering a family's samples, selected with the ``guidance`` config group.

A guidance object is attached to a model (``attach``) after checking that the model can be
guided that way; the family then lets it wrap what it samples with -- for diffusion, the
denoiser ``denoise(x_t, t) -> x0_hat`` that every sampler calls -- so families grow no special
cases. ``guidance=none`` (the default) attaches nothing.

- ``cfg``: classifier-free guidance (Ho & Salimans 2021) for a class-conditional diffusion
  model trained with condition dropout (``model=diffusion_cond``).
- ``clip``: CLIP guidance toward text prompts (``genlab.guidance.clip``); it wraps the
  family's ``sample`` (reranking), so it applies to every family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GuidanceError(ValueError):
    """This model cannot be guided this way (one line: what is wrong and what to do)."""


class ClassifierFree:
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
        if not hasattr(model, "denoiser"):
            raise GuidanceError(
                f"guidance=cfg needs a diffusion model; {type(model).__name__} has no denoiser "
                "(use guidance=none)"
            )
        if not getattr(model, "num_classes", 0) or not getattr(model, "cond_drop_prob", 0):
            raise GuidanceError(
                "guidance=cfg needs a class-conditional diffusion model trained with condition "
                "dropout (model=diffusion_cond, model.cond_drop_prob > 0)"
            )

    def wrap(self, model, denoise: Denoiser, y: torch.Tensor | None, use_ema: bool) -> Denoiser:
        """The guided denoiser for labels y (unlabelled sampling stays unconditional)."""
        if y is None or self.scale == 1.0:
            return denoise
        uncond = model.denoiser(None, use_ema)
        if self.scale == 0.0:
            return uncond
        scale = self.scale

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            free = uncond(x_t, t)
            return free + scale * (denoise(x_t, t) - free)

        return guided

    def protocol(self) -> dict:
        return {"name": self.name, "scale": self.scale}


def build_guidance(conf: DictConfig | dict | None) -> Any | None:
    """The guidance object of a ``guidance`` config (None for ``guidance=none``)."""
    if conf is None:
        return None
    conf = OmegaConf.create(conf) if isinstance(conf, dict) else conf
    if "_target_" not in conf:
        if conf.get("prompts"):
            raise GuidanceError(
                f"prompts given with guidance={conf.get('name', 'none')}: add guidance=clip "
                "to steer samples toward them"
            )
        return None
    plain = OmegaConf.to_container(conf, resolve=True)
    plain.pop("name", None)
    cls = get_class(plain.pop("_target_"))  # called directly: its one-line errors stay as they are
    return cls(**plain)


def attach(model, guidance) -> None:
    """Check that ``model`` can take ``guidance`` and attach it. Guidance that works on whole
    samples (``wrap_sample``: CLIP reranking) wraps the model's ``sample`` on this instance, so
    grids, the evaluation and the sample command draw guided samples unchanged; guidance that
    works inside the sampler (``wrap``: CFG) is called by the family."""
    guidance.check(model)
    if hasattr(guidance, "wrap_sample"):
        model.sample = guidance.wrap_sample(type(model).sample.__get__(model))
    model.guidance = guidance  # recorded by the sampling protocol


__all__ = ["ClassifierFree", "GuidanceError", "attach", "build_guidance"]
