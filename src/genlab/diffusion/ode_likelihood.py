"""The likelihood of the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D).

In the sigma frame (``genlab.diffusion.frame``: x = x0 + sigma eps) the probability-flow ODE

    dx/dsigma = f(x, sigma) = (x - D(x, sigma)) / sigma          (Karras et al. 2022, Eq. 3)

carries the marginal p_sigma along, and its log-density obeys the instantaneous change of
variables d log p_sigma(x(sigma)) / dsigma = -div f (Chen et al. 2018, Thm. 1; Song et al.
2021, Eq. 39). Integrating from sigma_start up to sigma_max, where the prior stands in for
p_sigma_max,

    log p_start(x) = log N(x(sigma_max); 0, prior_std^2 I) + int_start^max div f dsigma.

With div f = (d - div D) / sigma (d = C*H*W) the integral is d log(sigma_max / sigma_start) -
int div D d(log sigma): the first term is exact and only the second, which tends to d at
small sigma and to 0 at large sigma, is left to quadrature.

**Solver.** Heun's method (second order) on ``steps`` intervals log-spaced from sigma_start
to sigma_max: Euler predictor x~ = x + h f(x, s), corrector x' = x + h/2 (f(x, s) + f(x~, s')),
i.e. ``samplers.heun`` run forwards; the divergence term takes the trapezoid rule in
log sigma on the same two evaluations. 2 * steps denoiser calls, each with backward passes.

**Divergence.** ``exact``: one backward pass per dimension (autograd over each output
coordinate; for small images, d <= 64 under ``auto``). ``hutchinson``: div D ~ z^T (dD/dx) z
with Rademacher probes z (Hutchinson 1989; Grathwohl et al. 2019, FFJORD, Eq. 7), drawn once
from ``generator`` and kept fixed along the trajectory as FFJORD does; one vector-Jacobian
product per probe per evaluation. The ODE's trajectory does not depend on the estimator, so
the Hutchinson log-likelihood is an unbiased estimate of the exact one at the same steps.

**What it measures.** The density at sigma_start = ``frame.sigma_min`` (by default) is the
model's density of x0 + sigma_start eps, not of x0 itself: for data with a density this is a
small blur (EDM 0.002, flow 0.001, VP cosine 0.0064 -- nearly one 8-bit bin, 2/255 = 0.0078).
``ode_bits_per_dim`` turns it into bits/dim on 8-bit data with uniform dequantisation (Theis
et al. 2016; Ho et al. 2019, Sec. 3.1), the convention of ``genlab.metrics.likelihood``:
bits/dim = (-log p(x + u) - d log(2/255)) / (d ln 2), u ~ U(-1/255, 1/255)^d; its expectation
over u is an upper bound on the model's discrete -log2 P(x) / d (Jensen).

The denoiser must treat images independently (eval mode: no batch statistics), as the
per-image divergence is read off one backward pass over the batch sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from genlab.diffusion.frame import NoiseFrame

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DIVERGENCES = ("auto", "exact", "hutchinson")
EXACT_MAX_DIMS = 64  # divergence="auto" is exact up to this many dimensions per image
DEFAULT_STEPS = 128  # Gaussian data: < 0.005 bits/dim of ODE error in every frame (tested)
BIN_WIDTH = 2.0 / 255.0  # 8-bit data on k / 127.5 - 1 (genlab.data.convert)

__all__ = ["DIVERGENCES", "EXACT_MAX_DIMS", "ode_bits_per_dim", "ode_nll", "protocol",
           "resolve_divergence", "sigma_grid"]  # fmt: skip


def sigma_grid(frame: NoiseFrame, steps: int, sigma_start: float | None = None) -> torch.Tensor:
    """(steps + 1,) float64 noise levels, log-spaced and increasing from sigma_start (default
    ``frame.sigma_min``) to ``frame.sigma_max``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lo = frame.sigma_min if sigma_start is None else float(sigma_start)
    if not 0 < lo < frame.sigma_max:
        raise ValueError(f"need 0 < sigma_start < sigma_max = {frame.sigma_max}, got {lo}")
    grid = torch.linspace(math.log(lo), math.log(frame.sigma_max), steps + 1, dtype=torch.float64)
    grid = grid.exp()
    grid[0], grid[-1] = lo, frame.sigma_max  # the ends exactly, not through exp(log)
    return grid


