"""Cached sampling for the convolutional autoregressive networks (after Ramachandran et al.
2017, "Fast Generation for Convolutional Autoregressive Models").

Sampling pixel by pixel with the plain network recomputes every activation of the image for
each new value. But a causal network's activation at pixel (i, j) depends only on earlier
pixels, so once computed it never changes: these samplers keep every layer's activation maps
and compute, for each new pixel, only that pixel's activations in every layer, reading the
k x k neighbourhoods they need from the caches. The arithmetic is the network's own (the same
masked weights, biases and padding), so the samples equal the plain sampler's.

A sampler has ``reset(x, y)`` (empty caches for a batch of images x being sampled, labels y),
``step(x, i, j)`` (the network's output at pixel (i, j) given the current x: logits
(B, V, C), V = 256 values or K codes; for PixelCNN++ the mixture parameters (B, P)) and
``end_row(x, i)`` (row i is complete). For RGB softmax models ``step`` is called once per
channel, after the earlier channels of the pixel are written into x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.pixelcnn import (
    GatedPixelCNN,
    PixelCNN,
    PixelCNNPlusPlus,
    class_biases,
    concat_elu,
    gate,
)
from genlab.nets.pixelrnn import PixelRNN
from genlab.nets.pixelrnn_cached import CachedPixelRNN
from genlab.nets.transformer_ar import CachedImageGPT, ImageGPT


class _Conv:
    """A (masked) convolution applied at one position: weights flattened once."""

    def __init__(self, conv: nn.Conv2d):
        w = conv.weight * conv.mask if hasattr(conv, "mask") else conv.weight
        self.kh, self.kw = w.shape[-2:]
        self.weight = w.flatten(1)  # (out, in * kh * kw)
        self.bias = conv.bias

    def window(self, win: torch.Tensor) -> torch.Tensor:
        """win (B, in, kh, kw) -> (B, out)."""
        return F.linear(win.flatten(1), self.weight, self.bias)

    def rows(self, slab: torch.Tensor) -> torch.Tensor:
        """A padded slab (B, in, kh, W + kw - 1) -> one output row (B, out, W)."""
        w = self.weight.view(-1, slab.shape[1], self.kh, self.kw)
        return F.conv2d(slab, w, self.bias)[:, :, 0]


def _padded(b: int, c: int, h: int, w: int, pad: tuple[int, int, int, int], like) -> torch.Tensor:
    left, right, top, bottom = pad
    return like.new_zeros(b, c, h + top + bottom, w + left + right)


def _vec(bias) -> torch.Tensor | float:
    return bias[:, :, 0, 0] if torch.is_tensor(bias) else bias


class CachedPixelCNN:
    """For ``PixelCNN``: caches the (padded) image and, per residual block, the input of its
    3x3 masked convolution; everything else in the network is pointwise."""

    def __init__(self, net: PixelCNN):
        self.net = net
        self.conv_in = _Conv(net.conv_in)
        self.blocks = [
            (_Conv(b.block[1]), _Conv(b.block[3]), _Conv(b.block[5])) for b in net.blocks
        ]
        self.head = [_Conv(net.head[1]), _Conv(net.head[3])]

    def reset(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        b, c, h, w = x.shape
        self.pad_in = self.net.conv_in.pad
        self.x = _padded(b, c, h, w, self.pad_in, x)
        half = self.blocks[0][1].weight.shape[0] if self.blocks else 0
        self.mid = [_padded(b, half, h, w, (1, 1, 1, 1), x) for _ in self.blocks]
        self.bias = [_vec(t) for t in class_biases(self.net.embed, y, len(self.blocks) + 1)]

    def step(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        left, _, top, _ = self.pad_in
        self.x[:, :, i + top, left : left + x.shape[3]] = x[:, :, i]
        k = self.conv_in
        h = k.window(self.x[:, :, i : i + k.kh, j : j + k.kw]) + self.bias[0]
        for (a, mid, out), cache, bias in zip(self.blocks, self.mid, self.bias[1:]):
            h = h + bias
            cache[:, :, i + 1, j + 1] = F.relu(a.window(F.relu(h)[:, :, None, None]))
            m = F.relu(mid.window(cache[:, :, i : i + 3, j : j + 3]))
            h = h + out.window(m[:, :, None, None])
        z = F.relu(self.head[0].window(F.relu(h)[:, :, None, None]))
        out = self.head[1].window(z[:, :, None, None])
        return out.view(-1, self.net.channels, self.net.num_values).transpose(1, 2)

    def end_row(self, x: torch.Tensor, i: int) -> None:
        left, _, top, _ = self.pad_in  # the row's last pixel was drawn after its last step
        self.x[:, :, i + top, left : left + x.shape[3]] = x[:, :, i]


class CachedGatedPixelCNN:
    """For ``GatedPixelCNN``: the vertical stack is computed a row at a time when a row is
    complete (it sees the whole current row, and feeds the horizontal stack only through the
    row below); the horizontal stack pixel by pixel from per-layer caches of the current row."""

    def __init__(self, net: GatedPixelCNN):
        self.net = net
        self.layers = [
            (
                _Conv(layer.v_conv),
                _Conv(layer.v_to_h),
                _Conv(layer.h_conv),
                _Conv(layer.h_out),
                layer,
            )
            for layer in net.layers
        ]
        self.head = [_Conv(net.head[1]), _Conv(net.head[3])]

    def reset(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        b, c, h, w = x.shape
        self.width = w
        self.bias = [_vec(t) for t in class_biases(self.net.embed, y, len(self.layers))]
        self.v_in = []  # per layer: its vertical input, padded as its v_conv needs
        self.link = []  # per layer: v_to_h of the row above's v_pre, (B, 2F, W)
        for idx, (_, v_to_h, _, _, layer) in enumerate(self.layers):
            c_in = c if idx == 0 else layer.h_out.weight.shape[0]
            self.v_in.append(_padded(b, c_in, h, w, layer.v_pad, x))
            zeros = x.new_zeros(b, v_to_h.weight.shape[1], 1, w)
            self.link.append(v_to_h.rows(zeros))
        self._new_row(x)

    def _new_row(self, x: torch.Tensor) -> None:
        b, c = x.shape[:2]
        self.h_in = []  # per layer: its horizontal input on the current row, left-padded
        for idx, (*_, layer) in enumerate(self.layers):
            c_in = c if idx == 0 else layer.h_out.weight.shape[0]
            left = layer.h_conv.pad[0]
            self.h_in.append(x.new_zeros(b, c_in, 1, self.width + left))

    def step(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        first = self.layers[0][4].h_conv.pad[0]
        self.h_in[0][:, :, 0, first:] = x[:, :, i]
        h = None
        for idx, (_, _, h_conv, h_out, layer) in enumerate(self.layers):
            left = layer.h_conv.pad[0]
            win = self.h_in[idx][:, :, :, j : j + left + 1]
            pre = h_conv.window(win) + self.link[idx][:, :, j] + self.bias[idx]
            h_new = h_out.window(gate(pre[:, :, None, None]))
            h_prev = self.h_in[idx][:, :, 0, j + left]
            h = h_prev + h_new if layer.residual else h_new
            if idx + 1 < len(self.layers):
                nxt = self.layers[idx + 1][4].h_conv.pad[0]
                self.h_in[idx + 1][:, :, 0, j + nxt] = h
        z = F.relu(self.head[0].window(F.relu(h)[:, :, None, None]))
        out = self.head[1].window(z[:, :, None, None])
        return out.view(-1, self.net.channels, self.net.num_values).transpose(1, 2)

    def end_row(self, x: torch.Tensor, i: int) -> None:
        """Row i is complete: compute the vertical stack on it for every layer."""
        for idx, (v_conv, v_to_h, _, _, layer) in enumerate(self.layers):
            left, _, top, _ = layer.v_pad
            cache = self.v_in[idx]
            if idx == 0:
                cache[:, :, i + top, left : left + self.width] = x[:, :, i]
            v_pre = v_conv.rows(cache[:, :, i : i + v_conv.kh])  # (B, 2F, W)
            self.link[idx] = v_to_h.rows(v_pre[:, :, None])
            if idx + 1 < len(self.layers):
                nxt = self.layers[idx + 1][4]
                l2, _, t2, _ = nxt.v_pad
                v = gate(v_pre[:, :, :, None] + _bias4(self.bias[idx]))[..., 0]
                self.v_in[idx + 1][:, :, i + t2, l2 : l2 + self.width] = v
        self._new_row(x)


def _bias4(bias):
    return bias[:, :, None, None] if torch.is_tensor(bias) else bias


class _Map:
    """One PixelCNN++ activation map (B, C, h, w), kept zero-padded by one column on each side
    and one row on top (the most any of its convolutions pads), written a row or a pixel at a
    time. A position is a row ``(r, None)`` -- values (B, C, w) -- or a pixel ``(r, c)``."""

    def __init__(self, like: torch.Tensor, b: int, c: int, h: int, w: int):
        self.t = like.new_zeros(b, c, h + 1, w + 2)
        self.w = w

    def get(self, r: int, c: int | None) -> torch.Tensor:
        return self.t[:, :, r + 1, 1 : 1 + self.w] if c is None else self.t[:, :, r + 1, c + 1]

    def set(self, r: int, c: int | None, v: torch.Tensor) -> None:
        if c is None:
            self.t[:, :, r + 1, 1 : 1 + self.w] = v
        else:
            self.t[:, :, r + 1, c + 1] = v

    def conv(self, conv: nn.Conv2d, r: int, c: int | None, elu: bool = True) -> torch.Tensor:
        """A shifted convolution of PixelCNN++ (its ``pad`` and stride) on concat_elu of this
        map (``elu``) or on the map itself, at output row r or output pixel (r, c)."""
        left, right, top, _ = conv.pad
        kh, kw = conv.kernel_size
        s = conv.stride[0]
        r0 = s * r - top + 1
        if c is None:
            slab = self.t[:, :, r0 : r0 + kh, 1 - left : 1 + self.w + right]
            slab = concat_elu(slab) if elu else slab
            return F.conv2d(slab, conv.weight, conv.bias, stride=conv.stride)[:, :, 0]
        c0 = s * c - left + 1
        win = self.t[:, :, r0 : r0 + kh, c0 : c0 + kw]
        win = concat_elu(win) if elu else win
        return F.linear(win.flatten(1), conv.weight.flatten(1), conv.bias)


def _nin(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on a pixel (B, C) or a row (B, C, w)."""
    w = conv.weight[:, :, 0, 0]
    if v.dim() == 2:
        return F.linear(v, w, conv.bias)
    return F.conv1d(v, w[:, :, None], conv.bias)


