"""Text conditioning for the denoising nets: the context a text encoder produces (per-token
features and their mask) and a wrapper that hands it to a net's cross-attention (``UNet`` /
``DiT`` with ``context_dim``), as Stable Diffusion conditions its UNet on the last hidden
states of CLIP's text transformer (Rombach et al. 2022, Sec. 3.3). The frozen encoder itself,
which loads open_clip weights, is ``genlab.families.text_encoder.TextEncoder``.

Plain ``nn.Module`` code: no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TextContext", "TextConditionedNet"]


@dataclass(frozen=True)
class TextContext:
    """Encoded captions: ``tokens`` (B, L, D) float features and ``mask`` (B, L) bool, True
    for a real token (start, words, end), False for padding. Sliced and moved like a tensor,
    so the denoising families pass it where they pass labels (``y[: x.shape[0]]``)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TextContext:
        return TextContext(self.tokens[index], self.mask[index])

    def to(self, device: torch.device | str) -> TextContext:
        return TextContext(self.tokens.to(device), self.mask.to(device))

    def expand(self, batch: int) -> TextContext:
        """A one-caption context repeated for ``batch`` samples (others unchanged)."""
        if len(self) != 1 or batch == 1:
            return self
        return TextContext(self.tokens.expand(batch, -1, -1), self.mask.expand(batch, -1))


class TextConditionedNet(nn.Module):
    """A denoising net called as the families call theirs, ``net(x, t, y)``, where y is a
    ``TextContext``: it becomes the wrapped net's ``context`` / ``context_mask`` (a
    one-caption context is repeated over the batch). The wrapped net (``UNet`` or ``DiT``)
    must have been built with ``context_dim`` = the encoder's width.

    x (B, C, H, W), t (B,), y ``TextContext`` (B or 1, L, context_dim) -> (B, C', H, W)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: TextContext | None = None
    ) -> torch.Tensor:
        if y is None:
            return self.net(x, t)
        if not isinstance(y, TextContext):
            raise TypeError(
                f"a text-conditioned net takes a TextContext as its condition, got {type(y)}"
            )
        y = y.expand(x.shape[0])
        return self.net(x, t, None, context=y.tokens.to(x.dtype), context_mask=y.mask)
