"""The convolutional autoregressive networks: PixelCNN, Gated PixelCNN and PixelCNN++.

Every net maps images x (B, C, H, W) in [-1, 1] on the 8-bit grid (k/127.5 - 1) and optional
labels y (B,) in [0, num_classes) to the parameters of p(x_i | x_<i), where x_<i is every
pixel before pixel i in raster order and, for RGB, the channels of pixel i before the one
predicted (R, then G given R, then B given R and G):

- ``output == "categorical"`` (PixelCNN, GatedPixelCNN, and PixelRNN in ``pixelrnn.py``):
  logits (B, 256, C, H, W) of a 256-way softmax per channel value;
- ``output == "logistic_mixture"`` (PixelCNNPlusPlus): the parameters (B, P, H, W) of a
  discretised mixture of logistics, read by ``genlab.discrete``.

Causality is exact (gradients of outputs for pixel i with respect to later inputs are zero),
which ``tests/test_autoregressive_nets.py`` checks for every net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MaskedConv2d",
    "PixelCNN",
    "GatedPixelCNN",
    "PixelCNNPlusPlus",
    "channel_groups",
    "mix_logistic_num_params",
]


# ------------------------------------------------------------------------- masked convolutions
def channel_groups(n: int, data_channels: int, parts: int = 1) -> torch.Tensor:
    """The data channel (0 = R, 1 = G, 2 = B) that each of ``n`` feature channels belongs to.

    Features are split into ``data_channels`` contiguous groups; a tensor made of ``parts``
    concatenated blocks (e.g. the gates of an LSTM, chunked along dim 1) repeats the split in
    every block, so chunk k of the gates has the groups of the hidden state. -> (n,) long."""
    per = n // parts
    return (torch.arange(per) * data_channels // per).repeat(parts)


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the current one in raster order
    (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Sec. 3.4 and Fig. 2).

    Rows above the centre and the pixels left of it in the centre row are visible. At the
    centre pixel, features are tied to data channels (``channel_groups``): mask "A" lets a
    group see the *earlier* groups of the input (G sees R, B sees R and G, R sees nothing),
    mask "B" also lets it see itself. For ``data_channels=1`` these are the plain spatial
    masks (A excludes the centre, B includes it). ``centre`` places the current pixel inside
    the kernel (default its middle), e.g. ``(0, k - 1)`` for the 1 x k horizontal stack of the
    Gated PixelCNN. Padding keeps the size: (B, in, H, W) -> (B, out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str = "B",
        data_channels: int = 1,
        in_parts: int = 1,
        out_parts: int = 1,
        centre: tuple[int, int] | None = None,
    ):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        ch, cw = centre if centre is not None else (kh // 2, kw // 2)
        super().__init__(in_channels, out_channels, (kh, kw))
        self.mask_type = mask_type
        self.pad = (cw, kw - 1 - cw, ch, kh - 1 - ch)  # left, right, top, bottom
        mask = torch.zeros_like(self.weight)  # (out, in, kh, kw)
        mask[:, :, :ch] = 1
        mask[:, :, ch, :cw] = 1
        g_out = channel_groups(out_channels, data_channels, out_parts)[:, None]
        g_in = channel_groups(in_channels, data_channels, in_parts)[None, :]
        mask[:, :, ch, cw] = (g_in < g_out if mask_type == "A" else g_in <= g_out).float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move a map down by one row (zeros enter at the top): row i then holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def class_biases(embed: nn.Embedding | None, y: torch.Tensor | None, n: int) -> list:
    """The learned per-class biases of ``n`` layers, each (B, F, 1, 1), from one embedding of
    width n * F; zeros for an unconditional net (``embed`` None, labels ignored)."""
    if embed is None:
        return [0.0] * n
    if y is None:
        raise ValueError("a class-conditional net needs labels y")
    return list(embed(y)[:, :, None, None].chunk(n, dim=1))


def categorical_head(
    hidden: int, out_hidden: int, channels: int, num_values: int = 256
) -> nn.Sequential:
    """ReLU, 1x1 mask-B conv, ReLU, 1x1 mask-B conv to ``num_values`` (256) logits per channel
    (PixelRNN paper, Table 4). Output (B, C * V, H, W), channel-major (``categorical_logits``)."""
    return nn.Sequential(
        nn.ReLU(),
        MaskedConv2d(hidden, out_hidden, 1, "B", channels),
        nn.ReLU(),
        MaskedConv2d(out_hidden, num_values * channels, 1, "B", channels),
    )


def categorical_logits(out: torch.Tensor, channels: int, num_values: int = 256) -> torch.Tensor:
    """(B, C * V, H, W) head output -> logits (B, V, C, H, W)."""
    b, _, h, w = out.shape
    return out.view(b, channels, num_values, h, w).transpose(1, 2)


# ------------------------------------------------------------------------------------- PixelCNN
class ResidualBlock(nn.Module):
    """h + [ReLU, 1x1 h -> h/2, ReLU, 3x3, ReLU, 1x1 h/2 -> h], all mask B (PixelRNN paper,
    Sec. 3.3 and Fig. 5, the PixelCNN block). (B, h, H, W) -> (B, h, H, W)."""

    def __init__(self, hidden: int, data_channels: int):
        super().__init__()
        half = max(hidden // 2, data_channels)
        self.block = nn.Sequential(
            nn.ReLU(),
            MaskedConv2d(hidden, half, 1, "B", data_channels),
            nn.ReLU(),
            MaskedConv2d(half, half, 3, "B", data_channels),
            nn.ReLU(),
            MaskedConv2d(half, hidden, 1, "B", data_channels),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.block(h)


class PixelCNN(nn.Module):
    """PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Sec. 3.5 and
    Table 4): a ``kernel_size`` mask-A convolution, ``num_layers`` residual blocks of mask-B
    convolutions, then two 1x1 mask-B convolutions to a 256-way softmax per channel.

    x (B, C, H, W) in [-1, 1], y (B,) labels -> logits (B, 256, C, H, W). With ``num_classes``
    > 0 a learned per-class bias is added to the features of every layer (the conditional
    PixelCNN of van den Oord et al. 2016b, Eq. 4, with a one-hot h). The stack of 3x3 masks has
    a blind spot above right of each pixel (that paper, Fig. 1); ``GatedPixelCNN`` has none.
    ``num_values`` (256) sets the softmax width and ``in_channels`` (default C) the input width,
    e.g. K codes of a VQ-VAE fed as embeddings (``VQPriorModule``).
    """

    output = "categorical"

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        num_layers: int = 7,
        kernel_size: int = 7,
        out_hidden: int = 128,
        num_classes: int = 0,
        num_values: int = 256,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.channels, self.num_classes, self.num_layers = channels, num_classes, num_layers
        self.num_values = num_values
        self.conv_in = MaskedConv2d(in_channels or channels, hidden, kernel_size, "A", channels)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, channels) for _ in range(num_layers))
        self.embed = nn.Embedding(num_classes, hidden * (num_layers + 1)) if num_classes else None
        self.head = categorical_head(hidden, out_hidden, channels, num_values)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        bias = class_biases(self.embed, y, self.num_layers + 1)
        h = self.conv_in(x) + bias[0]
        for block, b in zip(self.blocks, bias[1:]):
            h = block(h + b)
        return categorical_logits(self.head(h), self.channels, self.num_values)


# ------------------------------------------------------------------------------- Gated PixelCNN
def gate(a: torch.Tensor) -> torch.Tensor:
    """tanh(a_f) * sigmoid(a_g), the two halves of a along dim 1 (van den Oord et al. 2016b,
    Eq. 2). (B, 2F, H, W) -> (B, F, H, W)."""
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of the Gated PixelCNN (van den Oord et al. 2016b, "Conditional Image
    Generation with PixelCNN Decoders", Sec. 2.2 and Fig. 2).

    Vertical stack: a (k//2 + 1) x k convolution over the rows up to and including the current
    one; its pre-activation, shifted down one row and through a 1x1 convolution, enters the
    horizontal stack, which so sees only rows strictly above from it. Horizontal stack: a
    1 x (k//2 + 1) masked convolution over the current row up to the current pixel (mask A
    between RGB groups in the first layer, which also excludes the pixel itself, mask B
    after), the gate, a 1x1 mask-B convolution and a residual connection (not in the first
    layer, whose input is the image). The class bias enters both gates (Eq. 4).
    (v, h) (B, F_in, H, W) each -> (B, F, H, W) each.
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int, data_channels: int,
                 first: bool):  # fmt: skip
        super().__init__()
        p = kernel_size // 2
        self.v_pad = (p, p, p, 0)
        self.v_conv = nn.Conv2d(in_channels, 2 * hidden, (p + 1, kernel_size))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_conv = MaskedConv2d(
            in_channels, 2 * hidden, (1, p + 1), "A" if first else "B", data_channels,
            out_parts=2, centre=(0, p),
        )  # fmt: skip
        self.h_out = MaskedConv2d(hidden, hidden, 1, "B", data_channels)
        self.residual = not first

    def forward(self, v: torch.Tensor, h: torch.Tensor, bias) -> tuple[torch.Tensor, ...]:
        v_pre = self.v_conv(F.pad(v, self.v_pad))
        h_pre = self.h_conv(h) + self.v_to_h(down_shift(v_pre))
        h_new = self.h_out(gate(h_pre + bias))
        return gate(v_pre + bias), h + h_new if self.residual else h_new


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN (van den Oord et al. 2016b, Sec. 2.1-2.3): ``num_layers`` gated layers
    with vertical and horizontal stacks (no blind spot), then two 1x1 mask-B convolutions to a
    256-way softmax per channel. Per-channel RGB ordering lives in the horizontal stack.

    x (B, C, H, W) in [-1, 1], y (B,) labels -> logits (B, 256, C, H, W). With ``num_classes``
    > 0 a learned per-class embedding is added inside the gates of both stacks (Eq. 4).
    """

    output = "categorical"

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        num_layers: int = 8,
        kernel_size: int = 5,
        out_hidden: int = 128,
        num_classes: int = 0,
        num_values: int = 256,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.channels, self.num_classes, self.num_layers = channels, num_classes, num_layers
        self.num_values = num_values
        c_in = in_channels or channels
        self.layers = nn.ModuleList(
            GatedLayer(c_in if i == 0 else hidden, hidden, kernel_size, channels, i == 0)
            for i in range(num_layers)
        )
        self.embed = nn.Embedding(num_classes, 2 * hidden * num_layers) if num_classes else None
        self.head = categorical_head(hidden, out_hidden, channels, num_values)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        v = h = x
        for layer, bias in zip(self.layers, class_biases(self.embed, y, self.num_layers)):
            v, h = layer(v, h, bias)
        return categorical_logits(self.head(h), self.channels, self.num_values)


