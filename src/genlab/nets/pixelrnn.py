"""PixelRNN: the Row LSTM and the Diagonal BiLSTM (van den Oord et al. 2016, "Pixel Recurrent
Neural Networks", Sec. 3.1-3.3).

Both layers split an LSTM into an input-to-state part, a masked convolution computed for the
whole map at once (which carries the RGB ordering, Sec. 3.4), and a state-to-state part, an
unmasked convolution over the previous row (Row LSTM) or the previous column of the skewed
map (Diagonal BiLSTM) computed step by step. The states of the previous row / column belong
to pixels that are already known, so only the input-to-state convolution needs a mask. The
gates are Eq. 3:

    [o, f, i, g] = [sigmoid, sigmoid, sigmoid, tanh](K_ss * h_{i-1} + K_is * x_i)
    c_i = f * c_{i-1} + i * g,     h_i = o * tanh(c_i).

``PixelRNN`` stacks a 7x7 mask-A convolution, LSTM layers with residual connections
(Sec. 3.3) and two 1x1 mask-B convolutions to a 256-way softmax per channel (Table 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.pixelcnn import (
    MaskedConv2d,
    categorical_head,
    categorical_logits,
    class_biases,
    down_shift,
)

__all__ = ["RowLSTM", "DiagonalLSTM", "DiagonalBiLSTM", "PixelRNN", "skew", "unskew"]


def lstm_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activations (B, 4h, ...) and the cell (B, h, ...) (Eq. 3).
    -> (hidden, cell), each (B, h, ...)."""
    o, f, i, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class RowLSTM(nn.Module):
    """Row LSTM (Sec. 3.1): processes the map one row at a time from top to bottom.

    Input-to-state: a 1 x k convolution along the row, masked (mask B) so that pixel j sees the
    input at pixels j - k//2 .. j of its row (and, at j itself, only the RGB groups up to its
    own), computed for the whole map at once. State-to-state: a 1D convolution of size k over
    the previous row's hidden state, which gives the triangular receptive field above the pixel.
    (B, in_channels, H, W) -> (B, hidden, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, data_channels: int = 1,
                 kernel_size: int = 3):  # fmt: skip
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv2d(
            in_channels, 4 * hidden, (1, kernel_size), "B", data_channels, out_parts=4
        )
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates_in = self.input_to_state(x)  # (B, 4h, H, W)
        b, _, height, width = x.shape
        h = c = x.new_zeros(b, self.hidden, width)
        rows = []
        for i in range(height):
            h, c = lstm_step(gates_in[:, :, i] + self.state_to_state(h), c)
            rows.append(h)
        return torch.stack(rows, dim=2)


def skew(x: torch.Tensor) -> torch.Tensor:
    """Shift row i right by i (Sec. 3.2, Fig. 3): (B, F, H, W) -> (B, F, H, W + H - 1), so
    that the pixel above (i - 1, j) and the pixel left (i, j - 1) of (i, j) both sit in the
    column left of it."""
    height = x.shape[2]
    return torch.stack([F.pad(x[:, :, i], (i, height - 1 - i)) for i in range(height)], dim=2)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of ``skew``: (B, F, H, W + H - 1) -> (B, F, H, width)."""
    return torch.stack([x[:, :, i, i : i + width] for i in range(x.shape[2])], dim=2)


class DiagonalLSTM(nn.Module):
    """One direction of the Diagonal BiLSTM (Sec. 3.2): on the skewed map, a 1x1 mask-B
    input-to-state convolution and a column-by-column LSTM whose state-to-state convolution is
    2 x 1 (rows i - 1 and i of the previous column, i.e. the pixels above and to the left).
    Its receptive field is the whole quadrant above and left. (B, in, H, W) -> (B, h, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, data_channels: int = 1):
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv2d(
            in_channels, 4 * hidden, 1, "B", data_channels, out_parts=4
        )  # 1x1, so computing it before skewing is the same
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        gates_in = skew(self.input_to_state(x))  # (B, 4h, H, W + H - 1)
        h = c = x.new_zeros(b, self.hidden, height)
        columns = []
        for t in range(gates_in.shape[3]):
            gates = gates_in[:, :, :, t] + self.state_to_state(F.pad(h, (1, 0)))
            h, c = lstm_step(gates, c)
            columns.append(h)
        return unskew(torch.stack(columns, dim=3), width)


class DiagonalBiLSTM(nn.Module):
    """Diagonal BiLSTM (Sec. 3.2): a left-to-right ``DiagonalLSTM`` plus a right-to-left one
    (the same layer run on the mirrored map, its output mirrored back). The right-to-left
    output at (i, j) has seen pixels to the right in row i, so it is shifted down one row
    before the two are added: each output then sees the rows above in full and its own row up
    to itself, without a blind spot. (B, in, H, W) -> (B, h, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, data_channels: int = 1):
        super().__init__()
        self.left_to_right = DiagonalLSTM(in_channels, hidden, data_channels)
        self.right_to_left = DiagonalLSTM(in_channels, hidden, data_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mirrored = self.right_to_left(x.flip(3)).flip(3)
        return self.left_to_right(x) + down_shift(mirrored)


class PixelRNN(nn.Module):
    """PixelRNN (Sec. 3, Table 4): a 7x7 mask-A convolution to 2h features, ``num_layers``
    Row LSTM or Diagonal BiLSTM layers of h states, each followed by a 1x1 mask-B convolution
    back to 2h features added to its input (the residual connections of Sec. 3.3, Fig. 5),
    then ReLU and two 1x1 mask-B convolutions to a 256-way softmax per channel.

    x (B, C, H, W) in [-1, 1], y (B,) labels -> logits (B, 256, C, H, W). With ``num_classes``
    > 0 a learned per-class bias is added to the input of every LSTM layer. ``num_values`` and
    ``in_channels`` as for ``PixelCNN`` (a prior over VQ-VAE codes).
    """

    output = "categorical"

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        num_layers: int = 2,
        kind: str = "row",
        out_hidden: int = 128,
        num_classes: int = 0,
        num_values: int = 256,
        in_channels: int | None = None,
    ):
        super().__init__()
        if kind not in ("row", "diagonal"):
            raise ValueError(f"kind must be 'row' or 'diagonal', got {kind!r}")
        self.channels, self.num_classes, self.num_layers, self.kind = (
            channels, num_classes, num_layers, kind,
        )  # fmt: skip
        layer = RowLSTM if kind == "row" else DiagonalBiLSTM
        self.num_values = num_values
        self.conv_in = MaskedConv2d(in_channels or channels, 2 * hidden, 7, "A", channels)
        self.lstms = nn.ModuleList(layer(2 * hidden, hidden, channels) for _ in range(num_layers))
        self.ups = nn.ModuleList(
            MaskedConv2d(hidden, 2 * hidden, 1, "B", channels) for _ in range(num_layers)
        )
        self.embed = nn.Embedding(num_classes, 2 * hidden * num_layers) if num_classes else None
        self.head = categorical_head(2 * hidden, out_hidden, channels, num_values)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(x)
        for lstm, up, bias in zip(
            self.lstms, self.ups, class_biases(self.embed, y, self.num_layers)
        ):
            h = h + bias
            h = h + up(lstm(h))
        return categorical_logits(self.head(h), self.channels, self.num_values)