def _deconv(deconv, src: _Map, r: int, c: int | None, width: int = 0) -> torch.Tensor:
    """``ShiftedDeconv2d`` (cropped to ``width`` columns) at output row r or pixel (r, c):
    output row r comes from input row r // 2 alone (kernel row r % 2); output column c from
    input columns (c + left - k) / 2 for the kernel columns k of the right parity."""
    kr = r % 2
    if c is None:
        v = src.get(r // 2, None)[:, :, None]  # (B, C, 1, w_in)
        full = F.conv_transpose2d(v, deconv.weight, deconv.bias, stride=2)
        return full[:, :, kr, deconv.left : deconv.left + width]
    out = deconv.bias
    for kc in range(deconv.kernel_size[1]):
        col = c + deconv.left - kc
        if col % 2 == 0 and 0 <= col // 2 < src.w:
            out = out + src.get(r // 2, col // 2) @ deconv.weight[:, :, kr, kc]
    return out


class CachedPixelCNNPlusPlus:
    """For ``PixelCNNPlusPlus``. Its up stream u sees only rows above, so every u map -- the
    pass down in resolution and the pass back up, at every scale -- is computed a whole row
    at a time once the image row above is complete (scale s's row r at image row r * 2^s).
    The up-left stream ul is computed a pixel at a time: at image pixel (i, j), position
    (i / 2^s, j / 2^s) of every scale s that divides both, first going down in resolution,
    then coming back up (as in Ramachandran et al.'s fast PixelCNN++, which keeps one cache
    per layer and scale). Every map is kept whole, so each convolution reads its window from
    it; the weights, paddings and order of operations are the network's own."""

    def __init__(self, net: PixelCNNPlusPlus):
        self.net = net
        self.scales = len(net.up_u)

    def reset(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        net, b, c = self.net, x.shape[0], x.shape[1]
        sizes = [tuple(x.shape[2:])]
        for _ in range(1, self.scales):
            sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
        self.sizes = sizes
        hidden = net.u_in.out_channels
        y = y if net.num_classes else None

        def maps(s: int, n: int) -> list[_Map]:
            return [_Map(x, b, hidden, *sizes[s]) for _ in range(n)]

        def bias(res) -> torch.Tensor | float:
            return res.embed(y) if res.embed is not None else 0.0

        self.x = _Map(x, b, c + 1, *sizes[0])
        self.x.t[:, c, 1:, 1:-1] = 1  # the plane of ones
        n = len(net.up_u[0])
        # up pass: per scale, the input map then each resnet's output (the skips); per resnet
        # also its inner map (the input of its second convolution)
        self.up = {k: [maps(s, n + 1) for s in range(self.scales)] for k in ("u", "ul")}
        self.up_mid = {k: [maps(s, n) for s in range(self.scales)] for k in ("u", "ul")}
        self.down, self.down_mid = {}, {}
        for k in ("u", "ul"):
            self.down[k], self.down_mid[k] = [], []
            for s in range(self.scales):
                m = len(net.down_u[s])
                start = self.up[k][s][-1] if s == self.scales - 1 else maps(s, 1)[0]
                self.down[k].append([start, *maps(s, m)])
                self.down_mid[k].append(maps(s, m))
        self.bias = {
            name: [[bias(res) for res in scale] for scale in getattr(net, name)]
            for name in ("up_u", "up_ul", "down_u", "down_ul")
        }
        self._u_rows(0)

    def _top(self, *coords: int) -> int:
        """The coarsest scale whose grid has a position at these image coordinates."""
        s = 0
        while s + 1 < self.scales and all(v % 2 ** (s + 1) == 0 for v in coords):
            s += 1
        return s

    @staticmethod
    def _resnet(res, src: _Map, mid: _Map, dst: _Map, r, c, aux, bias) -> None:
        """``GatedResnet`` at one position: src -> dst, its inner activation kept in mid."""
        h = src.conv(res.conv1, r, c)
        if aux is not None:
            h = h + _nin(res.aux, concat_elu(aux))
        mid.set(r, c, h)
        h = mid.conv(res.conv2, r, c)
        if torch.is_tensor(bias) and c is None:
            bias = bias[:, :, None]
        a, g = (h + bias).chunk(2, dim=1)
        dst.set(r, c, src.get(r, c) + a * torch.sigmoid(g))

    def _stream(self, k: str, s: int, r: int, c: int | None, up: bool) -> None:
        """Stream k's resnets of one pass at scale s, position (r, c); the pass's input map
        at that position must be set."""
        net = self.net
        last = s == self.scales - 1
        if up:
            res_list, maps, mids = getattr(net, f"up_{k}")[s], self.up[k][s], self.up_mid[k][s]
        else:
            res_list = getattr(net, f"down_{k}")[s]
            maps, mids = self.down[k][s], self.down_mid[k][s]
        biases = self.bias[f"{'up' if up else 'down'}_{k}"][s]
        skips = self.up[k][s][: len(self.up[k][s]) - last]  # popped last-first going down
        for idx, res in enumerate(res_list):
            if k == "u":
                aux = None if up else skips[-1 - idx].get(r, c)
            elif up:
                aux = self.up["u"][s][idx + 1].get(r, c)
            else:
                u = self.down["u"][s][idx + 1].get(r, c)
                aux = torch.cat([u, skips[-1 - idx].get(r, c)], dim=1)
            self._resnet(res, maps[idx], mids[idx], maps[idx + 1], r, c, aux, biases[idx])

    def _u_rows(self, i: int) -> None:
        """Image rows < i are complete: the u stream's rows that this makes computable."""
        net, top = self.net, self._top(i)
        for s in range(top + 1):
            r = i >> s
            if s == 0:  # down_shift(u_in(x)): row r is u_in's row r - 1, zeros on top
                if r > 0:
                    self.up["u"][0][0].set(r, None, self.x.conv(net.u_in, r - 1, None, False))
            else:
                v = self.up["u"][s - 1][-1].conv(net.shrink_u[s - 1], r, None, elu=False)
                self.up["u"][s][0].set(r, None, v)
            self._stream("u", s, r, None, up=True)
        for s in reversed(range(top + 1)):
            r = i >> s
            if s < self.scales - 1:
                v = _deconv(net.grow_u[s], self.down["u"][s + 1][-1], r, None, self.sizes[s][1])
                self.down["u"][s][0].set(r, None, v)
            self._stream("u", s, r, None, up=False)

    def step(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        net = self.net
        self._write(x, i)
        top = self._top(i, j)
        for s in range(top + 1):
            r, c = i >> s, j >> s
            if s == 0:  # down_shift(ul_in_up(x)) + right_shift(ul_in_left(x))
                v = 0.0
                if i > 0:
                    v = v + self.x.conv(net.ul_in_up, i - 1, j, elu=False)
                if j > 0:
                    v = v + self.x.conv(net.ul_in_left, i, j - 1, elu=False)
                self.up["ul"][0][0].set(i, j, v)
            else:
                v = self.up["ul"][s - 1][-1].conv(net.shrink_ul[s - 1], r, c, elu=False)
                self.up["ul"][s][0].set(r, c, v)
            self._stream("ul", s, r, c, up=True)
        for s in reversed(range(top + 1)):
            r, c = i >> s, j >> s
            if s < self.scales - 1:
                v = _deconv(net.grow_ul[s], self.down["ul"][s + 1][-1], r, c)
                self.down["ul"][s][0].set(r, c, v)
            self._stream("ul", s, r, c, up=False)
        return _nin(net.out, F.elu(self.down["ul"][0][-1].get(i, j)))

    def _write(self, x: torch.Tensor, i: int) -> None:
        self.x.t[:, : x.shape[1], i + 1, 1:-1] = x[:, :, i]  # the ones plane stays

    def end_row(self, x: torch.Tensor, i: int) -> None:
        self._write(x, i)
        if i + 1 < self.sizes[0][0]:
            self._u_rows(i + 1)


SAMPLERS = {
    PixelCNN: CachedPixelCNN,
    GatedPixelCNN: CachedGatedPixelCNN,
    PixelCNNPlusPlus: CachedPixelCNNPlusPlus,
    PixelRNN: CachedPixelRNN,  # Row LSTM and Diagonal BiLSTM (pixelrnn_cached.py)
    ImageGPT: CachedImageGPT,  # a KV cache (transformer_ar.py)
}


def has_cached_sampler(net: nn.Module) -> bool:
    return type(net) in SAMPLERS


def cached_sampler(net: nn.Module):
    """The cached sampler for ``net``, or None where there is none (the plain sampler runs)."""
    sampler = SAMPLERS.get(type(net))
    return None if sampler is None else sampler(net)
