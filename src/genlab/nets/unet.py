"""The denoising UNet of DDPM (Ho et al. 2020, App. B; PixelCNN++-style backbone with
Wide-ResNet blocks, GroupNorm, sinusoidal time embedding, self-attention at chosen
resolutions), sized by config so one class serves 28x28 on a CPU and 64x64 on a GPU.

Plain ``nn.Module``: no Lightning, no diffusion math. Input (B, C, H, W) any H, W (odd sizes
are handled by resizing skips), timesteps (B,) and optional class labels (B,) in
[0, num_classes); label ``num_classes`` (or ``y=None``) is the learned "no class" token used
for condition dropout and classifier-free guidance.

Text conditioning (``context_dim``): every self-attention block (at ``attn_resolutions`` and in
the middle) is followed by a cross-attention sub-layer, queries from the feature map and keys /
values from a context (B, L, context_dim) such as per-token CLIP text features, masked by
``context_mask`` (B, L) (True = attend), with a zero-initialised output projection so the net
is unchanged at initialisation (Rombach et al. 2022, Sec. 3.3). Without ``context_dim`` the
net has exactly the parameters and state-dict keys it had before cross-attention existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "check_context", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def check_context(net: str, context_dim: int | None, context, context_mask) -> None:
    """One-line errors for a cross-attention context (B, L, context_dim) the net ``net``
    (``UNet``, ``DiT``) cannot take: a mask without a context, a context for a net built
    without cross-attention, or one of the wrong shape."""
    if context is None and context_mask is not None:
        raise ValueError(f"{net}: context_mask given without a context")
    if context is not None and context_dim is None:
        raise ValueError(
            f"{net}: this net has no cross-attention (context_dim=None) and takes no "
            "context; build it with context_dim=<the context's width> to condition on text"
        )
    if context is not None and (context.ndim != 3 or context.shape[-1] != context_dim):
        shape = tuple(context.shape)
        raise ValueError(f"{net}: context must be (B, L, {context_dim}), got {shape}")


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


class CrossAttention(nn.Module):
    """Residual cross-attention of a feature map (B, C, H, W) to a context (B, L, D): queries
    from the GroupNorm'd H*W positions, keys and values from the context, context_mask (B, L)
    True = attend; a sample with no token kept gets nothing added. The output projection is
    zero-initialised: the identity at initialisation (Rombach et al. 2022, Sec. 3.3)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, h * w).transpose(-1, -2)  # (b, n, hw, d)
        k, v = (
            z.reshape(b, -1, heads, d).transpose(1, 2) for z in self.kv(context).chunk(2, -1)
        )  # (b, n, L, d)
        attn_mask, some = None, None
        if context_mask is not None:
            keep = context_mask.bool()
            some = keep.any(dim=1)  # (b,) samples with a token to attend to
            attn_mask = (keep | ~some[:, None])[:, None, None, :]  # no all-False row (NaN)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (b, n, hw, d)
        out = self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
        if some is not None:
            out = out * some[:, None, None, None].to(out.dtype)
        return x + out


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; with ``context_dim`` also
    cross-attention to a context (``CrossAttention``), in the attribute ``cross``."""

    def __init__(self, channels: int, num_heads: int, groups: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads if channels % num_heads == 0 else 1
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))
        self.cross = None
        if context_dim is not None:  # absent otherwise: the state dict keeps its old keys
            self.cross = CrossAttention(channels, context_dim, self.num_heads, groups)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (z.transpose(-1, -2) for z in qkv.unbind(1))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        x = x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
        if self.cross is not None and context is not None:
            x = self.cross(x, context, context_mask)
        return x


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
        context_dim: width of a context (text tokens) for cross-attention in every attention
            block; None: no cross-attention (and no context may be given).
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
        context_dim: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.context_dim = None if context_dim is None else int(context_dim)
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
                    block.append(AttnBlock(ch, num_heads, groups, self.context_dim))
                self.down.append(block)
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_channels.append(ch)
                res = (res + 1) // 2

        self.mid1 = ResBlock(ch, ch, temb_dim, dropout, groups)
        self.mid_attn = AttnBlock(ch, num_heads, groups, self.context_dim)
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
                    block.append(AttnBlock(ch, num_heads, groups, self.context_dim))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))  # after 2x
                res = res * 2
        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    def _check_context(self, context, context_mask) -> None:
        check_context("UNet", self.context_dim, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) integer or float timesteps, y (B,) labels or None, context
        (B, L, context_dim) or None, context_mask (B, L) bool or None -> (B, C', H, W)."""
        self._check_context(context, context_mask)
        ctx = (context, context_mask)
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
                    h = block[1](h, *ctx)
            else:  # downsample
                h = block[0](h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb), *ctx), temb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, skips.pop()], dim=1), temb)
                if len(block) > 1:
                    h = block[1](h, *ctx)
            else:  # upsample to the size of the skip that comes next
                h = block[0](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
