"""Encoders and decoders for the VAE family (plain torch).

- ``ConvEncoder`` / ``ConvDecoder``: a convolutional Gaussian encoder q(z|x) with a vector
  latent and its mirror decoder, for 16, 28, 32 and 64 pixels (stride-2 convolutions down to
  a 7x7 or 4x4 map, then a linear layer). With ``num_classes`` > 0 they are conditional (a
  conditional VAE, Sohn et al. 2015): the label enters the encoder as one-hot input planes and
  the decoder as a one-hot vector beside z.
- ``VQEncoder`` / ``VQDecoder``: the VQ-VAE networks of van den Oord et al. 2017 (Sec. 4.1):
  ``downsample`` stride-2 4x4 convolutions, a stack of residual 3x3/1x1 blocks, a 1x1 map to
  the code dimension; the decoder mirrors it with transposed convolutions. 28 -> 7x7 codes,
  32 -> 8x8, 64 -> 16x16 with the default two downsamplings.

Decoders output ``out_channels`` planes (the decoder likelihood's parameters per channel, e.g.
mean and log-scale); they are not squashed, the family's likelihood interprets them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.gan import _start_size


def _one_hot_planes(y: torch.Tensor, num_classes: int, size: int) -> torch.Tensor:
    return F.one_hot(y, num_classes).float()[:, :, None, None].expand(-1, -1, size, size)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))) (van den Oord et al. 2017)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _res_stack(channels: int, hidden: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(channels, hidden) for _ in range(n)], nn.ReLU())


class ConvEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] (and labels y (B,)) -> (mean, log-variance), each (B, latent_dim).

    Widths: ``base_channels`` doubling at every stride-2 convolution (capped at 8x)."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        latent_dim: int = 32,
        base_channels: int = 32,
        hidden_dim: int = 256,
        num_classes: int = 0,
    ):
        super().__init__()
        self.num_classes, self.image_size, self.latent_dim = num_classes, image_size, latent_dim
        s0 = _start_size(image_size)
        layers, c_in, c, size = [], channels + num_classes, base_channels, image_size
        while size > s0:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            c_in, c, size = c, min(2 * c, 8 * base_channels), size // 2
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * s0 * s0, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, 2 * latent_dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if self.num_classes:
            if y is None:
                raise ValueError("a conditional encoder needs labels y")
            x = torch.cat([x, _one_hot_planes(y, self.num_classes, x.shape[-1])], 1)
        mean, logvar = self.head(self.convs(x)).chunk(2, dim=1)
        return mean, logvar


class ConvDecoder(nn.Module):
    """z (B, latent_dim) (and labels y (B,)) -> parameters (B, out_channels, H, W)."""

    def __init__(
        self,
        out_channels: int,
        image_size: int,
        latent_dim: int = 32,
        base_channels: int = 32,
        hidden_dim: int = 256,
        num_classes: int = 0,
    ):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        s0 = _start_size(image_size)
        n_up = (image_size // s0).bit_length() - 1
        widths = [min(base_channels * 2**i, 8 * base_channels) for i in range(n_up)][::-1]
        self.s0, self.c0 = s0, widths[0]
        self.fc = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, widths[0] * s0 * s0), nn.SiLU(),
        )  # fmt: skip
        layers = []
        for c_in, c_out in zip(widths, widths[1:] + [base_channels], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(base_channels, out_channels, 3, padding=1))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if y is None:
                raise ValueError("a conditional decoder needs labels y")
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        h = self.fc(z).view(-1, self.c0, self.s0, self.s0)
        return self.convs(h)


class VQEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> continuous codes z_e (B, code_dim, H / 2^d, W / 2^d)."""

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        res_hidden: int = 32,
        num_res_blocks: int = 2,
        downsample: int = 2,
        code_dim: int = 32,
    ):
        super().__init__()
        layers, c_in = [], channels
        for i in range(downsample):
            c_out = hidden if i == downsample - 1 else hidden // 2
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        layers += [
            nn.Conv2d(hidden, hidden, 3, padding=1),
            _res_stack(hidden, res_hidden, num_res_blocks),
            nn.Conv2d(hidden, code_dim, 1),
        ]
        self.net = nn.Sequential(*layers)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VQDecoder(nn.Module):
    """Quantised codes (B, code_dim, h, w) -> parameters (B, out_channels, h 2^d, w 2^d)."""

    def __init__(
        self,
        out_channels: int,
        hidden: int = 64,
        res_hidden: int = 32,
        num_res_blocks: int = 2,
        downsample: int = 2,
        code_dim: int = 32,
    ):
        super().__init__()
        layers = [
            nn.Conv2d(code_dim, hidden, 3, padding=1),
            _res_stack(hidden, res_hidden, num_res_blocks),
        ]
        c_in = hidden
        for i in range(downsample):
            last = i == downsample - 1
            c_out = out_channels if last else hidden // 2
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)
