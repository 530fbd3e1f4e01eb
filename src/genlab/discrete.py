"""Discrete likelihoods of 8-bit images: probability masses on the 256-value grid.

What every likelihood family trains and reports with (VAE and VQ-VAE decoders, autoregressive
nets), in one place and pure torch: families import them from here, not from the metrics.
Elementwise functions return nats; the bits/dim bookkeeping (nats -> bits per dimension, the
bound of a density, the importance-weighted bound) is ``genlab.metrics.likelihood``.

Images hold x = k/127.5 - 1 for k in 0..255 (``genlab.data.convert``): bins of width 2/255;
the edge bins (k = 0 and k = 255) extend to -inf and +inf, so the 256 masses of a value sum to
one (tested).

- ``discretized_gaussian_nll``: a Gaussian integrated over each bin (Ho et al. 2020, Eq. 13);
  defined with the diffusion bound it decodes (``genlab.diffusion.process``, which imports
  nothing outside ``nets/`` and ``diffusion/``) and re-exported here;
- ``discretized_logistic_nll``: a logistic integrated over each bin (Salimans et al. 2017,
  Eq. 2, one component);
- ``discretized_mix_logistic_nll`` / ``sample_mix_logistic``: PixelCNN++'s mixture of
  logistics with linear dependence between the channels of a pixel (Salimans et al. 2017);
- ``categorical_nll``: a 256-way softmax per value (van den Oord et al. 2016);
- ``bernoulli_nll``: binarised images (black/white only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genlab.data.convert import quantize, to_levels
from genlab.diffusion.process import discretized_gaussian_nll
from genlab.nets import rng

# Probability masses on the 8-bit grid (elementwise, nats). ``x`` holds k/127.5 - 1 for k in
# 0..255; the edge bins (k = 0 and k = 255) extend to -inf and +inf, so the 256 masses of a
# pixel sum to one (tested).
HALF_BIN = 1.0 / 255.0


def discretized_logistic_nll(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """-log P(x) under a logistic integrated over each pixel's bin (Salimans et al. 2017,
    Eq. 2, one component; Kingma et al. 2016). Numerically stable in the tails: where the bin
    mass underflows it falls back to the density at the bin centre times the bin width."""
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus_in = inv_s * (centered + HALF_BIN)
    min_in = inv_s * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the k = 0 bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): the k = 255 bin
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)  # log density at the centre
    log_mid = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid + math.log(2 * HALF_BIN),
    )
    logp = torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid)
    )
    return -logp


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log P(x) for binary images x in {-1, 1} (black/white: 8-bit values 0 and 255) under
    independent Bernoullis with ``logits``; as a mass on the 8-bit grid it puts zero on the
    grey values in between, so it is a likelihood of *binarised* data only."""
    return F.binary_cross_entropy_with_logits(logits, (x > 0).to(logits.dtype), reduction="none")


def is_binary(x: torch.Tensor) -> bool:
    """True if every value of x (in [-1, 1]) is -1 or 1."""
    return bool(((x == -1) | (x == 1)).all())


