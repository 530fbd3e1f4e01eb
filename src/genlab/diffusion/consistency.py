"""Consistency-model maths in the shared sigma frame (Song et al. 2023, "Consistency Models";
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (iCT); Geng et al.
2024, "Consistency Models Made Easy" (ECT)): the boundary-respecting parameterisation, the
noise discretisation and its curriculum, the distances, the teacher's ODE step and multistep
consistency sampling. Pure torch, no parameters; the family is ``genlab.families.consistency``.

A consistency function maps any point x = x0 + sigma eps of a probability-flow ODE trajectory
(``genlab.diffusion.frame``) to the trajectory's end at sigma_min, with f(x, sigma_min) = x.
In EDM's parameterisation (Song et al. 2023, Sec. 3 and App. C):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly, and the boundary condition holds
by construction for any network F.

Discretisation (Song et al. 2023, App. C; iCT Sec. 3.4): N noise levels sigma_1 = sigma_min <
... < sigma_N = sigma_max on the rho = 7 grid of Karras et al. 2022 (Eq. 5). Consistency
training grows N with the iteration k (iCT, Sec. 3.4, the exponential curriculum):

    N(k) = min(s0 2^floor(k / K'), s1) + 1,   K' = floor(K / (log2 floor(s1 / s0) + 1)),

s0 = 10, s1 = 1280, K the total iterations; the pair (sigma_i, sigma_{i+1}) is drawn with
iCT's discretised log-normal (Sec. 3.5): p(i) proportional to erf((ln sigma_{i+1} - P_mean) /
(sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2.0.

Pseudo-Huber distance (iCT, Sec. 3.3): d(a, b) = sqrt(|a - b|^2 + c^2) - c, |.| the Euclidean
norm over all d = C H W dimensions, c = 0.00054 sqrt(d).

Multistep sampling (Song et al. 2023, Algorithm 1): x = f(sigma_max z, sigma_max); then for
each later level sigma: x_hat = x + sqrt(sigma^2 - sigma_min^2) z, x = f(x_hat, sigma). One
network evaluation per level: ``steps`` levels, ``steps`` NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genlab.diffusion.frame import NoiseFrame, karras_sigmas
from genlab.nets import rng

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# iCT's intermediate noise level for two-step sampling on CIFAR-10 (sigma_max = 80); ECT's
# sampler uses the same default.
TWO_STEP_SIGMA = 0.821
TEACHER_SOLVERS = ("heun", "euler")


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def boundary_coefficients(
    sigma: torch.Tensor, sigma_min: float, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out), each float64 of sigma's shape (Song et al. 2023, App. C):
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd /
    sqrt(sigma^2 + sd^2). At sigma = sigma_min they are exactly 1 and 0."""
    sigma = sigma.double()
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sd2).sqrt()
    return c_skip, c_out


