"""The Gaussian forward process, parameterisation conversions and the variational bound.

Pure torch math shared by training (``q_sample``, ``training_target``), samplers
(``predict_x0``, ``posterior``) and likelihood evaluation (``vb_terms``). Images
are in [-1, 1]; timesteps are integer tensors of shape (B,) indexing the schedule.

Notation (Ho et al. 2020): a_t = alpha-bar_t,
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps                               (Eq. 4)
    v   = sqrt(a_t) eps - sqrt(1 - a_t) x_0        (Salimans & Ho 2022, Sec. 4)
"""

from __future__ import annotations

import math

import torch

from genlab.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) -> (B, 1, 1, 1) in ``like``'s dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) (Ho et al. 2020, Eq. 4). Shapes (B, C, H, W)."""
    a = schedule.alpha_bar(t)
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def training_target(
    prediction: str, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """What the network regresses for each parameterisation."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        a = schedule.alpha_bar(t)
        return _bcast(a.sqrt(), x0) * noise - _bcast((1 - a).sqrt(), x0) * x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def predict_x0(
    prediction: str, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Turn a network output in the given parameterisation into x0_hat."""
    return x0_from_output(prediction, x_t, schedule.alpha_bar(t), out)


def x0_from_output(
    prediction: str, x_t: torch.Tensor, alpha_bar: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``predict_x0`` at any alpha-bar (B,) (a continuous time between trained timesteps)."""
    sa, s1a = _bcast(alpha_bar.sqrt(), x_t), _bcast((1 - alpha_bar).sqrt(), x_t)
    if prediction == "eps":
        return (x_t - s1a * out) / sa
    if prediction == "x0":
        return out
    if prediction == "v":
        return sa * x_t - s1a * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_from_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """eps implied by x_t and x0 (inverse of Eq. 4)."""
    a = schedule.alpha_bar(t)
    return (x_t - _bcast(a.sqrt(), x_t) * x0) / _bcast((1 - a).sqrt(), x_t)


def v_from_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    eps = eps_from_x0(schedule, x_t, t, x0)
    return training_target("v", schedule, x0, t, eps)


def posterior(
    alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for s < t (Ho et al. 2020, Eqs. 6-7, written for
    any pair of timesteps so that respaced samplers use it too). alpha-bars have shape (B,);
    returns mean (B, C, H, W) and variance (B,) (float64)."""
    beta = 1 - alpha_bar_t / alpha_bar_s  # effective beta of the jump s -> t
    var = beta * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    c0 = alpha_bar_s.sqrt() * beta / (1 - alpha_bar_t)
    ct = (1 - beta).sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    mean = _bcast(c0, x0) * x0 + _bcast(ct, x_t) * x_t
    return mean, var


# ---------------------------------------------------------------- variational bound


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor):
    """-log P(x) of 8-bit data under a Gaussian integrated over each pixel's bin
    (Ho et al. 2020, Eq. 13). ``x`` holds values k/127.5 - 1 for k in 0..255; bins have
    width 2/255 and the edge bins extend to +-infinity. Elementwise, nats."""
    inv_std = torch.exp(-log_std)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    cdf_upper = _std_normal_cdf(upper)
    cdf_lower = _std_normal_cdf(lower)
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_delta = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    logp = torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta)
    )
    return -logp


def reverse_log_variance(schedule: NoiseSchedule, t: torch.Tensor, kind: str) -> torch.Tensor:
    """log sigma_t^2 of the fixed reverse-process variance (Ho et al. 2020, Sec. 3.2):
    ``small`` = posterior variance beta-tilde_t (beta-tilde_1 at t=0, where it is 0),
    ``large`` = beta_t (beta-tilde_1 at t=0, as in improved-diffusion)."""
    if kind not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {kind!r}")
    betas = schedule.betas.to(t.device)
    ab = schedule.alphas_cumprod.to(t.device)
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype, device=ab.device), ab[:-1]])
    post = betas * (1 - ab_prev) / (1 - ab)
    post = torch.cat([post[1:2], post[1:]])
    table = post if kind == "small" else torch.cat([post[1:2], betas[1:]])
    return torch.log(table[t.long()])


def vb_term(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x0_hat: torch.Tensor,
    variance: str = "small",
) -> torch.Tensor:
    """One term of the bound per sample, in nats, shape (B,): L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ||
    p(x_{t-1}|x_t)) for t > 0 and the decoder NLL L_0 = -log p(x_0|x_1) at t = 0
    (Ho et al. 2020, Eq. 5)."""
    ab_t = schedule.alpha_bar(t)
    ab_s = torch.where(t > 0, schedule.alpha_bar((t - 1).clamp(min=0)), torch.ones_like(ab_t))
    true_mean, true_var = posterior(ab_t, ab_s, x_t, x0)
    model_mean, _ = posterior(ab_t, ab_s, x_t, x0_hat)
    model_logvar = _bcast(reverse_log_variance(schedule, t, variance), x0)
    true_logvar = _bcast(torch.log(true_var.clamp(min=1e-20)), x0)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).sum(1)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).sum(1)
    return torch.where(t == 0, nll, kl)


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, nats, shape (B,)."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device)
    a = _bcast(schedule.alpha_bar(t), x0)
    mean = a.sqrt() * x0
    logvar = torch.log(1 - a).expand_as(x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).sum(1)
