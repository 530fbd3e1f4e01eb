"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to both real and
generated images before the discriminator, so the discriminator sees augmented data while the
generator still learns the original distribution. Images (B, C, H, W) in [-1, 1].

``policy`` is a comma-separated subset of ``color`` (brightness, saturation, contrast),
``translation`` (shift by up to 1/8 of the side, zero padding) and ``cutout`` (a square of half
the side set to zero). Plain torch, no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    r = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)
    x = x + (r() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(
        torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
    )
    gy = (gy[None] + dy + 1).clamp(0, h + 1)
    gx = (gx[None] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # out-of-range reads land on the zero border
    idx = (gy * (w + 2) + gx).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gy = torch.arange(h, device=x.device)[None, :, None]
    gx = torch.arange(w, device=x.device)[None, None, :]
    inside = ((gy - cy + ch // 2) >= 0) & ((gy - cy + ch // 2) < ch)
    inside = inside & ((gx - cx + cw // 2) >= 0) & ((gx - cx + cw // 2) < cw)
    return x * (~inside)[:, None].to(x.dtype)


def diff_augment(x: torch.Tensor, policy: str | None) -> torch.Tensor:
    """Apply the policy's augmentations (each with fresh randomness per image)."""
    if not policy:
        return x
    for name in (p.strip() for p in policy.split(",") if p.strip()):
        if name not in POLICIES:
            raise ValueError(f"unknown DiffAugment policy {name!r}: use {', '.join(POLICIES)}")
        x = {"color": _color, "translation": _translation, "cutout": _cutout}[name](x)
    return x