def discretisation(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(n,) float64 increasing noise levels sigma_1 = sigma_min, ..., sigma_n = sigma_max on
    the Karras rho grid (Karras et al. 2022, Eq. 5; Song et al. 2023, App. C)."""
    if n < 2:
        raise ValueError(f"a consistency discretisation needs at least 2 levels, got {n}")
    return karras_sigmas(sigma_min, sigma_max, n, rho).flip(0)


def curriculum(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))
    (iCT, Sec. 3.4): the number of levels at iteration k of ``total`` (K)."""
    stages = int(math.log2(s1 // s0)) + 1
    per_stage = max(1, total // stages)
    return min(s0 * 2 ** (int(k) // per_stage), s1) + 1


def lognormal_pair_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0):
    """(n - 1,) float64 probabilities of the pairs (sigma_i, sigma_{i+1}) of an increasing
    grid (n,): the log-normal N(p_mean, p_std^2) mass of ln sigma in [ln sigma_i, ln sigma_{i+1}],
    normalised (iCT, Sec. 3.5)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """(B,) sqrt(|a - b|^2 + c^2) - c over all dimensions but the first (iCT, Sec. 3.3);
    c defaults to 0.00054 sqrt(d), d = the number of those dimensions."""
    if c is None:
        c = 0.00054 * math.sqrt(a[0].numel())
    sq = (a - b).pow(2).flatten(1).sum(1)
    return (sq + c * c).sqrt() - c


@torch.no_grad()
def ode_step(
    denoise: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    solver: str = "heun",
) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et
    al. 2022, Eq. 3) from per-image levels ``sigma`` (B,) to ``sigma_next`` (B,) > 0: Euler, or
    Heun's second-order correction (Algorithm 1). The same update as the shared ``euler`` and
    ``heun`` solvers (``genlab.diffusion.samplers``), with a noise level per image: the teacher
    step of consistency distillation (Song et al. 2023, Algorithm 2)."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"solver must be one of {TEACHER_SOLVERS}, got {solver!r}")
    s, s_next = sigma.double(), sigma_next.double()
    d = (x - denoise(x, s)) / _bcast(s, x)
    x_next = x + _bcast(s_next - s, x) * d
    if solver == "euler":
        return x_next
    d_next = (x_next - denoise(x_next, s_next)) / _bcast(s_next, x)
    return x + _bcast((s_next - s) * 0.5, x) * (d + d_next)


def consistency_sigmas(
    frame: NoiseFrame,
    steps: int,
    spacing: str = "karras",
    mid_sigma: float | None = TWO_STEP_SIGMA,
    sigmas: Sequence[float] | None = None,
) -> list[float]:
    """The ``steps`` decreasing noise levels multistep sampling evaluates f at: sigma_max,
    then ``sigmas`` (steps - 1 values) if given; else for two steps ``mid_sigma`` (iCT's 0.821,
    clipped to the frame's range; None: the grid), else the first ``steps`` of the Karras grid
    of steps + 1 levels from sigma_max to sigma_min (``spacing=karras``) or of the uniform
    grid in log sigma (``spacing=log_snr``)."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lo, hi = frame.sigma_min, frame.sigma_max
    if sigmas is not None:
        later = [float(s) for s in sigmas]
        if len(later) != steps - 1:
            raise ValueError(f"sigmas: {steps} steps take {steps - 1} levels after "
                             f"sigma_max, got {len(later)}")  # fmt: skip
        levels = [hi, *later]
        if any(not lo <= b < a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"sigmas must decrease within [{lo}, {hi}), got {later}")
        return levels
    if steps == 2 and mid_sigma is not None:
        return [hi, min(max(float(mid_sigma), lo), hi)]
    if spacing == "karras":
        grid = karras_sigmas(lo, hi, steps + 1)
    elif spacing == "log_snr":
        grid = torch.linspace(math.log(hi), math.log(lo), steps + 1, dtype=torch.float64).exp()
    else:
        raise ValueError(f"spacing must be karras or log_snr, got {spacing!r}")
    return grid[:steps].tolist()


@torch.no_grad()
def consistency_sampler(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 1,
    spacing: str = "karras",
    mid_sigma: float | None = TWO_STEP_SIGMA,
    sigmas: Sequence[float] | None = None,
    clip_x0: bool = True,
    generator: rng.Generator = None,
    progress: bool = False,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) through the shared
    solver signature: ``denoise`` is the consistency function f(x, sigma) (B, C, H, W) x (B,)
    -> (B, C, H, W), ``noise`` unit Gaussian of the images' shape. x = f(prior(noise),
    sigma_max); for each later level sigma (``consistency_sigmas``): x <- f(x + sqrt(sigma^2 -
    sigma_min^2) z, sigma). ``steps`` evaluations of f (NFE = steps); ``clip_x0`` clamps each
    f to [-1, 1] (as Song et al.'s sampler does). Returns the images (B, C, H, W)."""
    levels = consistency_sigmas(frame, steps, spacing, mid_sigma, sigmas)
    x = frame.prior(noise)
    for i, s in enumerate(tqdm(levels, desc="consistency", disable=not progress, leave=False)):
        if i > 0:
            z = rng.randn(x.shape, generator, dtype=x.dtype, device=x.device)
            x = x + math.sqrt(max(s**2 - frame.sigma_min**2, 0.0)) * z
        sigma = torch.full((x.shape[0],), s, dtype=torch.float64, device=x.device)
        x = denoise(x, sigma)
        if clip_x0:
            x = x.clamp(-1, 1)
    return x


__all__ = ["TEACHER_SOLVERS", "TWO_STEP_SIGMA", "boundary_coefficients", "consistency_sampler",
           "consistency_sigmas", "curriculum", "discretisation", "lognormal_pair_probs",
           "ode_step", "pseudo_huber"]  # fmt: skip
