"""Bits/dim bookkeeping: one convention for every model with a likelihood, so numbers compare
across models and with published tables. The likelihoods themselves (probability masses on the
8-bit grid) are ``genlab.discrete``.

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

from genlab.discrete import categorical_nll

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
    """Exact bits/dim of a 256-way categorical model (``genlab.discrete.categorical_nll``).

    Args:
        logits: (B, 256, C, H, W) unnormalised log-probabilities of the 256 values.
        x: (B, C, H, W) uint8 (or integer) images, or float images in [-1, 1] on the 8-bit grid.
    Returns:
        (B,) bits/dim, in the logits' dtype.
    """
    # float64 accumulation: sums over thousands of dimensions stay exact to float32 precision
    bpd = nats_to_bits_per_dim(categorical_nll(logits, x), x[0].numel())
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
