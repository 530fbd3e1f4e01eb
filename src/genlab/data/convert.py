"""The one place where image value ranges change.

Inside models images are float in [-1, 1]; on disk, in caches and for metrics they are
uint8 in [0, 255]. The map is x = k / 127.5 - 1 for k in 0..255, so 8-bit data sits on a
grid of 256 values with bin width 2/255 (the convention used by bits/dim): ``to_model`` and
``to_uint8`` for images, ``from_levels`` / ``to_levels`` / ``quantize`` for the 8-bit levels
inside models (256-way targets, samples rounded to the grid), ``to_unit`` for [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return from_levels(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, clamped)."""
    return to_levels(images.detach().float()).to(torch.uint8)


def to_unit(images: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """float in [-1, 1] -> float32 in [0, 1] (clamped); ``detach=False`` keeps the graph
    (CLIP's preprocessing, which guidance differentiates through)."""
    images = images.detach() if detach else images
    return (images.float().clamp(-1, 1) + 1) / 2


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> the nearest 8-bit level k in 0..255 (rounded, clamped), as a float
    tensor of x's dtype (the target index of a 256-way model)."""
    return ((x + 1) * 127.5).round().clamp(0, 255)


def from_levels(k: torch.Tensor) -> torch.Tensor:
    """8-bit levels k (integer, or float, possibly fractional such as a mean of channels) in
    [0, 255] -> k / 127.5 - 1 in [-1, 1]; float dtypes are kept, integers become float32."""
    return (k if k.is_floating_point() else k.float()) / 127.5 - 1


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest value of the 8-bit grid k/127.5 - 1, clamped to [-1, 1]."""
    return from_levels(to_levels(x))


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with C in {1, 3} -> uint8 (B, 3, H, W) (grey repeated, no copy)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> one uint8 grid (C', H', W') with C' in {1, 3}."""
    from torchvision.utils import make_grid as tv_make_grid

    n = images.shape[0]
    nrow = nrow or max(1, int(round(n**0.5)))
    grid = tv_make_grid(to_unit(images.cpu()), nrow=nrow, padding=padding, pad_value=1.0)
    if images.shape[1] == 1:
        grid = grid[:1]
    return (grid * 255).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as a PNG grid; returns the path."""
    grid = make_grid(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return path
