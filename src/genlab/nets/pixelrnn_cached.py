"""Incremental sampling for PixelRNN (van den Oord et al. 2016, "Pixel Recurrent Neural
Networks", Sec. 3.1-3.4), with the interface of ``genlab.nets.cached``: ``reset(x, y)``,
``step(x, i, j) -> logits (B, V, C)`` (once per RGB channel) and ``end_row(x, i)``.

The plain sampler runs the whole network for every value: H * W * C passes over H * W
pixels. Both PixelRNN layers are in fact causal recurrences that can be run in raster
order, so every state is computed once, when it becomes computable, and kept.

**Outside the LSTM layers** everything is per pixel: the 7x7 mask-A convolution reads the
3 rows above and the row so far (a padded copy of the image, written a row at a time); the
class bias, the residual connections and the 1x1 mask-B convolutions (``ups`` and the head,
Sec. 3.3, Table 4) act on the pixel alone. So pixel (i, j) of layer l's input depends on
layer l - 1's output at (i, j) only, and a step computes the pixel in every layer in turn.

**Row LSTM** (Sec. 3.1, Eq. 3). Row i's gates are K_is * x_i + K_ss * h_{i-1}: the input
part at column j is a 1 x k mask-B convolution of the layer's input on row i, columns
j - k//2 .. j (later columns are masked); the state part is a convolution of the *whole* row
i - 1, known once that row is done. h_i and c_i at column j then need only c_{i-1} at j. So
``end_row(i - 1)`` computes K_ss * h_{i-1} for the row (the network's own Conv1d), and a
step computes, per layer, the input part at (i, j) from a cache of the row's layer input, the
LSTM update at column j, and keeps h_i, c_i at j. Per pixel and layer:
(k//2 + 1) * 2h * 4h + k * h * 4h + 2h * h multiply-adds, no recomputation.

**Diagonal BiLSTM** (Sec. 3.2, Fig. 3). On the skewed map (row i shifted right by i), the
state-to-state 2 x 1 convolution at skewed column t reads rows i - 1 and i of column t - 1,
which are the original pixels (i - 1, j) (above) and (i, j - 1) (left), with c from
(i, j - 1). So the left-to-right direction is the 2D recurrence

    L(i, j) = LSTM(K_is x(i, j) + K_ss [L(i - 1, j), L(i, j - 1)], c(i, j - 1))

computable pixel by pixel in raster order. Its boundary: L(-1, j) = 0 (the zero padding of
the column), and L(i, -1), c(i, -1) are the states at skewed column i - 1 of row i, where
the skewed input is zero padding: they depend only on the padding above-left of them, so they
are constants of the weights (``_padding_states``, computed once per ``reset``; zero for
row 0). Positions right of the image in the skewed map never feed back into it.

The right-to-left direction is the same recurrence on the mirrored image, so R(i, j)
depends on rows <= i and, in row i, on the columns >= j: on pixels not yet drawn. But the
network adds it *shifted down one row* (Sec. 3.2): pixel (i, j) of the layer output is
L(i, j) + R(i - 1, j), and R(i - 1, .) is final as soon as row i - 1 of the layer's input
is. So ``end_row(i - 1)`` runs R's recurrence from right to left over row i - 1, for every
layer (their inputs on that row were kept by the steps), and a step reads R(i - 1, j).
Hence the fastest exact scheme is not a truncated recomputation of rows or diagonals: each
state of each direction is computed exactly once per image (the L part of the current pixel
again for each RGB sub-step), the same work as *one* forward pass. Per pixel and layer:
2 * (2h * 4h + 2h * 4h) + 2h * h multiply-adds.

**Cost** (multiply-adds per sampled value; preset h = 16, 2 layers, out_hidden 64, 28x28x1,
head 2h * 64 + 64 * 256 = 18432 per pixel). The plain sampler makes a pass per value: H * W
pixels at, for the Row LSTM, 1568 (7x7 conv) + 2 * 9728 (layers) + 18432 = 39456 each; for
the Diagonal BiLSTM each direction also runs its state-to-state part on the skewed padding,
H * (W + H - 1) = 1540 positions for 784 pixels, so 1568 + 2 * 12654 + 18432 = 45308. The
cached step computes one pixel: 896 + 2 * 7680 + 18432 = 34688 (Row; it skips masked taps)
and 896 + 2 * 8704 + 18432 = 36736 (Diagonal, with the row's right-to-left part). So the
saving is H * W times the ratio: 892x (Row), 967x (Diagonal) fewer operations; the per-batch
padding states (2 directions x 2 layers x (H - 1) columns at batch 1) are negligible. On a
CPU at batch 1 both are bound by their number of small operations instead: a plain pass is
2 layers x H row steps (Row) or 2 layers x 2 directions x (W + H - 1) = 55 column steps and
the skews (Diagonal), a cached step ~30 operations and a row end 2 x W (Diagonal);
``bench/pixelrnn_sampling.py`` measures the real speed-up.

**Exactness and RGB** (Sec. 3.4). A step at sub-step c is computed with channels < c of the
pixel written into x; features of RGB group g see channels < g of the pixel (mask A, then
mask B), so group c is exact, and the head's logits of channel c read groups <= c only. The
state kept at (i, j) is that of the last sub-step, in which every group is exact. The
arithmetic is the network's own (masked weights, biases, zero padding); only the summation
order of the per-pixel products differs (about 1e-16 relative in float64, 1e-7 in float32),
so the images equal the plain sampler's for the same uniforms (tests, in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.pixelcnn import class_biases
from genlab.nets.pixelrnn import DiagonalBiLSTM, DiagonalLSTM, PixelRNN, RowLSTM, lstm_step

__all__ = ["CachedPixelRNN"]


def _masked(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a (masked) convolution applies: (out, in, kh, kw)."""
    return conv.weight * conv.mask if hasattr(conv, "mask") else conv.weight


