"""Samplers for discrete-time Gaussian diffusion, all with one signature (k-diffusion style):

    sampler(denoise, x_T, schedule, *, steps, generator=None, **opts) -> x_0

``denoise(x_t, t) -> x0_hat`` maps noisy images (B, C, H, W) and integer timesteps (B,)
to a prediction of the clean image in [-1, 1]; each family adapts its own
parameterisation (eps, x0, v) to this before calling, and guidance wraps it.
``steps`` picks that many timesteps evenly spaced over [0, T-1] (both ends included), so
``steps == T`` is the full chain and fewer steps respace it (Nichol & Dhariwal 2021, Sec. 4).
Randomness comes from ``generator`` (a CPU ``torch.Generator``) so a seed gives the same
images on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from genlab.diffusion.process import _bcast, eps_from_x0, posterior
from genlab.diffusion.schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["ddpm", "ddim", "timestep_grid", "Denoiser"]


def timestep_grid(num_timesteps: int, steps: int) -> list[int]:
    """Decreasing, distinct timesteps from T-1 to 0 (``steps`` of them)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    grid = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return grid.tolist()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _pairs(schedule: NoiseSchedule, steps: int, x: torch.Tensor, progress: bool, name: str):
    """Yield (t, alpha-bar_t, alpha-bar_s) per step, as (B,) tensors; s=-1 has alpha-bar 1."""
    grid = timestep_grid(schedule.num_timesteps, steps)
    ab = schedule.alphas_cumprod.to(x.device)
    n = x.shape[0]
    for i, t in enumerate(tqdm(grid, desc=name, disable=not progress, leave=False)):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        ab_s = ab[s] if s >= 0 else torch.ones((), dtype=ab.dtype, device=ab.device)
        t_batch = torch.full((n,), t, device=x.device, dtype=torch.long)
        yield t_batch, ab[t].expand(n), ab_s.expand(n)


@torch.no_grad()
def ddpm(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    variance: str = "small",
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from p(x_{s} | x_t) = N(mu(x_t, x0_hat), sigma^2) (Ho et al. 2020,
    Algorithm 2), on a respaced chain when ``steps < T``. ``variance`` is ``small``
    (posterior beta-tilde) or ``large`` (beta). The last step returns the mean, no noise."""
    steps = steps or schedule.num_timesteps
    x = x_T
    for t, ab_t, ab_s in _pairs(schedule, steps, x, progress, "ddpm"):
        x0 = denoise(x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, var = posterior(ab_t, ab_s, x, x0)
        if variance == "large":
            var = 1 - ab_t / ab_s
        elif variance != "small":
            raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
        last = bool((ab_s == 1).all())
        x = mean if last else mean + _bcast(var.sqrt(), x) * _randn_like(x, generator)
    return x


@torch.no_grad()
def ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat
    + sigma z, with sigma = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s). ``eta=0`` is the
    deterministic probability-flow-like sampler; ``eta=1`` matches DDPM's posterior variance."""
    steps = steps or schedule.num_timesteps
    x = x_T
    for t, ab_t, ab_s in _pairs(schedule, steps, x, progress, "ddim"):
        x0 = denoise(x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(schedule, x, t, x0)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        dir_coef = (1 - ab_s - sigma**2).clamp(min=0).sqrt()
        x = _bcast(ab_s.sqrt(), x) * x0 + _bcast(dir_coef, x) * eps
        if eta > 0 and not bool((ab_s == 1).all()):
            x = x + _bcast(sigma, x) * _randn_like(x, generator)
    return x