def resolve_divergence(divergence: str, num_dims: int) -> str:
    """``exact`` or ``hutchinson``: ``auto`` is exact for num_dims <= EXACT_MAX_DIMS."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "auto":
        return "exact" if num_dims <= EXACT_MAX_DIMS else "hutchinson"
    return divergence


def prior_std(frame: NoiseFrame) -> float:
    """Std of the frame's Gaussian prior at sigma_max, the one its samplers start from
    (sigma_max; sqrt(1 + sigma_max^2) for ``VPFrame``, whose x_T is unit noise)."""
    return float(frame.prior(torch.ones((), dtype=torch.float64)))


def _denoise_and_div(
    denoise: Denoiser, x: torch.Tensor, sigma: float, probes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """D(x, sigma) (detached, x's shape) and div_x D per image ((B,) float64): exact when
    ``probes`` is None, else the mean of z^T (dD/dx) z over probes (K, *x.shape)."""
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64).to(x.device)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = denoise(xg, s)
        if not out.requires_grad:
            raise RuntimeError(
                "the denoiser's output has no gradient with respect to x: the divergence needs "
                "autograd (the denoiser must not detach x or run under torch.no_grad itself; "
                "ode_nll turns gradients on, but not inside torch.inference_mode)"
            )
        flat = out.flatten(1)
        if probes is None:  # one backward pass per output coordinate
            n = flat.shape[1]
            div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for i in range(n):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=i < n - 1,
                                           allow_unused=True)  # fmt: skip
                if g is not None:
                    div += g.flatten(1)[:, i].double()
        else:  # Hutchinson: z^T J z = z . (z^T J), one vector-Jacobian product per probe
            k = probes.shape[0]
            div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for j in range(k):
                (g,) = torch.autograd.grad((out * probes[j]).sum(), xg, retain_graph=j < k - 1,
                                           allow_unused=True)  # fmt: skip
                if g is not None:
                    div += (g * probes[j]).flatten(1).double().sum(1)
            div /= k
    return out.detach(), div


def ode_nll(
    denoise: Denoiser,
    x: torch.Tensor,
    frame: NoiseFrame,
    *,
    steps: int = DEFAULT_STEPS,
    divergence: str = "auto",
    probes: int = 1,
    generator: torch.Generator | None = None,
    sigma_start: float | None = None,
) -> torch.Tensor:
    """-log p_start(x) in nats per image under the probability-flow ODE (Song et al. 2021,
    Sec. 4.3, Eq. 39-40), p_start the model's marginal at sigma_start.

    Args:
        denoise: ``denoise(x, sigma) -> x0_hat`` in the sigma frame, x (B, C, H, W) (any
            shape (B, ...)), sigma (B,) float64; differentiable in x, images independent.
        x: (B, ...) points in the sigma frame at noise level sigma_start (data in [-1, 1],
            dequantised by the caller if they are 8-bit).
        frame: the family's ``NoiseFrame``: sigma_min, sigma_max and the prior.
        steps: Heun steps, log-spaced in sigma (2 * steps denoiser calls).
        divergence: ``exact``, ``hutchinson`` or ``auto`` (exact for <= 64 dims per image).
        probes: Rademacher probes per Hutchinson estimate (averaged; ignored when exact).
        generator: CPU generator for the probes (drawn once, fixed along the integration).
        sigma_start: lower end of the integration, default ``frame.sigma_min``.
    Returns:
        (B,) float64 negative log-density, nats (the density of x0 + sigma_start eps).
    """
    dims = math.prod(x.shape[1:])
    kind = resolve_divergence(divergence, dims)
    z = None
    if kind == "hutchinson":
        if probes < 1:
            raise ValueError(f"probes must be at least 1, got {probes}")
        z = torch.randint(0, 2, (probes, *x.shape), generator=generator).to(x.device, x.dtype)
        z = 2 * z - 1
    sig = sigma_grid(frame, steps, sigma_start).tolist()
    x = x.detach()
    int_div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    d0, g0 = _denoise_and_div(denoise, x, sig[0], z)
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):  # Heun forwards (Karras Alg. 1)
        h = s_next - s
        f0 = (x - d0) / s
        x_pred = x + h * f0
        d1, g1 = _denoise_and_div(denoise, x_pred, s_next, z)
        x = x + 0.5 * h * (f0 + (x_pred - d1) / s_next)
        int_div += 0.5 * (math.log(s_next) - math.log(s)) * (g0 + g1)  # trapezoid, log sigma
        if s_next < sig[-1]:
            d0, g0 = _denoise_and_div(denoise, x, s_next, z)
    std = prior_std(frame)
    log_norm = dims * (math.log(std) + 0.5 * math.log(2 * math.pi))
    log_prior = -0.5 * (x.flatten(1).double() / std).pow(2).sum(1) - log_norm
    log_p = log_prior + dims * math.log(sig[-1] / sig[0]) - int_div
    return -log_p


def ode_bits_per_dim(
    denoise: Denoiser,
    x: torch.Tensor,
    frame: NoiseFrame,
    *,
    dequantize: bool = True,
    generator: torch.Generator | None = None,
    **kw,
) -> torch.Tensor:
    """Bits/dim of 8-bit images under the probability-flow ODE's density, the convention of
    ``genlab.metrics.likelihood`` (``continuous_to_bits_per_dim``):

        bpd = (-log p(x + u) - d log(2/255)) / (d ln 2),   u ~ U(-1/255, 1/255)^d,

    one u per image from ``generator`` (uniform dequantisation; the expectation over u bounds
    the discrete -log2 P(x) / d from above). ``dequantize=False`` uses u = 0: the density at
    the bin centre times the bin volume, an approximation, not a bound.

    Args:
        denoise, frame: as ``ode_nll``.
        x: (B, C, H, W) images on the 8-bit grid k / 127.5 - 1 in [-1, 1].
        generator: CPU generator for u, then for the Hutchinson probes.
        **kw: ``steps``, ``divergence``, ``probes``, ``sigma_start`` of ``ode_nll``.
    Returns:
        (B,) float64 bits/dim (about 8 for uniform noise, lower is better).
    """
    if dequantize:
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64) * 2 - 1
        x = x + (u / 255).to(x.device, x.dtype)
    dims = math.prod(x.shape[1:])
    nll = ode_nll(denoise, x, frame, generator=generator, **kw)
    return (nll - dims * math.log(BIN_WIDTH)) / (dims * math.log(2.0))


def protocol(
    frame: NoiseFrame,
    *,
    steps: int = DEFAULT_STEPS,
    divergence: str = "auto",
    probes: int = 1,
    sigma_start: float | None = None,
    dequantize: bool = True,
    num_dims: int | None = None,
    **_ignored,
) -> dict:
    """What a caller records next to ``val/bpd`` for ``ode_bits_per_dim`` with these
    keywords (the same ones, so ``protocol(frame, **kw)`` and ``ode_bits_per_dim(..., **kw)``
    agree; ``generator`` and the like are ignored). ``num_dims`` (C*H*W) resolves
    ``divergence="auto"``; without it the rule is recorded."""
    if num_dims is not None:
        kind = resolve_divergence(divergence, num_dims)
    else:
        kind = resolve_divergence(divergence, 0) if divergence != "auto" else (
            f"auto (exact if C*H*W <= {EXACT_MAX_DIMS}, else hutchinson)")  # fmt: skip
    out = {
        "estimator": "probability-flow ODE",
        "solver": "heun",
        "grid": "log-spaced sigma",
        "steps": int(steps),
        "nfe": 2 * int(steps),
        "divergence": kind,
    }
    if kind != "exact":
        out |= {"probes": int(probes), "probe": "rademacher"}
    return out | {
        "dequantization": "uniform" if dequantize else "none",
        "frame": frame.name,
        "sigma_start": frame.sigma_min if sigma_start is None else float(sigma_start),
        "sigma_max": frame.sigma_max,
        "prior_std": prior_std(frame),
    }
