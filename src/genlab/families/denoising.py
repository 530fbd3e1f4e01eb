"""What every denoising family shares (DDPM, EDM, flow matching): a network with an EMA copy,
class labels with condition dropout (Ho & Salimans 2021) so that classifier-free guidance
works, a per-sample training loss, and sampling by any solver of ``genlab.diffusion.samplers``
through the family's denoiser in the shared sigma frame (``genlab.diffusion.frame``).

A family writes ``loss(x0, y, generator) -> (B,)``, ``denoiser(y, use_ema)`` and sets
``self.frame``; likelihoods come from the probability-flow ODE unless the family has a bound
of its own.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from genlab.diffusion import ode_likelihood
from genlab.diffusion.frame import NoiseFrame
from genlab.diffusion.samplers import heun
from genlab.families.base import GenerativeModule
from genlab.families.contract import Denoiser
from genlab.nets import rng
from genlab.nets.ema import EMA
from genlab.nets.text import TextConditionedNet


def sampler_protocol(sampler: Callable) -> dict:
    """A sampler's name and settings: the function's name, its keyword defaults (the spacing,
    eta, ... it runs with when the config leaves them out), then a partial's keywords."""
    if isinstance(sampler, partial):  # Hydra's partials may wrap a partial: the innermost name
        keywords = {k: v for k, v in sampler.keywords.items() if isinstance(v, int | float | str)}
        return {**sampler_protocol(sampler.func), **keywords}
    out = {"name": getattr(sampler, "__name__", type(sampler).__name__)}
    try:
        params = inspect.signature(sampler).parameters.values()
    except (TypeError, ValueError):
        return out
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    return out | {k: v for k, v in defaults.items()
                  if isinstance(v, int | float | str) and not isinstance(v, bool)}  # fmt: skip


