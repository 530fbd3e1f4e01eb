"""DDPM as a LightningModule (Ho et al. 2020), with eps / x0 / v prediction, EMA weights,
class conditioning with condition dropout (Ho & Salimans 2021), pluggable samplers and a
variational-bound bits/dim.

The diffusion math lives in ``genlab.diffusion`` and the network in ``genlab.nets``; this
module only wires them into training, sampling and evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.diffusion import process
from genlab.diffusion.frame import VPFrame
from genlab.diffusion.samplers import ddim
from genlab.diffusion.schedules import LinearSchedule, NoiseSchedule
from genlab.families.contract import Denoiser
from genlab.families.denoising import DenoisingModule
from genlab.nets import rng

__all__ = ["DiffusionModule"]


class DiffusionModule(DenoisingModule):
    """Denoising diffusion probabilistic model.

    Args:
        net: denoiser ``net(x_t, t, y) -> output`` of the image's shape (e.g. ``UNet``).
        image_shape: (C, H, W) of the data.
        schedule: the noise schedule (default: linear, T=1000).
        prediction: what ``net`` predicts: ``eps``, ``x0`` or ``v``.
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: optional partial scheduler, called with the optimizer, stepped per step.
        ema_decay: decay of the EMA copy used for sampling and evaluation (0 disables EMA).
        num_classes: > 0 for class-conditional training (labels from the batch).
        cond_drop_prob: probability of replacing a label by the "no class" token in training.
        sampler: partial sampler ``sampler(denoise, noise, frame, *, steps, generator)`` of
            ``genlab.diffusion.samplers`` (any of them: the model's denoiser is in the shared
            sigma frame through ``VPFrame``).
        loss_weighting: ``none`` (the simple loss in the chosen parameterisation) or
            ``min_snr`` (Hang et al. 2023: the x0-space weight min(SNR, gamma), expressed in
            the chosen parameterisation).
        min_snr_gamma: gamma of ``min_snr`` (5 in the paper).
        variance: reverse-process variance for the bound and DDPM sampling: small or large.
        bpd_timesteps: timesteps used to estimate bits/dim (T for the exact sum).
        sample_batch_size: largest batch the sampler runs at once.
    """

    def __init__(
        self,
        net: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        schedule: NoiseSchedule | None = None,
        prediction: str = "eps",
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        ema_decay: float = 0.999,
        num_classes: int = 0,
        cond_drop_prob: float = 0.1,
        sampler: Callable | None = None,
        variance: str = "small",
        bpd_timesteps: int = 100,
        sample_batch_size: int = 256,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        ode_steps: int = 64,
        ode_divergence: str = "hutchinson",
        ode_probes: int = 1,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(net, image_shape, optimizer, lr_scheduler, ema_decay, num_classes,
                         cond_drop_prob, sampler or ddim, sample_batch_size, ode_steps,
                         ode_divergence, ode_probes, compile=compile,
                         channels_last=channels_last)  # fmt: skip
        if prediction not in process.PREDICTIONS:
            raise ValueError(f"prediction must be one of {process.PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.schedule = schedule or LinearSchedule()
        self.frame = VPFrame(self.schedule)
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.loss_weighting, self.min_snr_gamma = loss_weighting, float(min_snr_gamma)
        self.variance = variance
        self.bpd_timesteps = bpd_timesteps

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, x0, y, generator: torch.Generator | None = None) -> torch.Tensor:
        """Simple loss (Ho et al. 2020, Eq. 14) in the chosen parameterisation, per sample."""
        b = x0.shape[0]
        # on the device when no generator is given: no host draw and copy every step
        t = rng.randint(0, self.schedule.num_timesteps, (b,), generator, device=x0.device)
        noise = rng.randn(x0.shape, generator, device=x0.device)
        x_t = process.q_sample(self.schedule, x0, t, noise)
        target = process.training_target(self.prediction, self.schedule, x0, t, noise)
        out = self.net(x_t, t, y)
        loss = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)
        return loss * self.loss_weight(t).to(loss.dtype)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) per-timestep loss weights. min-SNR-gamma (Hang et al. 2023, Eq. 10): the
        x0-space weight min(SNR, gamma) divided by what the parameterisation's MSE already
        weighs x0 by: SNR for eps, 1 for x0, SNR + 1 for v."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.schedule.log_snr(t).exp()
        clipped = snr.clamp(max=self.min_snr_gamma)
        per = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.prediction]
        return (clipped / per).float()

    def loss(self, x0, y, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.diffusion_loss(x0, y, generator)

    # ------------------------------------------------------------------ the family contract
    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser:
        """``denoise(x, sigma) -> x0_hat`` in the sigma frame (x = x0 + sigma eps), for every
        sampler and for guidance to wrap: the network sees x_t = x / sqrt(1 + sigma^2) at the
        timestep whose sigma that is (fractional between trained ones). With ``use_ema`` the
        network runs with the EMA weights swapped in for each call."""

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            labels = None if y is None else y[: x.shape[0]]
            x_t = self.frame.to_model(x, sigma)
            t = self.frame.timestep(sigma)
            with self.ema_weights(use_ema):
                out = self.net(x_t, t.to(x.dtype), labels)
            a = self.frame.alpha_bar(sigma)
            return process.x0_from_output(self.prediction, x_t, a, out)

        return denoise

    def bpd_protocol(self) -> dict:
        """How ``bits_per_dim`` estimates the bound (recorded with every val/bpd)."""
        k = min(int(self.bpd_timesteps), self.schedule.num_timesteps)
        exact = k >= self.schedule.num_timesteps
        return {
            "estimator": "exact variational bound" if exact else "stratified variational bound",
            "timesteps": k,
            "variance": self.variance,
        }

    @torch.no_grad()
    def bits_per_dim(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        timesteps: int | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Variational bound on -log2 p(x) per dimension for 8-bit images x (B, C, H, W) in
        [-1, 1] (the 256-value grid of ``genlab.data.convert``); returns (B,).

        Bound: L = L_T + sum_{t>=1} L_{t-1} + L_0 (Ho et al. 2020, Eq. 5), with a discretised
        Gaussian decoder for L_0 (Eq. 13) and fixed reverse variances (``variance``). With
        ``timesteps >= T`` every term is computed (exact bound, T network calls). Otherwise
        the decoder term L_0 is exact and the KL terms t = 1..T-1 are estimated without bias by
        stratified sampling: the range is cut into ``timesteps - 1`` equal strata, one t drawn
        uniformly per stratum, its term weighted by the stratum size. Each term uses one
        sample of x_t ~ q(x_t | x_0). Divided by C*H*W*ln 2 to give bits/dim.
        """
        T = self.schedule.num_timesteps
        k = min(int(timesteps or self.bpd_timesteps), T)
        labels = None if y is None else y.to(self.device)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.net(x_t, t, None if labels is None else labels[: x_t.shape[0]])
            return process.predict_x0(self.prediction, self.schedule, x_t, t, out)

        with self.evaluating(), self.ema_weights(use_ema):
            total = self._bound(x, denoise, T, k, generator)
        return total / (math.prod(x.shape[1:]) * math.log(2.0))

    def _bound(self, x, denoise, T: int, k: int, generator) -> torch.Tensor:
        """L_T + weighted KL terms + L_0 per image, in nats (see ``bits_per_dim``)."""
        b = x.shape[0]
        if k >= T:  # every term: rows of ts are timesteps (same for the whole batch)
            ts, weights = torch.arange(T)[:, None].expand(T, b), torch.ones(T)
        else:  # t=0 exactly, then one t per stratum, drawn independently for each image
            edges = torch.linspace(1, T, k, dtype=torch.float64).round().long()  # k-1 strata
            lo, hi = edges[:-1, None], edges[1:, None]
            u = torch.rand(k - 1, b, generator=generator, dtype=torch.float64)
            ts = torch.cat([torch.zeros(1, b, dtype=torch.long), lo + (u * (hi - lo)).long()])
            weights = torch.cat([torch.ones(1), (hi - lo)[:, 0].float()])
        total = process.prior_kl(self.schedule, x)
        for t_row, w in zip(ts, weights.tolist()):
            t = t_row.to(x.device)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_t = process.q_sample(self.schedule, x, t, noise)
            x0_hat = denoise(x_t, t).clamp(-1, 1)
            total = total + w * process.vb_term(self.schedule, x, x_t, t, x0_hat, self.variance)
        return total
