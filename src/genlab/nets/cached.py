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
(B, V, C), V = 256 values or K codes) and ``end_row(x, i)`` (row i is complete). For RGB
softmax models ``step`` is called once per channel, after the earlier channels of the pixel
are written into x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.pixelcnn import GatedPixelCNN, PixelCNN, class_biases, gate


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


SAMPLERS = {PixelCNN: CachedPixelCNN, GatedPixelCNN: CachedGatedPixelCNN}


def has_cached_sampler(net: nn.Module) -> bool:
    return type(net) in SAMPLERS


def cached_sampler(net: nn.Module):
    """The cached sampler for ``net``, or None where there is none (the plain sampler runs)."""
    sampler = SAMPLERS.get(type(net))
    return None if sampler is None else sampler(net)