# ----------------------------------------------------------------------------------- PixelCNN++
def mix_logistic_num_params(channels: int, num_mixtures: int) -> int:
    """Channels of a discretised logistic mixture: per component 1 logit, C means, C log-scales
    and C(C-1)/2 coefficients of the linear dependence between channels (Salimans et al. 2017,
    Sec. 2.2): 10 per component for RGB, 3 for grey."""
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """elu([x, -x]) along channels (Salimans et al. 2017, Sec. 2.6). (B, F) -> (B, 2F)."""
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Conv2d):
    """Sees the kh rows up to and including the current one, centred horizontally (Salimans
    et al. 2017, Sec. 2.5, the "up" stream u). Same size for stride 1, ceil(H/2) for stride 2."""

    def __init__(self, c_in: int, c_out: int, kernel_size=(2, 3), stride: int = 1):
        super().__init__(c_in, c_out, kernel_size, stride)
        kh, kw = kernel_size
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Conv2d):
    """Sees the kh x kw block ending at the current pixel (the "up-left" stream ul)."""

    def __init__(self, c_in: int, c_out: int, kernel_size=(2, 2), stride: int = 1):
        super().__init__(c_in, c_out, kernel_size, stride)
        kh, kw = kernel_size
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class ShiftedDeconv2d(nn.ConvTranspose2d):
    """Stride-2 transposed convolution cropped so that output row r (column c) comes from input
    row r // 2 (columns near c // 2) only: kernel (2, 3) centred for u, (2, 2) for ul."""

    def __init__(self, c_in: int, c_out: int, kernel_size=(2, 3)):
        super().__init__(c_in, c_out, kernel_size, stride=2)
        self.left = (kernel_size[1] - 1) // 2

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        out = super().forward(x)
        return out[:, :, : size[0], self.left : self.left + size[1]]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) +
    nin(concat_elu(aux))))) + class bias (Salimans et al. 2017, Sec. 2.6; gated as in
    van den Oord et al. 2016b). (B, F, H, W) -> (B, F, H, W)."""

    def __init__(self, hidden: int, conv: type, aux_channels: int, dropout: float,
                 num_classes: int):  # fmt: skip
        super().__init__()
        self.conv1 = conv(2 * hidden, hidden)
        self.aux = nn.Conv2d(2 * aux_channels, hidden, 1) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(2 * hidden, 2 * hidden)
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)  # small residual branches at init (their init_scale)
        self.embed = nn.Embedding(num_classes, 2 * hidden) if num_classes else None

    def forward(self, x, aux=None, y=None) -> torch.Tensor:
        c = self.conv1(concat_elu(x))
        if aux is not None:
            c = c + self.aux(concat_elu(aux))
        c = self.conv2(self.dropout(concat_elu(c)))
        a, b = (c + class_biases(self.embed, y, 1)[0]).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNPlusPlus(nn.Module):
    """PixelCNN++ (Salimans et al. 2017): down-shifted and down-right-shifted convolutions
    (Sec. 2.5) instead of masks, gated resnets with concat_elu, dropout (Sec. 2.6), a pass down
    in resolution over ``num_scales`` scales (stride-2 convolutions) and a pass back up
    (transposed convolutions) with short-cuts from the first to the second (Sec. 2.4), and a
    discretised mixture of logistics per pixel (Sec. 2.1-2.2).

    x (B, C, H, W) in [-1, 1], y (B,) labels -> parameters (B, P, H, W), P =
    ``mix_logistic_num_params(C, num_mixtures)`` (10 * num_mixtures for RGB), read by
    ``genlab.discrete.discretized_mix_logistic_nll``. Pixel i's parameters depend on
    pixels before i only; the RGB dependence inside a pixel is the likelihood's linear term.
    Odd sizes work (28 -> 14 -> 7); class conditioning is a per-class bias in every resnet.
    """

    output = "logistic_mixture"

    def __init__(
        self,
        channels: int,
        hidden: int = 80,
        num_resnets: int = 3,
        num_mixtures: int = 10,
        dropout: float = 0.5,
        num_classes: int = 0,
        num_scales: int = 3,
    ):
        super().__init__()
        self.channels, self.num_classes, self.num_mixtures = channels, num_classes, num_mixtures
        c_in = channels + 1  # + a plane of ones, which tells the zero padding from the image
        self.u_in = DownShiftedConv2d(c_in, hidden, (2, 3))
        self.ul_in_up = DownShiftedConv2d(c_in, hidden, (1, 3))
        self.ul_in_left = DownRightShiftedConv2d(c_in, hidden, (2, 1))

        def resnets(conv: type, aux: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(
                GatedResnet(hidden, conv, aux, dropout, num_classes) for _ in range(n)
            )

        u, ul, n = DownShiftedConv2d, DownRightShiftedConv2d, num_resnets
        scales = range(num_scales)
        self.up_u = nn.ModuleList(resnets(u, 0, n) for _ in scales)
        self.up_ul = nn.ModuleList(resnets(ul, hidden, n) for _ in scales)
        m = [n + (s < num_scales - 1) for s in scales]  # the lowest scale pops one skip less
        self.down_u = nn.ModuleList(resnets(u, hidden, m[s]) for s in scales)
        self.down_ul = nn.ModuleList(resnets(ul, 2 * hidden, m[s]) for s in scales)
        self.shrink_u = nn.ModuleList(u(hidden, hidden, (2, 3), 2) for _ in scales[1:])
        self.shrink_ul = nn.ModuleList(ul(hidden, hidden, (2, 2), 2) for _ in scales[1:])
        self.grow_u = nn.ModuleList(ShiftedDeconv2d(hidden, hidden, (2, 3)) for _ in scales[1:])
        self.grow_ul = nn.ModuleList(ShiftedDeconv2d(hidden, hidden, (2, 2)) for _ in scales[1:])
        self.out = nn.Conv2d(hidden, mix_logistic_num_params(channels, num_mixtures), 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and y is None:
            raise ValueError("a class-conditional net needs labels y")
        y = y if self.num_classes else None
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        us = [down_shift(self.u_in(x))]  # rows above
        uls = [down_shift(self.ul_in_up(x)) + F.pad(self.ul_in_left(x), (1, 0))[..., :-1]]
        for s in range(len(self.up_u)):  # first pass: down in resolution
            if s > 0:
                us.append(self.shrink_u[s - 1](us[-1]))
                uls.append(self.shrink_ul[s - 1](uls[-1]))
            for res_u, res_ul in zip(self.up_u[s], self.up_ul[s]):
                us.append(res_u(us[-1], y=y))
                uls.append(res_ul(uls[-1], us[-1], y=y))
        u, ul = us.pop(), uls.pop()
        for s in reversed(range(len(self.down_u))):  # second pass: back up, with short-cuts
            for res_u, res_ul in zip(self.down_u[s], self.down_ul[s]):
                u = res_u(u, us.pop(), y=y)
                ul = res_ul(ul, torch.cat([u, uls.pop()], dim=1), y=y)
            if s > 0:
                u = self.grow_u[s - 1](u, us[-1].shape[-2:])
                ul = self.grow_ul[s - 1](ul, uls[-1].shape[-2:])
        return self.out(F.elu(ul))
