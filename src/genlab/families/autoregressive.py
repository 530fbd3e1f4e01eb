"""Autoregressive image models as one LightningModule over interchangeable networks: PixelCNN,
Gated PixelCNN, PixelCNN++ and PixelRNN (``genlab.nets.pixelcnn``, ``genlab.nets.pixelrnn``).

p(x) = prod_i p(x_i | x_<i) over pixels in raster order and, within a pixel, R then G then B
(van den Oord et al. 2016, Eq. 1-2). The training loss is the exact negative log-likelihood
in bits/dim -- a 256-way softmax per channel value, or a discretised mixture of logistics
(Salimans et al. 2017, Eq. 2) -- and ``bits_per_dim(x)`` is the same quantity, exact, in the
evaluation protocol's convention. A class-conditional model given no labels reports the exact
marginal log (1/C) sum_y p(x | y).

Sampling draws one pixel (one channel, for softmax nets) at a time. The plain sampler runs
the whole network for every draw, H * W * C passes; ``fast_sampling`` uses a cached sampler
(``genlab.nets.cached``, after Ramachandran et al. 2017) where the network has one: it keeps
every layer's activations and computes only what the new pixel changes, and gives the same
images as the plain sampler for the same seed (exactly, in float64; tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from genlab.data.convert import from_levels
from genlab.discrete import discretized_mix_logistic_nll, sample_mix_logistic
from genlab.families.base import GenerativeModule
from genlab.families.common import class_marginal_nll
from genlab.metrics.likelihood import categorical_bits_per_dim, nats_to_bits_per_dim
from genlab.nets import rng
from genlab.nets.cached import cached_sampler, has_cached_sampler
from genlab.nets.pixelrnn import PixelRNN
from genlab.nets.transformer_ar import ImageGPT


def sample_categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) (B, K) with uniforms u (B,) -> indices (B,)."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(1)
    return (cdf < u.double()[:, None]).sum(1).clamp(max=logits.shape[1] - 1)


class AutoregressiveModule(GenerativeModule):
    """Args:
    net: ``net(x, y) -> logits (B, 256, C, H, W)`` (``net.output == "categorical"``) or
        mixture parameters (B, P, H, W) (``"logistic_mixture"``, with ``net.num_mixtures``).
    image_shape: (C, H, W). num_classes: > 0 class-conditional (labels from the batch).
    optimizer / lr_scheduler: partials; the scheduler is stepped every step.
    fast_sampling: use the cached sampler when the network has one.
    sample_batch_size: images sampled at once.
    """

    def __init__(
        self,
        net: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 0,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        fast_sampling: bool = True,
        sample_batch_size: int = 64,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3)),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        if net.output not in ("categorical", "logistic_mixture"):
            raise ValueError(f"unknown network output {net.output!r}")
        self.net = net
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.fast_sampling = fast_sampling
        self.sample_batch_size = int(sample_batch_size)

    # ------------------------------------------------------------------ likelihood
    def _y(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return y if self.num_classes else None

    def nll_bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact -log2 p(x | y) / D for images x (B, C, H, W) on the 8-bit grid -> (B,)."""
        out = self.net(x, self._y(y))
        if self.net.output == "categorical":
            return categorical_bits_per_dim(out, x)
        nats = discretized_mix_logistic_nll(x, out, self.net.num_mixtures)
        return nats_to_bits_per_dim(nats, x[0].numel())

    @torch.no_grad()
    def bits_per_dim(
        self, x: torch.Tensor, y: torch.Tensor | None = None, generator=None
    ) -> torch.Tensor:
        """Exact bits/dim (B,) of 8-bit images x in [-1, 1]; a conditional model without
        labels gives the marginal over uniformly weighted classes. (Exact: ``generator`` is
        unused.)"""
        with self.evaluating():
            return self._bits_per_dim(x, y).float()

    def _bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.num_classes and y is None:
            dims = x[0].numel()
            nats = class_marginal_nll(
                lambda c: self.nll_bits_per_dim(x, c) * (dims * math.log(2)),
                self.num_classes, x.shape[0], x.device,
            )  # fmt: skip
            return nats_to_bits_per_dim(nats, dims)
        return self.nll_bits_per_dim(x, y)

    def bpd_protocol(self) -> dict:
        marginal = f", marginalised over {self.num_classes} classes" if self.num_classes else ""
        return {"estimator": "exact likelihood" + marginal, "output": self.net.output}

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.nll_bits_per_dim(x, y).mean()
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)  # bits/dim
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.nll_bits_per_dim(x, y).mean(), prog_bar=True, sync_dist=True)

    def trainable_parameters(self):
        return self.net.parameters()

    # ------------------------------------------------------------------ sampling
    def counted_module(self) -> nn.Module:
        return self.net

    def nfe_module(self) -> nn.Module:
        return self.net

    def sampling_protocol(self) -> dict:
        fast = self.fast_sampling and has_cached_sampler(self.net)
        scheme = ("row and diagonal LSTM states kept" if isinstance(self.net, PixelRNN)
                  else "KV cache: keys and values kept" if isinstance(self.net, ImageGPT)
                  else "Ramachandran et al. 2017")  # fmt: skip
        return {
            "name": "ancestral, raster order" + (", per channel" if self._per_channel else ""),
            "sampler": f"cached ({scheme})" if fast else "plain",
        }

    @property
    def _per_channel(self) -> bool:
        return self.net.output == "categorical"

    def _draw(self, out_ij: torch.Tensor, u: torch.Tensor, c: int, generator) -> torch.Tensor:
        """Values in [-1, 1] for channel c (categorical: (B,)) or all channels (mixture:
        (B, C)) at one pixel from the network's output there."""
        if self._per_channel:
            return from_levels(sample_categorical(out_ij[:, :, c], u[:, c]))
        params = out_ij[:, :, None, None]  # (B, P, 1, 1)
        return sample_mix_logistic(params, self.net.num_mixtures, generator)[:, :, 0, 0]

    def _sample_batch(self, y, m: int, generator, fast: bool, progress) -> torch.Tensor:
        c_dim, height, width = self.image_shape
        dtype = next(self.net.parameters()).dtype
        x = torch.zeros(m, *self.image_shape, device=self.device, dtype=dtype)
        # every uniform the categorical draws need, drawn up front: both samplers use the same
        u = rng.rand((m, height, width, c_dim), generator, device=self.device)
        cache = cached_sampler(self.net) if fast else None
        if cache is not None:
            cache.reset(x, y)
        channels = range(c_dim) if self._per_channel else [None]
        for i in range(height):
            for j in range(width):
                for c in channels:
                    out = cache.step(x, i, j) if cache is not None else self._full(x, y, i, j)
                    value = self._draw(out, u[:, i, j], c or 0, generator)
                    if c is None:
                        x[:, :, i, j] = value
                    else:
                        x[:, c, i, j] = value
            if cache is not None:
                cache.end_row(x, i)
            if progress is not None:
                progress.update(1)
        return x

    def _full(self, x, y, i: int, j: int) -> torch.Tensor:
        out = self.net(x, y)
        return out[:, :, :, i, j] if self._per_channel else out[:, :, i, j]

    def draw(self, m, y, generator, *, noise, index, n, progress, fast=None):
        """One chunk, pixel by pixel; ``fast`` picks the cached sampler (default
        ``fast_sampling``) or the plain one. A conditional model given no labels gets uniform
        random ones. ``progress`` shows rows done over the whole request."""
        fast = self.fast_sampling if fast is None else fast
        bar = None
        if progress:
            if index.start == 0:
                rows = self.image_shape[1] * math.ceil(n / self.sample_batch_size)
                self._bar = tqdm(total=rows, desc="sampling rows", leave=False)
            bar = self._bar
        x = self._sample_batch(y, m, generator, fast, bar)
        if bar is not None and index.stop == n:
            bar.close()
        return x
