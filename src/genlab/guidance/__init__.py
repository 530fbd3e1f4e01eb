"""Guidance: steering a family's samples, selected with the ``guidance`` config group.

A guidance object is attached to a model (``attach``) after checking that the model can be
guided that way; the family then lets it wrap what it samples with -- for diffusion, the
denoiser ``denoise(x_t, t) -> x0_hat`` that every sampler calls -- so families grow no special
cases. ``guidance=none`` (the default) attaches nothing.

- ``cfg``: classifier-free guidance (Ho & Salimans 2021) for a class-conditional diffusion
  model trained with condition dropout (``model=diffusion_cond``).
- ``classifier``: the gradient of a noise-aware classifier (Dhariwal & Nichol 2021) for any
  diffusion model (``genlab.guidance.classifier``).
- ``clip``: CLIP guidance toward text prompts (``genlab.guidance.clip``): the gradient of CLIP
  similarity for diffusion, latent optimisation for GAN and VAE decoders, reranking for every
  family.

Gradient guidance (``GradientGuidance``) steers the denoiser by the gradient of an objective
log p(c | x_t) with respect to the noisy image: eps' = eps - scale sqrt(1 - a_t) grad
(Dhariwal & Nichol 2021, Algorithm 2 in its DDIM form), which in the x0 space every genlab
sampler works in is x0' = x0 + scale (1 - a_t) / sqrt(a_t) grad. It therefore works with
DDPM, DDIM and the fast solvers alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def wrap(
        self, model, denoise: Denoiser, y: torch.Tensor | None, use_ema: bool, **_
    ) -> Denoiser:
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


def cycle(values: Sequence, weights: Sequence[float] | None, n: int, what: str = "target") -> list:
    """The target of each of n images: ``values`` cycled without weights; with weights, in
    consecutive blocks whose sizes are proportional to them (the rounding remainder goes to the
    heaviest)."""
    if weights is None:
        return [values[i % len(values)] for i in range(n)]
    if len(weights) != len(values) or min(weights) <= 0:
        raise GuidanceError(
            f"guidance.weights must be {len(values)} positive numbers, one per {what}"
        )
    total = float(sum(weights))
    counts = [int(n * w / total) for w in weights]
    for i in sorted(range(len(values)), key=lambda i: -weights[i])[: n - sum(counts)]:
        counts[i] += 1
    return [v for v, c in zip(values, counts) for _ in range(c)]


class GradientGuidance:
    """Guidance of a diffusion model by the gradient of a per-image objective (a log-probability
    of the target, up to scale) with respect to the noisy image x_t.

    Subclasses define ``objective(x_t, t, x0, targets, schedule) -> (B,)`` and ``targets_for(n)``
    (the target of each of the n images one ``sample`` call draws). With ``through_denoiser``
    the objective sees x0 = denoise(x_t, t) with its graph, so the gradient flows back through
    the network (CLIP on the predicted clean image); otherwise x0 is computed without one
    (a noise-aware classifier reads x_t itself).
    """

    name = "gradient"
    through_denoiser = True

    def __init__(self, scale: float):
        self.scale = float(scale)

    def check(self, model) -> None:
        if not hasattr(model, "denoiser") or not hasattr(model, "schedule"):
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

    def wrap(
        self,
        model,
        denoise: Denoiser,
        y: torch.Tensor | None,
        use_ema: bool,
        *,
        index: slice | None = None,
        n: int | None = None,
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
    samples (``wrap_sample``: CLIP reranking and latent optimisation) wraps the model's
    ``sample`` on this instance, so grids, the evaluation and the sample command draw guided
    samples unchanged; guidance that works inside the sampler (``wrap``: CFG and gradient
    guidance) is called by the family on its denoiser."""
    guidance.check(model)
    if hasattr(guidance, "wrap_sample"):  # may hand the plain sample back (gradient methods)
        model.sample = guidance.wrap_sample(type(model).sample.__get__(model), model)
    model.guidance = guidance  # recorded by the sampling protocol


__all__ = [
    "ClassifierFree",
    "GradientGuidance",
    "GuidanceError",
    "attach",
    "build_guidance",
    "cycle",
]
