"""An ImageGPT-style transformer decoder over the values of an image, with its KV-cache sampler.

ImageGPT (Chen et al. 2020, "Generative Pretraining from Pixels", Sec. 2.1-2.3) is a GPT-2
decoder (Radford et al. 2019: pre-LayerNorm blocks, learned position embeddings) trained on
the raster sequence of an image with a softmax over the values. Here the sequence is the
image's *subpixels*: raster order over pixels and, inside an RGB pixel, R then G then B, so
position t = (i * W + j) * C + c and T = C * H * W. This is exactly the PixelCNN
factorisation p(x) = prod_t p(x_t | x_<t) with a 256-way softmax per channel value (van den
Oord et al. 2016, Eq. 1-2), so bits/dim are exact and compare with the PixelCNNs'; ImageGPT's
9-bit colour palette (one token per pixel) would make the likelihood that of a quantised
image instead. The price is a sequence C times longer (attention is O(T^2) per pass).

The input is shifted right by one: position t reads a learned start-of-sequence token (t = 0)
or the embedding of value t - 1, plus its position embedding and, for a class-conditional net,
the class embedding (added at every position, so every layer sees the label; no label dropout
is needed). Causal self-attention (``scaled_dot_product_attention(is_causal=True)``) lets
position t see positions <= t, i.e. values < t: a change at value i changes no logit at
positions <= i (tests).

As a prior over VQ-VAE codes (``VQPriorModule``, ``in_channels`` = the code-embedding width),
the input is the (B, E, h, w) map of code embeddings, projected linearly per position, and
the sequence is the h * w code positions (``channels`` = 1, ``num_values`` = the codebook
size).

``CachedImageGPT`` (registered in ``genlab.nets.cached``) samples with a KV cache: each
layer's keys and values of the positions done are kept, and each step runs one position
through the network, attending over the cache (O(t) per layer instead of a full O(T^2) pass).
Position t's activations depend only on positions <= t, so they are the full pass's, computed
once; the arithmetic is the same up to float reassociation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageGPT", "CachedImageGPT"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, Eq. 1; GPT-2's fused qkv)."""

    def __init__(self, hidden: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T, D) -> q, k, v, each (B, heads, T, D / heads)."""
        b, t, d = h.shape
        qkv = self.qkv(h).view(b, t, 3, self.num_heads, d // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, a: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = a.shape
        return self.proj(a.transpose(1, 2).reshape(b, t, -1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); position t attends to positions <= t."""
        q, k, v = self._heads(h)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return F.dropout(self._merge(a), p, self.training)

    def step(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t: int):
        """Position t alone: h (B, 1, D); its key and value are written into the caches
        ``keys``, ``values`` (B, heads, T, D / heads) at t, and it attends over 0..t."""
        q, k, v = self._heads(h)
        keys[:, :, t], values[:, :, t] = k[:, :, 0], v[:, :, 0]
        done_k, done_v = keys[:, :, : t + 1], values[:, :, : t + 1]
        return self._merge(F.scaled_dot_product_attention(q, done_k, done_v))


class Block(nn.Module):
    """GPT-2 block (Radford et al. 2019, Sec. 2.3): h + attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, num_heads, dropout)
        inner = int(mlp_ratio * hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner),
            nn.GELU(approximate="tanh"),
            nn.Linear(inner, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))

    def step(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t: int):
        """One position (B, 1, D) with the layer's KV cache (``CausalSelfAttention.step``)."""
        h = h + self.attn.step(self.ln1(h), keys, values, t)
        return h + self.mlp(self.ln2(h))