def check_sampler(sampler: Callable) -> Callable:
    """The sampler, once its partial's keywords are known to be options of its function: a
    run trained with DDIM's ``eta`` then sampled with ``dpmpp_2m`` gets a one-line error that
    names the key, not a TypeError at the first sample."""
    keywords, func = {}, sampler
    while isinstance(func, partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return sampler
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return sampler
    unknown = sorted(set(keywords) - set(params))
    if unknown:
        name = getattr(func, "__name__", str(func))
        options = ", ".join(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY)
        raise ValueError(
            f"model.sampler: {name} takes no {', '.join(unknown)} (its options: {options}); "
            f"drop it from the config, e.g. ~model.sampler.{unknown[0]}"
        )
    return sampler


class DenoisingModule(GenerativeModule):
    """The shared part of the denoising families.

    Args:
        net: ``net(x, c_noise, y) -> output`` of the image's shape (e.g. ``UNet``).
        image_shape: (C, H, W) of the data.
        optimizer / lr_scheduler: partials called with the parameters / the optimizer.
        ema_decay: decay of the EMA copy used for sampling and evaluation (0 disables EMA).
        num_classes: > 0 for class-conditional training (labels from the batch).
        cond_drop_prob: probability of replacing a label by the "no class" token in training.
        sampler: partial ``sampler(denoise, noise, frame, *, steps, generator)``.
        sample_batch_size: largest batch the sampler runs at once.
        ode_steps / ode_divergence / ode_probes: bits/dim by the probability-flow ODE
            (``genlab.diffusion.ode_likelihood``): Heun steps (2 evaluations each; 64 steps
            err by about 0.01-0.02 bits/dim, 128 by < 0.005), ``exact`` / ``hutchinson`` /
            ``auto`` divergence, Hutchinson probes.
    """

    random_labels = False  # no labels: the unconditional model (the "no class" token)
    frame: NoiseFrame

    def __init__(
        self,
        net: nn.Module,
        image_shape: Sequence[int],
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        ema_decay: float = 0.999,
        num_classes: int = 0,
        cond_drop_prob: float = 0.1,
        sampler: Callable | None = None,
        sample_batch_size: int = 256,
        ode_steps: int = 64,
        ode_divergence: str = "hutchinson",
        ode_probes: int = 1,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.AdamW(params, lr=2e-4)),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        self.ode = {"steps": int(ode_steps), "divergence": ode_divergence,
                    "probes": int(ode_probes)}  # fmt: skip
        self.net = net
        self.image_shape = tuple(int(s) for s in image_shape)
        self.space_shape = self.image_shape  # what the denoiser works on (latents: their shape)
        self.ema = EMA(net, ema_decay) if ema_decay > 0 else None
        self.num_classes = int(num_classes)
        self.cond_drop_prob = cond_drop_prob
        self.sampler = check_sampler(sampler or partial(heun, steps=18))
        self.sample_batch_size = sample_batch_size

    # ------------------------------------------------------------------ training
    def _labels(self, y: torch.Tensor | None, drop: bool) -> torch.Tensor | None:
        if self.num_classes == 0 or y is None:
            return None
        if drop and self.cond_drop_prob > 0:
            mask = torch.rand(y.shape, device=y.device) < self.cond_drop_prob
            y = torch.where(mask, torch.full_like(y, self.num_classes), y)
        return y

    def loss(self, x0, y, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) the family's training loss per sample."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(x, self._labels(y, drop=True)).mean()
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, not in on_train_batch_end: checkpoints include it
            self.ema.update(self.net)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        g = torch.Generator().manual_seed(batch_idx)  # same noise at every evaluation
        loss = self.loss(x, self._labels(y, drop=False), generator=g).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def trainable_parameters(self):
        return self.net.parameters()

    # ------------------------------------------------------------------ the family contract
    def ema_target(self) -> nn.Module:
        return self.net

    def counted_module(self) -> nn.Module:
        return self.net

    def nfe_module(self) -> nn.Module:
        return self.net

    def describe(self, use_ema: bool = True) -> dict:
        return {**super().describe(use_ema), "network": self.network_protocol()}

    def network_protocol(self) -> dict:
        """The denoising network: its class and forward FLOPs per image on the denoiser's
        space (``genlab.nets.flops.count_flops``, unconditional), measured once (before a
        ``compile``: ``genlab.train`` records the protocol before fitting)."""
        if getattr(self, "_network", None) is None:
            from genlab.nets.flops import count_flops

            net = self.net.net if isinstance(self.net, TextConditionedNet) else self.net
            # a batch of 2: GroupNorm refuses a single value per group (1x1 maps of one image)
            x = torch.zeros(2, *self.space_shape, device=self.device)
            with torch.no_grad():
                flops = count_flops(self.net, x, torch.ones(2, device=self.device))
            self._network = {"class": type(net).__name__,
                             "mflops_per_image": round(flops / 1e6, 1)}  # fmt: skip
        return self._network

    def sampling_protocol(self) -> dict:
        out = {**sampler_protocol(self.sampler), **self.frame.describe()}
        if out.get("spacing") == "auto":  # recorded as what it ran with
            out["spacing"] = self.frame.resolve("auto")
            out["spacing_chosen_by"] = "auto"
        return out

    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser:
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The denoiser's space to images in [-1, 1]: the identity in pixel space (latent
        models decode, ``genlab.families.latent``)."""
        return x0

    def ode_bits_per_dim(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """(B,) bits/dim of 8-bit images x (B, C, H, W) in [-1, 1] under the density of the
        probability-flow ODE (Song et al. 2021, Sec. 4.3), uniformly dequantised
        (``genlab.diffusion.ode_likelihood``); randomness (dequantisation, probes) from
        ``generator``."""
        labels = None if y is None else y.to(self.device)
        with self.evaluating(), self.ema_weights(use_ema):
            denoise = self.denoiser(labels, use_ema=False)
            return ode_likelihood.ode_bits_per_dim(
                denoise, x.to(self.device), self.frame, generator=generator, **self.ode
            )

    def ode_protocol(self) -> dict:
        return ode_likelihood.protocol(self.frame, num_dims=math.prod(self.space_shape), **self.ode)

    # a family's own likelihood: the ODE's unless it has a bound of its own (DDPM's)
    bits_per_dim = ode_bits_per_dim
    bpd_protocol = ode_protocol

    def draw(self, m, y, generator, *, noise, index, n, progress, steps=None):
        """One chunk: unit noise from ``generator`` (the sampler scales it to the prior), then
        the sampler on the (guided) denoiser; ``steps`` overrides the sampler's step count."""
        noise = rng.randn((m, *self.space_shape), generator, device=self.device)
        opts = {"generator": generator, "progress": progress}
        if steps is not None:
            opts["steps"] = steps
        denoise = self.denoiser(y, use_ema=False)  # sample() has swapped the EMA weights in
        if self.guidance is not None:
            denoise = self.guidance.wrap_denoiser(self, denoise, y, index=index, n=n)
        return self.sampler(denoise, noise, self.frame, **opts)


def per_sample_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error over every dimension but the first."""
    return (out - target).pow(2).flatten(1).mean(1)


def bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) -> (B, 1, 1, 1) in ``like``'s dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


__all__ = ["DenoisingModule", "bcast", "check_sampler", "per_sample_mse", "sampler_protocol"]
