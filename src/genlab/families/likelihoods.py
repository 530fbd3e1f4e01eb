"""Decoder likelihoods p(x | z) on the 8-bit grid, shared by the VAE and VQ-VAE families.

Each turns a decoder's output (B, P*C, H, W) -- P parameter planes per image channel -- into
-log P(x | z) per image in nats, a mean image in [-1, 1], and pixel samples on the 8-bit grid:

- ``bernoulli`` (P = 1, logits): for binarised images (values -1 and 1 only, i.e. 8-bit 0 and
  255; ``data.binarize``). The classic MNIST likelihoods (80-87 nats) are of this kind.
- ``gaussian`` (P = 2, mean and log-std): a Gaussian integrated over each pixel's bin
  (Ho et al. 2020, Eq. 13).
- ``logistic`` (P = 2, mean and log-scale): a logistic integrated over each pixel's bin
  (Salimans et al. 2017, Eq. 2, one component).

All three are probability masses, so -log P(x|z) >= 0 and bits/dim follow the evaluation
protocol's convention (``genlab.metrics.likelihood``).
"""

from __future__ import annotations

import torch

from genlab.data.convert import quantize
from genlab.discrete import (
    bernoulli_nll,
    discretized_gaussian_nll,
    discretized_logistic_nll,
    is_binary,
)
from genlab.nets import rng

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")
MIN_LOG_SCALE = -7.0  # scales below ~1e-3 put all mass in one bin already (bins are 2/255 wide)


class DecoderLikelihood:
    def __init__(self, name: str, channels: int):
        if name not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {name!r}")
        self.name, self.channels = name, int(channels)
        self.params = 1 if name == "bernoulli" else 2

    @property
    def out_channels(self) -> int:
        """Channels the decoder must output."""
        return self.params * self.channels

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_scale = out.chunk(2, dim=1)
        return loc, log_scale.clamp(min=MIN_LOG_SCALE)

    def check(self, x: torch.Tensor) -> None:
        if self.name == "bernoulli" and not is_binary(x):
            raise ValueError(
                "likelihood=bernoulli models binary images but the data has grey values: set "
                "data.binarize=dynamic (or static), or use model.likelihood=logistic for "
                "8-bit images"
            )

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log P(x | z) per image (B,) in nats; x (B, C, H, W) on the 8-bit grid in [-1, 1]."""
        if self.name == "bernoulli":
            nll = bernoulli_nll(x, out)
        elif self.name == "gaussian":
            nll = discretized_gaussian_nll(x, *self._split(out))
        else:
            nll = discretized_logistic_nll(x, *self._split(out))
        return nll.flatten(1).sum(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image in [-1, 1] (Bernoulli: 2p - 1, grey where unsure)."""
        if self.name == "bernoulli":
            return 2 * torch.sigmoid(out) - 1
        return self._split(out)[0].clamp(-1, 1)

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels drawn from p(x | z), on the 8-bit grid in [-1, 1]."""
        if self.name == "bernoulli":
            u = rng.rand(out.shape, generator, device=out.device)
            return torch.where(u < torch.sigmoid(out), 1.0, -1.0)
        loc, log_scale = self._split(out)
        u = rng.rand(loc.shape, generator, device=out.device).clamp(1e-5, 1 - 1e-5)
        if self.name == "logistic":
            noise = torch.log(u) - torch.log1p(-u)
        else:
            noise = torch.special.ndtri(u)
        x = (loc + log_scale.exp() * noise).clamp(-1, 1)
        return quantize(x)
