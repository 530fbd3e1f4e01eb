"""R3GAN's modernised ResNet generator and discriminator (plain torch).

Huang et al. 2024, "The GAN is dead; long live the GAN! A Modern GAN Baseline", Sec. 4
(config E): stages of residual blocks, each an inverted bottleneck with a grouped 3x3
convolution (1x1 expand by ``expansion``, leaky ReLU 0.2, grouped 3x3 with ``groups`` groups,
leaky ReLU 0.2, 1x1 project), no normalisation layers. Convolutions have no bias; each leaky
ReLU carries a learned bias before it. Fix-up style initialisation: He (MSR) normal weights,
the branch's first two layers scaled by L^(-1/4) (L residual blocks in the network, 3 layers
per branch), the last layer of every branch zero, so each block is the identity at init.

Resampling is bilinear with a low-pass filter (the outer product of [1, 3, 3, 1] / 8, the
authors' "interpolative" resamplers). The generator opens with a learned s0 x s0 basis
modulated per channel by a linear map of z (and the class embedding, concatenated to z); the
discriminator closes with a depthwise s0 x s0 convolution and a linear head, and a conditional
discriminator projects its last features on a class embedding (no unconditional term).
The generator's output is linear (no tanh); ``GenerativeModule.sample`` clamps to [-1, 1].

Geometry: s0 = 4 for 16, 32, 64 (4 * 2^k), s0 = 7 for 28 (7 -> 14 -> 28); one stage per
resolution from s0 up. ``widths``, ``blocks`` and ``groups`` are one int (every stage) or one
value per stage, from s0 up to the image size; the discriminator reverses the lists.
Generators map (z (B, z_dim), y (B,) or None) to images (B, C, H, W); discriminators map
(x (B, C, H, W), y) to logits (B,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2 / (1 + 0.2**2))  # He gain of a leaky ReLU with slope 0.2


def stage_geometry(image_size: int) -> tuple[int, int]:
    """(s0, number of stages): 16 -> (4, 3), 28 -> (7, 3), 32 -> (4, 4), 64 -> (4, 5)."""
    for s0 in (7, 4):
        k = image_size // s0
        if image_size % s0 == 0 and k >= 2 and k & (k - 1) == 0:
            return s0, int(math.log2(k)) + 1
    raise ValueError(
        f"R3GAN nets need 4 * 2^k or 7 * 2^k pixel images (16, 28, 32, 64), got {image_size}"
    )


def per_stage(value: int | Sequence[int], n: int, name: str) -> list[int]:
    """One int for every stage, or exactly n values (from the s0 x s0 stage up)."""
    if isinstance(value, int):
        return [value] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values, this image size has {n} stages")
    return values


def msr_init_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """He normal: std = gain / sqrt(fan_in), fan_in = weight.size(1) * kernel area (a linear
    layer's input features; an embedding counts as a linear map of one-hot labels)."""
    fan_in = weight.shape[1] * weight[0][0].numel() if weight.dim() > 2 else weight.shape[1]
    with torch.no_grad():
        return weight.normal_(0.0, gain / math.sqrt(fan_in))


def _conv(c_in: int, c_out: int, k: int = 1, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2, groups=groups, bias=False)
    msr_init_(conv.weight, gain)
    return conv


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2) with a learned per-channel bias b (zero at init)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2)


