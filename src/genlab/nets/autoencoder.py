"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022,
Sec. 3.1 and App. G, the "KL-f4" / "KL-f8" first stages), and its patch discriminator.

- ``KLEncoder``: x (B, C, H, W) in [-1, 1] -> the diagonal Gaussian posterior q(z | x) as
  (mean, logvar), each (B, latent_channels, h, w). A 3x3 input convolution, then one level per
  entry of ``channel_mult`` (``num_res_blocks`` residual blocks of width hidden * mult, then a
  stride-2 3x3 convolution on every level but the last), a middle block (residual,
  self-attention, residual), GroupNorm + SiLU and a 3x3 convolution to 2 * latent_channels
  maps, then the 1x1 "quant_conv" of LDM. logvar is clamped to [-30, 20] as LDM's
  ``DiagonalGaussianDistribution`` does.
- ``KLDecoder``: z (B, latent_channels, h, w) -> (B, C, H, W), the mirror image (a 1x1
  "post_quant_conv", the middle block, ``num_res_blocks + 1`` residual blocks per level,
  nearest-neighbour upsampling + 3x3 convolution between levels). Its output is not squashed
  (LDM's decoder has no tanh either): the family trains on it and clamps what it returns.
- ``PatchDiscriminator``: the PatchGAN of pix2pix (Isola et al. 2017) that LDM and VQGAN use,
  x (B, C, H, W) -> logits (B, 1, h', w'), one per overlapping patch.

``len(channel_mult) - 1`` stride-2 levels (``downsample``) give the factor f = 2^downsample:
4 with three levels, 8 with four. Any image size works: a stride-2 3x3 convolution with padding
1 maps n to ceil(n / 2) (28 -> 14 -> 7, 7 -> 4), and the decoder, given ``image_size``,
resizes to those recorded sizes on the way up (as ``nets.unet`` resizes to its skips), so
latents of an image_size image decode to exactly image_size. Plain torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def level_sizes(size: int, downsample: int) -> list[int]:
    """The side of the feature map at each level: [size, ceil(size / 2), ...], downsample + 1
    entries (what a stride-2 3x3 convolution with padding 1 gives)."""
    sizes = [int(size)]
    for _ in range(downsample):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def _check(channel_mult: Sequence[int], num_res_blocks: int, latent_channels: int) -> None:
    if int(latent_channels) < 1:
        raise ValueError(f"latent_channels must be at least 1, got {latent_channels}")
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be positive integers, got {list(channel_mult)}")
    if int(num_res_blocks) < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}")


class ResnetBlock(nn.Module):
    """x -> skip(x) + conv(drop(silu(norm(conv(silu(norm(x))))))), shape-preserving in H, W;
    skip is a 1x1 convolution when the width changes (LDM's ResnetBlock without time)."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h * w positions, residual (LDM's AttnBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


def _middle(c: int, attention: bool, dropout: float) -> nn.Sequential:
    attn = AttnBlock(c) if attention else nn.Identity()
    return nn.Sequential(ResnetBlock(c, c, dropout), attn, ResnetBlock(c, c, dropout))


class KLEncoder(nn.Module):
    """x (B, channels, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, h, w) with
    h = ceil(H / 2^downsample) (ceil at every level); logvar in [-30, 20]."""

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check(channel_mult, num_res_blocks, latent_channels)
        self.latent_channels = int(latent_channels)
        self.downsample = len(channel_mult) - 1  # stride-2 levels: factor 2^downsample
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        levels, c = [], hidden
        for i, mult in enumerate(channel_mult):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, hidden * mult, dropout))
                c = hidden * mult
            if i < self.downsample:
                blocks.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # n -> ceil(n / 2)
            levels.append(nn.Sequential(*blocks))
        self.down = nn.Sequential(*levels)
        self.mid = _middle(c, mid_attention, dropout)
        two = 2 * self.latent_channels
        self.conv_out = nn.Sequential(
            _norm(c), nn.SiLU(), nn.Conv2d(c, two, 3, padding=1), nn.Conv2d(two, two, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.conv_out(self.mid(self.down(self.conv_in(x))))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``size`` (default 2x), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class KLDecoder(nn.Module):
    """z (B, latent_channels, h, w) -> (B, channels, H, W), unbounded (about [-1, 1] once
    trained). With ``image_size`` (int or (H, W)) latents of the encoder's size for it decode
    to exactly that size; other latent sizes are upsampled 2x per level."""

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        image_size: int | Sequence[int] | None = None,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check(channel_mult, num_res_blocks, latent_channels)
        self.latent_channels = int(latent_channels)
        self.downsample = len(channel_mult) - 1
        if image_size is None:
            self.sizes = None
        else:
            hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            per_dim = [level_sizes(int(s), self.downsample) for s in hw]
            self.sizes = [tuple(pair) for pair in zip(*per_dim, strict=True)]  # level -> (h, w)
        c = hidden * channel_mult[-1]
        self.conv_in = nn.Sequential(
            nn.Conv2d(latent_channels, latent_channels, 1),  # LDM's post_quant_conv
            nn.Conv2d(latent_channels, c, 3, padding=1),
        )
        self.mid = _middle(c, mid_attention, dropout)
        self.levels, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, hidden * channel_mult[i], dropout))
                c = hidden * channel_mult[i]
            self.levels.append(nn.Sequential(*blocks))
            if i > 0:
                self.ups.append(Upsample(c))
        self.conv_out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the output convolution (VQGAN's adaptive weight looks at it)."""
        return self.conv_out[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        exact = self.sizes is not None and tuple(z.shape[-2:]) == self.sizes[-1]
        for j, level in enumerate(self.levels):
            h = level(h)
            if j < len(self.ups):
                size = self.sizes[self.downsample - 1 - j] if exact else None
                h = self.ups[j](h, size)
        return self.conv_out(h)


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator (Isola et al. 2017; LDM's ``NLayerDiscriminator``): 4x4
    convolutions, ``n_layers`` of stride 2 (widths hidden * min(2^i, 8)), one of stride 1, then
    a stride-1 map to one logit per patch; BatchNorm + LeakyReLU(0.2), DCGAN initialisation.
    x (B, C, H, W) in [-1, 1] -> logits (B, 1, h', w'); sides of at least 3 * 2^n_layers px
    (16 px: n_layers <= 2; LDM uses 3 at 256 px)."""

    def __init__(self, channels: int, hidden: int = 64, n_layers: int = 3):
        super().__init__()
        if int(n_layers) < 1:
            raise ValueError(f"the discriminator's n_layers must be at least 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)
        ]  # fmt: skip
        c = hidden
        for i in range(1, n_layers + 1):
            c_out = hidden * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True),
            ]  # fmt: skip
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.n_layers = int(n_layers)
        for m in self.modules():  # pix2pix / LDM weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_side = 3 * 2**self.n_layers  # n halvings, then two 4x4 stride-1 maps (-1 each)
        if min(x.shape[-2:]) < min_side:
            raise ValueError(
                f"a {self.n_layers}-layer patch discriminator needs images of at least "
                f"{min_side} px, got {tuple(x.shape[-2:])}: lower its n_layers"
            )
        return self.net(x)


__all__ = ["KLDecoder", "KLEncoder", "PatchDiscriminator", "ResnetBlock", "level_sizes"]
