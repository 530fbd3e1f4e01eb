"""Noise schedules for Gaussian diffusion (pure torch, no Lightning, no parameters).

A schedule is the sequence beta_1..beta_T of the forward process
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)  (Ho et al. 2020, Eq. 2).
Everything the samplers and the loss need is derived from ``alphas_cumprod``
(alpha-bar_t = prod_{s<=t} (1 - beta_s)), kept in float64 for accuracy and cast
on use. Index ``t`` runs over 0..T-1 (index 0 is the paper's t=1).
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule", "LinearSchedule", "CosineSchedule"]


class NoiseSchedule:
    """A discrete schedule given by its betas (shape (T,), each in (0, 1))."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps ``t`` (any shape), float64 on ``t``'s device."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps})"


class LinearSchedule(NoiseSchedule):
    """Betas linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4: 1e-4 to 0.02).

    The endpoints are scaled by 1000 / T so that other T keep the same total noise
    (Nichol & Dhariwal 2021, the convention of improved-diffusion).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        scale = 1000.0 / num_timesteps
        betas = torch.linspace(
            beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64
        )
        super().__init__(betas)


class CosineSchedule(NoiseSchedule):
    """alpha-bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at
    ``max_beta`` (Nichol & Dhariwal 2021, Eq. 17)."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=1e-8, max=max_beta)
        super().__init__(betas)
