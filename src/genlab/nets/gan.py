"""GAN generators and discriminators (plain torch).

- ``DCGANGenerator`` / ``DCGANDiscriminator`` (Radford et al. 2016): transposed-convolution
  generator and strided-convolution discriminator for 28, 32 and 64 pixel images (28 starts
  from 7x7, the others from 4x4).
- ``ResNetGenerator`` / ``ResNetDiscriminator`` (the SNGAN architectures of Miyato et al. 2018,
  Appendix B; residual blocks of Gulrajani et al. 2017) for 32 and 64 pixels (28 starts
  from 7x7).

Conditioning: the generators use conditional batch norm (a per-class gain and bias, de Vries et
al. 2017), the discriminators a projection term <embed(y), h> (Miyato & Koyama 2018).
``spectral_norm=True`` wraps every discriminator layer in spectral normalisation.
Generators map (z (B, z_dim), y (B,) or None) to images (B, C, H, W) in [-1, 1];
discriminators map (x, y) to logits (B,). Sizes: 16, 28, 32, 64 (4 * 2^k or 7 * 2^k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn


def _start_size(image_size: int) -> int:
    """7 for 28 (7 * 2^k), else 4 (16, 32, 64, ...): the side of the first feature map."""
    for s0 in (7, 4):
        k = image_size // s0
        if image_size % s0 == 0 and k >= 2 and k & (k - 1) == 0:
            return s0
    raise ValueError(
        f"GAN networks need 4 * 2^k or 7 * 2^k pixel images (16, 28, 32, 64), got {image_size}"
    )


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias (1 and 0 at init);
    plain affine BatchNorm when ``num_classes`` is 0."""

    def __init__(self, channels: int, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0)
        if num_classes > 0:
            self.gain = nn.Embedding(num_classes, channels)
            self.bias = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bn(x)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("a class-conditional generator needs labels y")
            out = out * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]
        return out


class _Projection(nn.Module):
    """Final linear layer plus the projection term of a conditional discriminator."""

    def __init__(self, features: int, num_classes: int, sn: bool):
        super().__init__()
        wrap = _sn if sn else (lambda m: m)
        self.linear = wrap(nn.Linear(features, 1))
        self.embed = wrap(nn.Embedding(num_classes, features)) if num_classes > 0 else None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h)[:, 0]
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional discriminator needs labels y")
            out = out + (self.embed(y) * h).sum(1)
        return out


# ------------------------------------------------------------------ DCGAN
class DCGANGenerator(nn.Module):
    def __init__(
        self,
        z_dim: int = 100,
        channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        num_classes: int = 0,
    ):
        super().__init__()
        s0 = _start_size(image_size)
        self.z_dim, self.num_classes = z_dim, num_classes
        n_up = int(math.log2(image_size // s0))
        widths = [base_channels * 2 ** (n_up - 1 - i) for i in range(n_up)]  # e.g. 256,128,64
        self.s0, self.c0 = s0, widths[0] * 2 if n_up > 1 else base_channels * 2
        self.fc = nn.Linear(z_dim, self.c0 * s0 * s0, bias=False)
        self.norm0 = ConditionalBatchNorm2d(self.c0, num_classes)
        self.ups = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = self.c0
        for i, c_out in enumerate(widths):
            last = i == n_up - 1
            self.ups.append(
                nn.ConvTranspose2d(c_in, channels if last else c_out, 4, 2, 1, bias=last)
            )
            if not last:
                self.norms.append(ConditionalBatchNorm2d(c_out, num_classes))
            c_in = c_out

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c0, self.s0, self.s0)
        h = F.relu(self.norm0(h, y))
        for i, up in enumerate(self.ups):
            h = up(h)
            if i < len(self.norms):
                h = F.relu(self.norms[i](h, y))
        return torch.tanh(h)


class DCGANDiscriminator(nn.Module):
    """``norm``: ``batch`` (DCGAN), ``layer`` (per-sample, for the gradient penalty) or ``none``."""

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        num_classes: int = 0,
        norm: str = "batch",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be batch, layer or none, got {norm!r}")
        s0 = _start_size(image_size)
        n_down = int(math.log2(image_size // s0))
        wrap = _sn if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(n_down):
            c_out = base_channels * 2**i
            layers.append(wrap(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none" or i == 0)))
            if i > 0 and norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            elif i > 0 and norm == "layer":
                layers.append(nn.GroupNorm(1, c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = _Projection(c_in * s0 * s0, num_classes, spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x), y)


# ------------------------------------------------------------------ ResNet (SNGAN)
class _GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int):
        super().__init__()
        self.n1 = ConditionalBatchNorm2d(c_in, num_classes)
        self.c1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.n2 = ConditionalBatchNorm2d(c_out, num_classes)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.n1(x, y)), scale_factor=2.0)
        h = self.c2(F.relu(self.n2(self.c1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2.0))


class _DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, down: bool, first: bool, sn: bool):
        super().__init__()
        wrap = _sn if sn else (lambda m: m)
        self.c1 = wrap(nn.Conv2d(c_in, c_out, 3, 1, 1))
        self.c2 = wrap(nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = wrap(nn.Conv2d(c_in, c_out, 1)) if (c_in != c_out or down) else None
        self.down, self.first = down, first

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))
        s = x
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.skip is not None:
            s = self.skip(F.avg_pool2d(s, 2) if self.first and self.down else s)
            if self.down and not self.first:
                s = F.avg_pool2d(s, 2)
        return h + s


class ResNetGenerator(nn.Module):
    def __init__(
        self,
        z_dim: int = 128,
        channels: int = 3,
        image_size: int = 32,
        base_channels: int = 256,
        num_classes: int = 0,
    ):
        super().__init__()
        s0 = _start_size(image_size)
        self.z_dim, self.num_classes, self.c0, self.s0 = z_dim, num_classes, base_channels, s0
        self.fc = nn.Linear(z_dim, base_channels * s0 * s0)
        n_up = int(math.log2(image_size // s0))
        self.blocks = nn.ModuleList(
            [_GBlock(base_channels, base_channels, num_classes) for _ in range(n_up)]
        )
        self.out_norm = nn.BatchNorm2d(base_channels)
        self.out = nn.Conv2d(base_channels, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c0, self.s0, self.s0)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.out_norm(h))))


class ResNetDiscriminator(nn.Module):
    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        base_channels: int = 128,
        num_classes: int = 0,
        spectral_norm: bool = True,
    ):
        super().__init__()
        # down to twice the start size (8x8 from 32 or 64, 14x14 from 28), then two blocks there
        n_down = int(math.log2(image_size // (2 * _start_size(image_size))))
        blocks = [_DBlock(channels, base_channels, True, True, spectral_norm)]
        blocks += [
            _DBlock(base_channels, base_channels, True, False, spectral_norm)
            for _ in range(n_down - 1)
        ]
        blocks += [
            _DBlock(base_channels, base_channels, False, False, spectral_norm) for _ in range(2)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.head = _Projection(base_channels, num_classes, spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.head(h, y)