def _pointwise(conv: nn.Conv2d):
    """A 1x1 (masked) convolution at one pixel, its weight masked once: (B, in) -> (B, out)."""
    w, b = _masked(conv)[:, :, 0, 0], conv.bias
    return lambda v: F.linear(v, w, b)


def _padding_states(lstm: DiagonalLSTM, height: int, like: torch.Tensor) -> list:
    """The states (h, c), each (1, hidden), left of column 0 of every row, i.e. at skewed
    column i - 1 of row i, where the skewed input is zero padding (zeros for row 0).

    Runs the layer's column recurrence on zero input: at column t, rows > t are padding and
    depend only on rows > t - 1 of column t - 1 (padding too), so they come out as in the
    network, whatever the image; row t + 1 of column t is the state wanted for row t + 1."""
    h = c = like.new_zeros(1, lstm.hidden, height)
    zeros = like.new_zeros(1, lstm.hidden)
    states = [(zeros, zeros)]
    for t in range(height - 1):
        h, c = lstm_step(lstm.state_to_state(F.pad(h, (1, 0))), c)
        states.append((h[:, :, t + 1], c[:, :, t + 1]))
    return states


class _RowLayer:
    """One Row LSTM layer, advanced a pixel at a time (Sec. 3.1)."""

    def __init__(self, lstm: RowLSTM):
        self.lstm = lstm
        kw = lstm.input_to_state.kernel_size[1]
        self.p = kw // 2  # columns j - p .. j are visible (mask B)
        w = _masked(lstm.input_to_state)[:, :, 0, : self.p + 1]  # (4h, in, p + 1)
        self.w_in, self.b_in = w.flatten(1), lstm.input_to_state.bias

    def reset(self, x: torch.Tensor) -> None:
        b, _, _, width = x.shape
        n_in = self.w_in.shape[1] // (self.p + 1)
        self.row_in = x.new_zeros(b, n_in, width + self.p)  # the layer's input, left-padded
        states = [x.new_zeros(b, self.lstm.hidden, width) for _ in range(4)]
        self.h_prev, self.c_prev, self.h_cur, self.c_cur = states  # rows i - 1 and i
        self.from_above = self.lstm.state_to_state(self.h_prev)  # K_ss * h_{-1}: (B, 4h, W)

    def step(self, f: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Layer input f (B, 2h) at (i, j) -> hidden state h_i at column j (B, h)."""
        self.row_in[:, :, j + self.p] = f
        win = self.row_in[:, :, j : j + self.p + 1]  # (B, in, p + 1)
        gates = F.linear(win.flatten(1), self.w_in, self.b_in) + self.from_above[:, :, j]
        h, c = lstm_step(gates, self.c_prev[:, :, j])
        self.h_cur[:, :, j], self.c_cur[:, :, j] = h, c
        return h

    def end_row(self, i: int) -> None:
        """Row i is done: its states become the previous row's; K_ss * h_i for row i + 1."""
        self.h_prev, self.h_cur = self.h_cur, self.h_prev
        self.c_prev, self.c_cur = self.c_cur, self.c_prev
        self.from_above = self.lstm.state_to_state(self.h_prev)


class _Direction:
    """One direction of a Diagonal BiLSTM as the 2D recurrence of the module docstring."""

    def __init__(self, lstm: DiagonalLSTM):
        self.lstm = lstm
        self.w_in = _masked(lstm.input_to_state)[:, :, 0, 0]  # (4h, in)
        self.b_in = lstm.input_to_state.bias
        w = lstm.state_to_state.weight  # (4h, h, 2): tap 0 on the pixel above, 1 on the side
        self.w_ss = torch.cat([w[:, :, 0], w[:, :, 1]], dim=1)  # (4h, 2h) on [above, side]
        self.b_ss = lstm.state_to_state.bias

    def update(self, gates_in, above, side, c) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates' input part (B, 4h), states above and beside (B, h), cell beside (B, h)
        -> (h, c) at the pixel, each (B, h)."""
        gates = gates_in + F.linear(torch.cat([above, side], dim=1), self.w_ss, self.b_ss)
        return lstm_step(gates, c)


class _DiagonalLayer:
    """One Diagonal BiLSTM layer: left-to-right a pixel at a time, right-to-left a row at a
    time when the row is done (Sec. 3.2)."""

    def __init__(self, lstm: DiagonalBiLSTM):
        self.ltr = _Direction(lstm.left_to_right)
        self.rtl = _Direction(lstm.right_to_left)
        self.hidden = lstm.left_to_right.hidden

    def reset(self, x: torch.Tensor) -> None:
        b, _, height, width = x.shape
        self.pad_ltr = _padding_states(self.ltr.lstm, height, x)
        self.pad_rtl = _padding_states(self.rtl.lstm, height, x)
        self.row_in = x.new_zeros(b, self.ltr.w_in.shape[1], width)  # the layer's input, row i
        states = [x.new_zeros(b, self.hidden, width) for _ in range(4)]
        # L of rows i - 1 and i, L's cell on row i, R(i - 1, .) (zero for row 0: the shift)
        self.l_prev, self.l_cur, self.lc_cur, self.r_prev = states

    def step(self, f: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Layer input f (B, 2h) at (i, j) -> the layer output L(i, j) + R(i - 1, j) (B, h)."""
        self.row_in[:, :, j] = f
        if j == 0:
            side, c = (s.expand_as(f[:, : self.hidden]) for s in self.pad_ltr[i])
        else:
            side, c = self.l_cur[:, :, j - 1], self.lc_cur[:, :, j - 1]
        gates_in = F.linear(f, self.ltr.w_in, self.ltr.b_in)
        h, c = self.ltr.update(gates_in, self.l_prev[:, :, j], side, c)
        self.l_cur[:, :, j], self.lc_cur[:, :, j] = h, c
        return h + self.r_prev[:, :, j]

    def end_row(self, i: int) -> None:
        """Row i is done: R(i, .) from right to left over it (it enters row i + 1)."""
        width = self.row_in.shape[2]
        gates_in = F.linear(self.row_in.transpose(1, 2), self.rtl.w_in, self.rtl.b_in)
        r_row = torch.empty_like(self.r_prev)
        h, c = (s.expand_as(self.r_prev[:, :, 0]) for s in self.pad_rtl[i])
        for j in reversed(range(width)):
            h, c = self.rtl.update(gates_in[:, j], self.r_prev[:, :, j], h, c)
            r_row[:, :, j] = h
        self.r_prev = r_row
        self.l_prev, self.l_cur = self.l_cur, self.l_prev


class CachedPixelRNN:
    """For ``PixelRNN`` (Row LSTM or Diagonal BiLSTM layers): the padded image for the 7x7
    mask-A convolution and, per layer, the recurrent states of the rows the next pixel reads
    (module docstring). ``step`` never runs the network or a layer over the whole map.
    x (B, C_in, H, W) in [-1, 1] (or code embeddings), y (B,) labels or None."""

    def __init__(self, net: PixelRNN):
        self.net = net
        left, right, top, _ = net.conv_in.pad
        self.pad = (left, right, top)
        w = _masked(net.conv_in)[:, :, : top + 1]  # rows below the pixel are masked
        self.kh, self.kw = w.shape[-2:]
        self.w_in, self.b_in = w.flatten(1), net.conv_in.bias
        layer = _RowLayer if net.kind == "row" else _DiagonalLayer
        self.layers = [layer(lstm) for lstm in net.lstms]
        self.ups = [_pointwise(up) for up in net.ups]
        self.head = [_pointwise(net.head[1]), _pointwise(net.head[3])]

    def reset(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Empty caches for a batch x (B, C_in, H, W) being sampled, labels y (B,)."""
        b, c, height, width = x.shape
        left, right, top = self.pad
        self.x = x.new_zeros(b, c, height + top, width + left + right)
        biases = class_biases(self.net.embed, y, self.net.num_layers)
        self.bias = [t[:, :, 0, 0] if torch.is_tensor(t) else t for t in biases]
        for layer in self.layers:
            layer.reset(x)

    def _write(self, x: torch.Tensor, i: int) -> None:
        left, _, top = self.pad
        self.x[:, :, i + top, left : left + x.shape[3]] = x[:, :, i]

    def step(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The network's logits (B, V, C) at pixel (i, j), given the current x."""
        self._write(x, i)
        win = self.x[:, :, i : i + self.kh, j : j + self.kw]
        f = F.linear(win.flatten(1), self.w_in, self.b_in)  # (B, 2h)
        for layer, up, bias in zip(self.layers, self.ups, self.bias):
            f = f + bias
            f = f + up(layer.step(f, i, j))
        out = self.head[1](F.relu(self.head[0](F.relu(f))))  # (B, C * V), channel-major
        return out.view(-1, self.net.channels, self.net.num_values).transpose(1, 2)

    def end_row(self, x: torch.Tensor, i: int) -> None:
        """Row i of x is complete (its last value was drawn after its last step)."""
        self._write(x, i)
        for layer in self.layers:
            layer.end_row(i)