class ImageGPT(nn.Module):
    """A GPT-2 decoder over the subpixels of an image (module docstring).

    x (B, C, H, W) in [-1, 1] on the grid of ``num_values`` levels (8-bit: k / 127.5 - 1), or
    with ``in_channels`` = E a (B, E, H, W) map of embeddings (VQ-VAE codes; C must be 1);
    y (B,) labels in [0, num_classes) -> logits (B, num_values, C, H, W), where the logits at
    (c, i, j) are those of p(x[c, i, j] | the values before it in raster, then channel, order).

    Args:
        channels: C, the channels predicted. image_size: the largest grid, an int or (H, W): the
            position table has C * H * W entries and a smaller grid (e.g. the VQ-VAE's code grid)
            uses its first C * h * w.
        num_values: softmax width (256; the codebook size for a prior over codes).
        hidden, depth, num_heads, mlp_ratio, dropout: the GPT-2 decoder's width, number of
            blocks, attention heads, MLP width / hidden and dropout (attention and residual).
        num_classes: > 0 class-conditional (a class embedding added at every position).
        in_channels: None for images (values embedded by a table), else the width of the
            embeddings fed in (projected linearly).
    """

    output = "categorical"

    def __init__(
        self,
        channels: int,
        image_size: int | Sequence[int] = 28,
        num_values: int = 256,
        hidden: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int = 0,
        in_channels: int | None = None,
    ):
        super().__init__()
        if in_channels is not None and channels != 1:
            raise ValueError("embedded inputs (in_channels) are one token per position: C = 1")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.channels, self.num_values, self.num_classes = channels, num_values, num_classes
        self.in_channels, self.hidden = in_channels, hidden
        self.max_positions = channels * int(size[0]) * int(size[1])
        if in_channels is None:
            self.embed = nn.Embedding(num_values, hidden)
        else:
            self.embed = nn.Linear(in_channels, hidden)
        self.start = nn.Parameter(torch.zeros(hidden))
        self.position = nn.Parameter(torch.zeros(self.max_positions, hidden))
        self.class_embed = nn.Embedding(num_classes, hidden) if num_classes else None
        self.blocks = nn.ModuleList(
            Block(hidden, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_values)
        self.drop = nn.Dropout(dropout)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights and embeddings, zero biases, the
        residual projections scaled by 1 / sqrt(2 * depth) (Radford et al. 2019, Sec. 2.3)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" not in name and not name.startswith("ln_"):  # LayerNorm gains stay 1
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth) if residual else 0.02)

    # ------------------------------------------------------------------ the sequence
    def sequence_length(self, height: int, width: int) -> int:
        """T = C * H * W, checked against the position table."""
        t = self.channels * height * width
        if t > self.max_positions:
            raise ValueError(f"{self.channels}x{height}x{width} needs {t} positions, the "
                             f"net has {self.max_positions} (raise image_size)")  # fmt: skip
        return t

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded values in sequence order: (B, C, H, W) -> (B, T, D)."""
        if self.in_channels is not None:  # (B, E, h, w) code embeddings
            return self.embed(x.permute(0, 2, 3, 1).flatten(1, 2))
        return self.embed(self.levels(x.permute(0, 2, 3, 1).flatten(1)))  # pixel, then channel

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Values in [-1, 1] -> level indices 0..V-1 (long): k = (x + 1) (V - 1) / 2, the
        inverse of ``genlab.data.convert.from_levels`` for V = 256."""
        half = (self.num_values - 1) / 2
        return ((x + 1) * half).round().clamp(0, self.num_values - 1).long()

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | float:
        """The class embedding (B, D) added at every position; 0 for an unconditional net."""
        if self.class_embed is None:
            return 0.0
        if y is None:
            raise ValueError("a class-conditional net needs labels y")
        return self.class_embed(y)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and head: (B, T, D) -> (B, T, V)."""
        return self.head(self.ln_f(h))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) (or (B, E, H, W) embeddings), y (B,) -> logits (B, V, C, H, W)."""
        b, _, height, width = x.shape
        t = self.sequence_length(height, width)
        tokens = self.tokens(x)  # (B, T, D): value t at position t
        start = self.start.expand(b, 1, -1)
        h = torch.cat([start, tokens[:, :-1]], dim=1)  # shifted right: position t sees < t
        h = self.drop(h + self.position[:t] + _per_position(self.condition(y)))
        for block in self.blocks:
            h = block(h)
        out = self.logits(h).view(b, height, width, self.channels, self.num_values)
        return out.permute(0, 4, 3, 1, 2)


def _per_position(cond: torch.Tensor | float) -> torch.Tensor | float:
    return cond[:, None] if torch.is_tensor(cond) else cond


class CachedImageGPT:
    """KV-cache sampling for ``ImageGPT`` (the ``genlab.nets.cached`` interface).

    ``reset(x, y)`` allocates, per block, key and value caches (B, heads, T, D / heads);
    ``step(x, i, j)`` is called once per channel value in sampling order (C times per pixel,
    after the earlier channels are written into x) and runs position t -- the next one --
    alone: its input is the start token (t = 0) or the embedding of value t - 1 read from x,
    each block writes its key and value at t and attends over 0..t. It returns (B, V, C)
    logits with the channel being drawn, c = t mod C, filled in and the other channels NaN
    (they are not known yet: the later channels of the pixel are a later step).
    ``end_row`` has nothing to do. Eval mode only (no dropout).
    """

    def __init__(self, net: ImageGPT):
        self.net = net

    def reset(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        net, (b, _, height, width) = self.net, x.shape
        self.width, self.t = width, 0
        total = net.sequence_length(height, width)
        heads = net.blocks[0].attn.num_heads if len(net.blocks) else 1
        shape = (b, heads, total, net.hidden // heads)
        self.keys = [x.new_zeros(shape) for _ in net.blocks]
        self.values = [x.new_zeros(shape) for _ in net.blocks]
        self.cond = net.condition(y)

    def _input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The input token of position t: (B, D)."""
        net = self.net
        if t == 0:
            return net.start.expand(x.shape[0], -1)
        pixel, c = divmod(t - 1, net.channels)
        i, j = divmod(pixel, self.width)
        if net.in_channels is not None:
            return net.embed(x[:, :, i, j])
        return net.embed(net.levels(x[:, c, i, j]))

    def step(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        net, t = self.net, self.t
        pixel, c = divmod(t, net.channels)
        if pixel != i * self.width + j:
            raise ValueError(f"step ({i}, {j}) out of order: position {t} is pixel {pixel}")
        h = (self._input(x, t) + net.position[t] + self.cond)[:, None]  # (B, 1, D)
        for block, keys, values in zip(net.blocks, self.keys, self.values):
            h = block.step(h, keys, values, t)
        logits = net.logits(h)[:, 0]  # (B, V)
        out = logits.new_full((*logits.shape, net.channels), float("nan"))
        out[:, :, c] = logits
        self.t += 1
        return out

    def end_row(self, x: torch.Tensor, i: int) -> None:
        """Nothing to do: the next step reads the row's last value from x."""
