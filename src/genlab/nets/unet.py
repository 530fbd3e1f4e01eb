"""The denoising UNet of DDPM (Ho et al. 2020, App. B; PixelCNN++-style backbone with
Wide-ResNet blocks, GroupNorm, sinusoidal time embedding, self-attention at chosen
resolutions), sized by config so one class serves 28x28 on a CPU and 64x64 on a GPU.

Plain ``nn.Module``: no Lightning, no diffusion math. Input (B, C, H, W) any H, W (odd sizes
are handled by resizing skips), timesteps (B,) and optional class labels (B,) in
[0, num_classes); label ``num_classes`` (or ``y=None``) is the learned "no class" token used
for condition dropout and classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads if channels % num_heads == 0 else 1
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (z.transpose(-1, -2) for z in qkv.unbind(1))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """DDPM UNet.

    Args:
        in_channels: image channels C.
        image_size: input side, used to decide where attention goes.
        base_channels: channels at full resolution; level i has base * channel_mult[i].
        channel_mult: one entry per resolution level (len - 1 downsamplings).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: sides (e.g. 7, 14, 16) at which self-attention is applied.
        dropout: in every residual block.
        num_classes: > 0 adds a class embedding (with an extra "no class" token).
        out_channels: defaults to in_channels (eps/x0/v prediction).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (7,),
        dropout: float = 0.1,
        num_classes: int = 0,
        num_heads: int = 4,
        groups: int = 32,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.base_channels = base_channels
        temb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        attn = set(int(r) for r in attn_resolutions)
        res, ch = image_size, base_channels
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList(
                    [ResBlock(ch, base_channels * mult, temb_dim, dropout, groups)]
                )
                ch = base_channels * mult
                if res in attn:
                    block.append(AttnBlock(ch, num_heads, groups))
                self.down.append(block)
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_channels.append(ch)
                res = (res + 1) // 2

        self.mid1 = ResBlock(ch, ch, temb_dim, dropout, groups)
        self.mid_attn = AttnBlock(ch, num_heads, groups)
        self.mid2 = ResBlock(ch, ch, temb_dim, dropout, groups)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                c_skip = skip_channels.pop()
                block = nn.ModuleList(
                    [ResBlock(ch + c_skip, base_channels * mult, temb_dim, dropout, groups)]
                )
                ch = base_channels * mult
                if res in attn:
                    block.append(AttnBlock(ch, num_heads, groups))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))  # after 2x
                res = res * 2
        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) integer or float timesteps, y (B,) labels or None."""
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if isinstance(block[0], ResBlock):
                h = block[0](h, temb)
                if len(block) > 1:
                    h = block[1](h)
            else:  # downsample
                h = block[0](h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, skips.pop()], dim=1), temb)
                if len(block) > 1:
                    h = block[1](h)
            else:  # upsample to the size of the skip that comes next
                h = block[0](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
