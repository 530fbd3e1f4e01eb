"""One bits/dim convention for every likelihood family, so numbers compare across families and
with published tables.

**Convention.** Data are 8-bit images x in {0, ..., 255}^D, D = C*H*W, mapped to [-1, 1] by
k -> k/127.5 - 1 (``genlab.data.convert``), i.e. bins of width 2/255. A model reports

    bits/dim = -log2 P(x) / D,

where P is a *probability mass* on the 256 values of each dimension, not a density:

- autoregressive models: the exact discrete likelihood (256-way softmax, or a discretised
  mixture of logistics integrated over each bin; Salimans et al. 2017, Eq. 2);
- VAEs: the importance-weighted bound with K samples (Burda et al. 2016, Eq. 8) on the
  discrete likelihood of the decoder, an upper bound on bits/dim that tightens as K grows;
- diffusion: the variational bound with a discretised Gaussian decoder (Ho et al. 2020,
  Eq. 5 and 13), an upper bound.

A model with a continuous density p on [-1, 1]^D that was trained on uniformly dequantised
data gets a bound on the discrete likelihood from P(x) >= p(x) * (2/255)^D:
``continuous_to_bits_per_dim``. The published MNIST nats (80-87 for VAEs, 79.2 for PixelRNN)
are on *binarised* MNIST (D = 784 binary values), not on 8-bit MNIST; genlab's MNIST bits/dim
are on 8-bit grey values and are not comparable with those tables. CIFAR-10 tables (3.0-3.1
for PixelCNN family models) use this convention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONVENTION = (
    "-log2 P(x) / (C*H*W) for 8-bit images x (256 bins of width 2/255 on [-1, 1]); "
    "bounds report their upper bound"
)
LOG2 = math.log(2.0)


def nats_to_bits_per_dim(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats per image -> bits per dimension."""
    return nll_nats / (num_dims * LOG2)


def bits_per_dim_to_nats(bpd: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension -> negative log-likelihood in nats per image."""
    return bpd * num_dims * LOG2


def categorical_bits_per_dim(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact bits/dim of a 256-way categorical model.

    Args:
        logits: (B, 256, C, H, W) unnormalised log-probabilities of the 256 values.
        x: (B, C, H, W) uint8 (or integer) images, or float images in [-1, 1] on the 8-bit grid.
    Returns:
        (B,) bits/dim.
    """
    if x.is_floating_point():
        x = ((x.clamp(-1, 1) + 1) * 127.5).round()
    target = x.long()
    # float64 accumulation: sums over thousands of dimensions stay exact to float32 precision
    nll = F.cross_entropy(logits.double(), target, reduction="none")  # (B, C, H, W) nats
    bpd = nats_to_bits_per_dim(nll.flatten(1).sum(1), target[0].numel())
    return bpd.to(logits.dtype if logits.is_floating_point() else torch.float32)


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k w_k, with log w_k = log p(x, z_k) - log q(z_k | x) and
    z_k ~ q(z | x) (Burda et al. 2016, Eq. 8). ``log_weights`` (K, B) -> (B,) lower bound on
    log p(x) in nats; K = 1 is the ELBO."""
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights.double(), dim=0).sub(math.log(k)).to(log_weights.dtype)


def continuous_to_bits_per_dim(nll_density_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits/dim bound for a density on [-1, 1]^D trained on dequantised 8-bit data:
    -log P(x) <= -log p(x) - D log(2/255) (the bin volume of the 8-bit grid)."""
    return nats_to_bits_per_dim(nll_density_nats - num_dims * math.log(2.0 / 255.0), num_dims)


# ---------------------------------------------------------------------- decoder likelihoods
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