class Resample(nn.Module):
    """Bilinear 2x up- or downsampling, depthwise with the low-pass kernel [1,3,3,1]^T [1,3,3,1]
    / 64 (times 4 when upsampling, to keep the mean): (B, C, H, W) -> (B, C, 2H, 2W) or
    (B, C, H/2, W/2)."""

    def __init__(self, up: bool):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.up = up
        self.register_buffer("kernel", (taps[:, None] * taps[None]) / 64.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        if self.up:
            return F.conv_transpose2d(x, 4 * k, stride=2, padding=1, groups=c)
        return F.conv2d(x, k, stride=2, padding=1, groups=c)


class InvertedBottleneck(nn.Module):
    """x + W3 act(W2 act(W1 x)): 1x1 to width * expansion, grouped 3x3, 1x1 back; W3 is zero at
    init (the block is the identity), W1 and W2 carry the gain L^(-1/4) of ``num_blocks`` L.
    (B, width, H, W) -> same."""

    def __init__(self, width: int, groups: int, expansion: int, num_blocks: int):
        super().__init__()
        hidden = width * expansion
        if hidden % groups:
            raise ValueError(f"width * expansion = {hidden} is not divisible by groups={groups}")
        gain = LRELU_GAIN * num_blocks ** (-1 / 4)  # 2 * 3 - 2 = 4: three layers per branch
        self.expand = _conv(width, hidden, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(hidden)
        self.grouped = _conv(hidden, hidden, 3, groups=groups, gain=gain)
        self.act2 = BiasedLeakyReLU(hidden)
        self.project = _conv(hidden, width, 1, gain=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.grouped(self.act1(self.expand(x)))))


def _blocks(width: int, n: int, groups: int, expansion: int, total: int) -> list[nn.Module]:
    return [InvertedBottleneck(width, groups, expansion, total) for _ in range(n)]


class R3GANGenerator(nn.Module):
    """G(z, y): basis at s0 x s0, then per stage [1x1 width change, bilinear 2x up] and
    residual blocks, then a 1x1 convolution to ``channels`` (no activation)."""

    def __init__(
        self,
        z_dim: int = 64,
        channels: int = 3,
        image_size: int = 32,
        widths: int | Sequence[int] = 64,
        blocks: int | Sequence[int] = 1,
        groups: int | Sequence[int] = 8,
        expansion: int = 2,
        num_classes: int = 0,
        embed_dim: int | None = None,
    ):
        super().__init__()
        self.s0, n = stage_geometry(image_size)
        widths = per_stage(widths, n, "widths")
        blocks, groups = per_stage(blocks, n, "blocks"), per_stage(groups, n, "groups")
        self.z_dim, self.num_classes = int(z_dim), int(num_classes)
        embed_dim = self.z_dim if embed_dim is None else int(embed_dim)  # the paper: z_dim
        self.embed = None
        if self.num_classes:
            self.embed = nn.Embedding(self.num_classes, embed_dim)
            msr_init_(self.embed.weight.T)  # a linear map of one-hot labels: fan_in = classes
        in_dim = self.z_dim + (embed_dim if self.num_classes else 0)
        self.basis = nn.Parameter(torch.randn(widths[0], self.s0, self.s0))
        self.basis_scale = nn.Linear(in_dim, widths[0], bias=False)
        msr_init_(self.basis_scale.weight)
        total = sum(blocks)
        stages = []
        for i, (w, b, g) in enumerate(zip(widths, blocks, groups)):
            layers = [] if i == 0 else [Resample(up=True)]
            if i > 0 and widths[i - 1] != w:
                layers.insert(0, _conv(widths[i - 1], w))  # 1x1 at the lower resolution
            stages.append(nn.Sequential(*layers, *_blocks(w, b, g, expansion, total)))
        self.stages = nn.ModuleList(stages)
        self.out = _conv(widths[-1], channels)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional generator needs labels y")
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.basis[None] * self.basis_scale(z)[:, :, None, None]  # (B, w0, s0, s0)
        for stage in self.stages:
            h = stage(h)
        return self.out(h)


class R3GANDiscriminator(nn.Module):
    """D(x, y): 1x1 convolution from ``channels``, then per stage (image size down) residual
    blocks and [bilinear 2x down, 1x1 width change]; at s0 x s0 a depthwise s0 x s0
    convolution and a linear layer to 1 logit, or (conditional) to ``widths[0]`` features
    projected on a class embedding: D(x, y) = <phi(x), embed(y)>."""

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        widths: int | Sequence[int] = 64,
        blocks: int | Sequence[int] = 1,
        groups: int | Sequence[int] = 8,
        expansion: int = 2,
        num_classes: int = 0,
    ):
        super().__init__()
        self.s0, n = stage_geometry(image_size)
        widths = per_stage(widths, n, "widths")[::-1]  # from the image size down to s0
        blocks = per_stage(blocks, n, "blocks")[::-1]
        groups = per_stage(groups, n, "groups")[::-1]
        self.num_classes = int(num_classes)
        self.inp = _conv(channels, widths[0])
        total = sum(blocks)
        stages = []
        for i, (w, b, g) in enumerate(zip(widths, blocks, groups)):
            layers = _blocks(w, b, g, expansion, total)
            if i < n - 1:
                layers.append(Resample(up=False))
                if widths[i + 1] != w:
                    layers.append(_conv(w, widths[i + 1]))  # 1x1 at the lower resolution
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        w0 = widths[-1]
        self.basis = nn.Conv2d(w0, w0, self.s0, groups=w0, bias=False)  # (B, w0, 1, 1)
        msr_init_(self.basis.weight)
        self.head = nn.Linear(w0, w0 if self.num_classes else 1, bias=False)
        msr_init_(self.head.weight)
        self.embed = None
        if self.num_classes:
            self.embed = nn.Embedding(self.num_classes, w0)
            msr_init_(self.embed.weight.T, gain=1 / math.sqrt(w0))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        for stage in self.stages:
            h = stage(h)
        out = self.head(self.basis(h).flatten(1))  # (B, 1) or (B, w0)
        if self.embed is None:
            return out[:, 0]
        if y is None:
            raise ValueError("a class-conditional discriminator needs labels y")
        return (out * self.embed(y)).sum(1)
