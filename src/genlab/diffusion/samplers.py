"""Samplers and ODE/SDE solvers for every denoising model, with one signature:

    sampler(denoise, noise, frame, *, steps, spacing=..., generator=None, progress=False, **opts)

``denoise(x, sigma) -> x0_hat`` is the family's denoiser in the sigma frame
(``genlab.diffusion.frame``: x = x0 + sigma eps; x (B, C, H, W), sigma (B,) float64);
guidance wraps it. ``noise`` is unit Gaussian noise of the images' shape, scaled to the
prior by ``frame.prior``; ``frame.sigmas(steps, spacing)`` gives the steps + 1 noise levels
(the last one 0), so ``steps`` intervals. A step to sigma = 0 returns the denoiser's output,
as DDIM's last step does. Randomness comes from ``generator`` (a CPU ``torch.Generator``) so
that a seed gives the same images on any device.

Network evaluations (NFE) per call, for ``steps`` = N: euler, ddim, ddpm, dpmpp_2m and
unipc take N; heun and midpoint take 2N - 1 (their last step, to sigma = 0, is Euler).
The protocol counts them with a hook on the network rather than trusting this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from genlab.diffusion.frame import NoiseFrame
from genlab.nets import rng

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["Denoiser", "ddim", "ddpm", "dpmpp_2m", "euler", "heun", "midpoint", "steps_for_nfe",
           "unipc"]  # fmt: skip

TWO_EVALUATIONS_PER_STEP = ("heun", "midpoint")


def steps_for_nfe(sampler: Callable, nfe: int) -> int:
    """The ``steps`` that give a sampler (a function here, or a partial of one) about ``nfe``
    network evaluations: nfe for the one-evaluation solvers, (nfe + 1) // 2 for heun and
    midpoint (2 steps - 1 evaluations)."""
    while hasattr(sampler, "func"):  # functools.partial, possibly nested
        sampler = sampler.func
    name = getattr(sampler, "__name__", "")
    return max(1, (int(nfe) + 1) // 2) if name in TWO_EVALUATIONS_PER_STEP else max(1, int(nfe))


def _randn_like(x: torch.Tensor, generator: rng.Generator) -> torch.Tensor:
    return rng.randn(x.shape, generator, dtype=x.dtype, device=x.device)


class _Run:
    """What every solver does around its update: the noise levels, the prior, the progress
    bar and the denoiser called with per-image sigma (float64) and optional clipping."""

    def __init__(self, denoise, noise, frame: NoiseFrame, steps, spacing, progress, name, clip):
        self.sigmas = frame.sigmas(int(steps), spacing).tolist()
        self.x = frame.prior(noise)
        self._denoise, self.clip = denoise, clip
        self.bar = tqdm(total=len(self.sigmas) - 1, desc=name, disable=not progress, leave=False)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64).to(x.device)
        x0 = self._denoise(x, s)
        return x0.clamp(-1, 1) if self.clip else x0

    def steps(self) -> Iterator[tuple[int, float, float]]:
        with self.bar:
            for i in range(len(self.sigmas) - 1):
                yield i, self.sigmas[i], self.sigmas[i + 1]
                self.bar.update(1)


def _ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a stochastic step sigma -> sigma_next: deterministic to
    sigma_down, then fresh noise of std sigma_up. eta = 1 is the posterior q(x_s | x_t, x0)
    (DDPM's small variance; DDIM's eta in Song et al. 2021, Eq. 16, written in this frame)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def euler(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 50,
    spacing: str = "auto",
    eta: float = 0.0,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022,
    Eq. 3): x_next = D + (sigma_next / sigma) (x - D), first order. With ``eta`` > 0 each step
    lands at sigma_down and adds noise of std sigma_up (ancestral sampling)."""
    run = _Run(denoise, noise, frame, steps, spacing, progress, "euler", clip_x0)
    x = run.x
    for _, s, s_next in run.steps():
        x0 = run.denoise(x, s)
        down, up = _ancestral(s, s_next, eta)
        x = x0 + (down / s) * (x - x0)
        if up > 0:
            x = x + up * _randn_like(x, generator)
    return x


@torch.no_grad()
def ddim(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 50,
    spacing: str = "time",
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) on respaced trained timesteps: x_s = sqrt(a_s) x0_hat
    + sqrt(1 - a_s - s^2) eps_hat + s z. Divided by sqrt(a_s) this is ``euler`` in the sigma
    frame (eta = 0: the Euler step of the probability-flow ODE; eta = 1: DDPM's posterior
    variance), so it is that solver with DDIM's defaults: ``spacing=time`` and x0 clipped."""
    return euler(denoise, noise, frame, steps=steps, spacing=spacing, eta=eta, clip_x0=clip_x0,
                 generator=generator, progress=progress)  # fmt: skip