def categorical_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log P(x) in nats per image under a 256-way categorical per value (a softmax over the
    8-bit levels; van den Oord et al. 2016, Sec. 5.3).

    Args:
        logits: (B, 256, C, H, W) unnormalised log-probabilities of the 256 values.
        x: (B, C, H, W) uint8 (or integer) images, or float images in [-1, 1] on the 8-bit grid.
    Returns:
        (B,) nats, float64 (summed over thousands of dimensions without losing precision).
    """
    if x.is_floating_point():
        x = to_levels(x)
    target = x.long()
    nll = F.cross_entropy(logits.double(), target, reduction="none")  # (B, C, H, W) nats
    return nll.flatten(1).sum(1)


# ------------------------------------------------------- discretised mixture of logistics
# Salimans et al. 2017 (PixelCNN++), Sec. 2.1-2.2. ``params`` (B, P, H, W) holds, along dim 1,
# [logits (K), means (C*K), log-scales (C*K), coefficients (C(C-1)/2 * K)] for K components,
# each block channel-major; P = K (C+1)(C+2)/2: 10 K for RGB, 3 K for grey. Within a pixel the
# channels depend linearly on the earlier ones (Eq. 3): mean_G = mu_G + a x_R, mean_B = mu_B +
# b x_R + c x_G, with a, b, c = tanh(coefficients), shared by the channels of one component.
MIN_LOG_SCALE = -7.0


def _mix_channels(num_params: int, num_mixtures: int) -> int:
    per = num_params // num_mixtures
    for c in range(1, 17):
        if (c + 1) * (c + 2) // 2 == per and per * num_mixtures == num_params:
            return c
    raise ValueError(f"{num_params} channels are not a mixture of {num_mixtures} logistics")


def _split_mix_params(params: torch.Tensor, num_mixtures: int):
    """-> logits (B, K, H, W), means and log-scales (B, C, K, H, W), coefficients in (-1, 1)
    (B, C(C-1)/2, K, H, W) ordered (G|R), (B|R), (B|G)."""
    b, _, h, w = params.shape
    k, c = num_mixtures, _mix_channels(params.shape[1], num_mixtures)
    n_coef = c * (c - 1) // 2
    logits, means, log_scales, coeffs = params.split([k, c * k, c * k, n_coef * k], dim=1)
    log_scales = log_scales.reshape(b, c, k, h, w).clamp(min=MIN_LOG_SCALE)
    coeffs = torch.tanh(coeffs.reshape(b, n_coef, k, h, w))
    return logits, means.reshape(b, c, k, h, w), log_scales, coeffs


def _channel_mean(means: torch.Tensor, coeffs: torch.Tensor, x: list, c: int) -> torch.Tensor:
    """mean of channel c given the earlier channels' values x[0..c-1] (Salimans et al. 2017,
    Eq. 3). means (B, C, K, H, W), x[i] broadcastable to (B, K, H, W)."""
    mean, first = means[:, c], c * (c - 1) // 2  # coefficients of channel c start here
    for i in range(c):
        mean = mean + coeffs[:, first + i] * x[i]
    return mean


def _mix_log_masses(x: torch.Tensor, params: torch.Tensor, num_mixtures: int):
    """log pi (B, K, H, W) and the log-mass of each channel under each component
    (B, C, K, H, W), with the channel means shifted by the earlier channels of x."""
    logits, means, log_scales, coeffs = _split_mix_params(params, num_mixtures)
    if means.shape[1] != x.shape[1]:
        raise ValueError(f"parameters for {means.shape[1]} channels, images with {x.shape[1]}")
    values = [x[:, i, None] for i in range(x.shape[1])]  # (B, 1, H, W) each
    means = torch.stack([_channel_mean(means, coeffs, values, c) for c in range(len(values))], 1)
    log_mass = -discretized_logistic_nll(x[:, :, None], means, log_scales)
    return F.log_softmax(logits, dim=1), log_mass


def discretized_mix_logistic_channel_nll(
    x: torch.Tensor, params: torch.Tensor, num_mixtures: int
) -> torch.Tensor:
    """-log P(x_c | x_<c) per channel, where x_<c are the earlier channels of the same pixel:
    (B, C, H, W) nats, which sum over C to the pixel's -log P (Salimans et al. 2017, Eq. 2-3,
    with the mixture marginalised over the later channels). Used to check causality per channel.

    Args:
        x: (B, C, H, W) images in [-1, 1] on the 8-bit grid.
        params: (B, P, H, W) mixture parameters (layout above).
    """
    log_pi, log_mass = _mix_log_masses(x, params, num_mixtures)
    joint = torch.logsumexp(log_pi[:, None] + log_mass.cumsum(dim=1), dim=2)  # log P(x_<=c)
    previous = F.pad(joint[:, :-1], (0, 0, 0, 0, 1, 0))  # log P(x_<c); log P(nothing) = 0
    return previous - joint


def discretized_mix_logistic_nll(
    x: torch.Tensor, params: torch.Tensor, num_mixtures: int
) -> torch.Tensor:
    """-log P(x) in nats per image under a discretised mixture of logistics per pixel
    (Salimans et al. 2017, Eq. 2: log-sum-exp over components of the product over channels of
    the logistic mass of each 8-bit bin; edge bins extend to -inf / +inf, and the density at
    the bin centre stands in where the mass underflows).

    Args:
        x: (B, C, H, W) images in [-1, 1] on the 8-bit grid.
        params: (B, P, H, W) mixture parameters (layout above), e.g. a PixelCNN++ output.
    Returns:
        (B,) nats.
    """
    log_pi, log_mass = _mix_log_masses(x, params, num_mixtures)
    log_p = torch.logsumexp(log_pi + log_mass.sum(dim=1), dim=1)  # (B, H, W)
    return -log_p.double().flatten(1).sum(1).to(log_p.dtype)


def _uniform(shape: tuple, generator, like: torch.Tensor) -> torch.Tensor:
    if isinstance(generator, rng.SampleSeeds):  # per-sample streams (CPU)
        u = rng.rand(shape, generator).clamp(1e-7, 1 - 1e-7)
        return u.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-7, 1 - 1e-7)
    return u.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def sample_mix_logistic(
    params: torch.Tensor, num_mixtures: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample x from the discretised mixture of logistics (Salimans et al. 2017): a component
    per pixel by Gumbel-max, then R, G, B in turn, each a logistic sample around its mean
    (shifted by the earlier channels' *quantised* values, as in the likelihood) rounded to the
    8-bit grid; rounding a logistic sample to the nearest bin, edges open, draws exactly the
    discretised mass. All randomness comes from ``torch.rand(generator=generator)`` (on the
    generator's device, the CPU by default), so a fixed generator gives fixed samples.

    Args:
        params: (B, P, H, W) mixture parameters (layout above).
    Returns:
        (B, C, H, W) in [-1, 1] on the 8-bit grid, float32 (float64 for float64 parameters).
    """
    logits, means, log_scales, coeffs = _split_mix_params(params, num_mixtures)
    b, c, k, h, w = means.shape
    gumbel = -torch.log(-torch.log(_uniform((b, k, h, w), generator, params)))
    pick = (logits + gumbel).argmax(dim=1)[:, None, None]  # (B, 1, 1, H, W)

    def chosen(t: torch.Tensor) -> torch.Tensor:  # (B, n, K, H, W) -> (B, n, H, W)
        return t.gather(2, pick.expand(-1, t.shape[1], 1, h, w)).squeeze(2)

    means, scales, coeffs = chosen(means), chosen(log_scales).exp(), chosen(coeffs)
    u = _uniform((b, c, h, w), generator, params)
    noise = scales * (torch.log(u) - torch.log1p(-u))  # logistic(0, s) by the inverse CDF
    x: list[torch.Tensor] = []  # the channels drawn so far, (B, 1, H, W) each
    for i in range(c):
        mean = _channel_mean(means[:, :, None], coeffs[:, :, None], x, i)  # (B, 1, H, W)
        x.append(quantize(mean + noise[:, i, None]))
    return torch.cat(x, dim=1)


__all__ = [
    "HALF_BIN",
    "bernoulli_nll",
    "categorical_nll",
    "discretized_gaussian_nll",
    "discretized_logistic_nll",
    "discretized_mix_logistic_channel_nll",
    "discretized_mix_logistic_nll",
    "is_binary",
    "sample_mix_logistic",
]
