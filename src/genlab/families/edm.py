"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models") as a LightningModule: the network is preconditioned so that its input and its
target have unit variance at every noise level, trained on a log-normal distribution of sigma
with the loss weight that makes the effective loss uniform, and sampled by Heun's method on
the rho = 7 spacing (Algorithm 1; Algorithm 2 with ``s_churn``) or any other solver of
``genlab.diffusion.samplers``.

Table 1 (EDM column), with sigma_data the data's standard deviation (0.5 for [-1, 1] images):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4
    ln sigma ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

lambda c_out^2 = 1, so lambda |D - x0|^2 = |F - (x0 - c_skip x) / c_out|^2: the network
regresses that target with unit weight (Eq. 8), which is how the loss is computed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from genlab.diffusion.frame import EDMFrame
from genlab.families.contract import Denoiser
from genlab.families.denoising import DenoisingModule, bcast, per_sample_mse
from genlab.nets import rng


class EDMModule(DenoisingModule):
    """EDM preconditioning and training on any ``net(x, c_noise, y)`` (the genlab UNet).

    Args (beyond ``DenoisingModule``'s):
        sigma_data: standard deviation of the data (0.5: Karras et al.'s value for [-1, 1]).
        p_mean, p_std: the log-normal training distribution of sigma.
        sigma_min, sigma_max: the noise range sampling integrates over (0.002, 80).
    """

    def __init__(
        self,
        net: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        ema_decay: float = 0.999,
        num_classes: int = 0,
        cond_drop_prob: float = 0.1,
        sampler: Callable | None = None,
        sample_batch_size: int = 256,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        ode_steps: int = 64,
        ode_divergence: str = "hutchinson",
        ode_probes: int = 1,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(net, image_shape, optimizer, lr_scheduler, ema_decay, num_classes,
                         cond_drop_prob, sampler, sample_batch_size, ode_steps, ode_divergence,
                         ode_probes, compile=compile, channels_last=channels_last)  # fmt: skip
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.frame = EDMFrame(sigma_min, sigma_max)

    # ------------------------------------------------------------------ Table 1
    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise), each (B,) float64, for noise levels sigma (B,)."""
        sigma = sigma.double()
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = (sigma**2 + sd2).rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        sigma = sigma.double()
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, b: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
        """(B,) training noise levels: ln sigma ~ N(p_mean, p_std^2)."""
        draw = rng.randn((b,), generator, device=device).double()
        return (self.p_mean + self.p_std * draw).exp()

    def loss(self, x0, y, generator: torch.Generator | None = None) -> torch.Tensor:
        """|F(c_in x, c_noise) - (x0 - c_skip x) / c_out|^2 per sample (Eq. 8 with lambda)."""
        sigma = self.sample_sigma(x0.shape[0], generator, x0.device)
        noise = rng.randn(x0.shape, generator, device=x0.device)
        x = x0 + bcast(sigma, x0) * noise
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        out = self.net(bcast(c_in, x) * x, c_noise.to(x.dtype), y)
        target = (x0 - bcast(c_skip, x) * x) / bcast(c_out, x)
        return per_sample_mse(out, target)

    # ------------------------------------------------------------------ the family contract
    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser:
        """``denoise(x, sigma) -> x0_hat`` = c_skip x + c_out F(c_in x, c_noise): the EDM
        frame is the sigma frame itself."""

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            labels = None if y is None else y[: x.shape[0]]
            c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
            with self.ema_weights(use_ema):
                out = self.net(bcast(c_in, x) * x, c_noise.to(x.dtype), labels)
            return bcast(c_skip, x) * x + bcast(c_out, x) * out

        return denoise

    def describe(self, use_ema: bool = True) -> dict:
        info = super().describe(use_ema)
        info["training"] = {
            "sigma_data": self.sigma_data,
            "ln_sigma": f"N({self.p_mean}, {self.p_std}^2)",
            "loss_weight": "(sigma^2 + sigma_data^2) / (sigma sigma_data)^2",
        }
        return info


__all__ = ["EDMModule"]