@torch.no_grad()
def ddpm(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 1000,
    spacing: str = "time",
    variance: str = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from p(x_s | x_t) = N(mu(x_t, x0_hat), var) (Ho et al. 2020,
    Algorithm 2), on a respaced chain when ``steps`` < T. In the sigma frame the posterior
    mean is x0 + (s_s / s_t)^2 (x - x0); ``variance`` is ``small`` (the posterior variance
    s_s^2 (s_t^2 - s_s^2) / s_t^2, beta-tilde in the VP frame) or ``large`` (beta:
    (s_t^2 - s_s^2)(1 + s_s^2) / (1 + s_t^2)). The last step returns the mean."""
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    run = _Run(denoise, noise, frame, steps, spacing, progress, "ddpm", clip_x0)
    x = run.x
    for _, s, s_next in run.steps():
        x0 = run.denoise(x, s)
        x = x0 + (s_next / s) ** 2 * (x - x0)
        if s_next > 0:
            if variance == "small":
                var = s_next**2 * (s**2 - s_next**2) / s**2
            else:
                var = (s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)
            x = x + math.sqrt(var) * _randn_like(x, generator)
    return x


@torch.no_grad()
def heun(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 18,
    spacing: str = "auto",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; the last step to sigma = 0
    is Euler). With ``s_churn`` > 0 it is Algorithm 2: at noise levels in [s_tmin, s_tmax]
    the step first raises sigma to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N,
    sqrt 2 - 1), adding noise of std s_noise sqrt(sigma_hat^2 - sigma^2)."""
    run = _Run(denoise, noise, frame, steps, spacing, progress, "heun", clip_x0)
    x, n = run.x, len(run.sigmas) - 1
    for _, s, s_next in run.steps():
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * math.sqrt(s_hat**2 - s**2) * _randn_like(x, generator)
        d = (x - run.denoise(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x_next - run.denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


@torch.no_grad()
def midpoint(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 18,
    spacing: str = "auto",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The explicit midpoint rule on the probability-flow ODE, second order, with the half
    step at the geometric mean of the two noise levels (the midpoint in log sigma, i.e. in
    log-SNR); the last step to sigma = 0 is Euler."""
    run = _Run(denoise, noise, frame, steps, spacing, progress, "midpoint", clip_x0)
    x = run.x
    for _, s, s_next in run.steps():
        d = (x - run.denoise(x, s)) / s
        if s_next == 0:
            x = x - s * d
            continue
        s_mid = math.sqrt(s * s_next)
        x_mid = x + (s_mid - s) * d
        x = x + (s_next - s) * (x_mid - run.denoise(x_mid, s_mid)) / s_mid
    return x


@torch.no_grad()
def dpmpp_2m(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 10,
    spacing: str = "auto",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the exponential integrator in the data
    prediction with lambda = -log sigma, h = lambda_next - lambda,
    x_next = (sigma_next / sigma) x - (e^-h - 1) D', where D' = (1 + 1/2r) D_i - (1/2r) D_{i-1},
    r = h_{i-1} / h (first step and the step to sigma = 0: D' = D_i, first order)."""
    run = _Run(denoise, noise, frame, steps, spacing, progress, "dpmpp_2m", clip_x0)
    x, prev, h_prev = run.x, None, None
    for _, s, s_next in run.steps():
        x0 = run.denoise(x, s)
        if s_next == 0:
            x = x0
            continue
        h = math.log(s) - math.log(s_next)
        d = x0
        if prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
        x = (s_next / s) * x - math.expm1(-h) * d
        prev, h_prev = x0, h
    return x


def _unipc_b(h: float, order: int) -> tuple[list[float], float]:
    """The b vector of UniPC's linear system and B(h) = e^-h - 1 (the bh2 variant; Zhao et al.
    2023, Algorithm / App. B, data prediction, with hh = -h)."""
    hh = -h
    phi_1 = math.expm1(hh)
    b_h = phi_1
    phi_k, factorial, b = phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / hh - 1 / factorial
    return b, b_h


def _unipc_update(x, s0, s_next, x0_hist, lam_hist, order, x0_new=None):
    """One UniP step from (x at s0, whose x0 is x0_hist[-1]) to s_next, or with ``x0_new``
    (the denoiser at the predicted point) the UniC correction of that step."""
    lam0, lam_next = -math.log(s0), -math.log(s_next)
    h = lam_next - lam0
    m0 = x0_hist[-1]
    rks, d1s = [], []
    for k in range(1, order):  # earlier evaluations, relative to s0
        rk = (lam_hist[-(k + 1)] - lam0) / h
        rks.append(rk)
        d1s.append((x0_hist[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    b, b_h = _unipc_b(h, order)
    base = (s_next / s0) * x - math.expm1(-h) * m0
    if x0_new is None:  # predictor: order - 1 earlier points
        if order == 1:
            return base
        rhos = [0.5] if order == 2 else _solve(rks[:-1], b[:-1])
        return base - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else _solve(rks, b)  # corrector: the new point too
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if order > 1 else 0.0
    return base - b_h * (corr + rhos[-1] * (x0_new - m0))


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rhos with sum_k rho_k r_k^(i-1) = b_i (the Vandermonde system of UniPC)."""
    R = torch.tensor([[r**i for r in rks] for i in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


@torch.no_grad()
def unipc(
    denoise: Denoiser,
    noise: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = 10,
    spacing: str = "auto",
    order: int = 2,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), B(h) = e^-h - 1 (bh2), data prediction: the UniP predictor of
    ``order`` (lower while the history fills) and the UniC corrector, which re-uses the
    denoiser output at the predicted point, so the correction costs no evaluation; no
    correction after the last step. Same NFE as dpmpp_2m (order 2 predictor equals it)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    run = _Run(denoise, noise, frame, steps, spacing, progress, "unipc", clip_x0)
    x, x0_hist, lam_hist = run.x, [], []
    last = None  # (x before the predictor, its sigma, the predictor's order)
    for _, s, s_next in run.steps():
        x0 = run.denoise(x, s)
        if last is not None:  # UniC: correct the point the last predictor reached
            x_prev, s_prev, p = last
            x = _unipc_update(x_prev, s_prev, s, x0_hist, lam_hist, p, x0_new=x0)
        x0_hist.append(x0)
        lam_hist.append(-math.log(s))
        if s_next == 0:
            x = x0
            continue
        p = min(order, len(x0_hist))
        last = (x, s, p)
        x = _unipc_update(x, s, s_next, x0_hist, lam_hist, p)
        x0_hist, lam_hist = x0_hist[-order:], lam_hist[-order:]
    return x
