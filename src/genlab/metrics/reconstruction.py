"""Reconstruction quality: PSNR and SSIM of images against their reconstructions, both given
in [-1, 1] and compared in [0, 1] (``genlab.data.convert.to_unit``, data range 1), through
``torchmetrics.functional.image``.

- ``psnr``: 10 log10(1 / MSE) in dB per image, averaged over the batch (not the PSNR of the
  pooled MSE); identical images give +inf.
- ``ssim``: the structural similarity of Wang et al. 2004 (Gaussian window, sigma 1.5, 11 px
  or the largest odd size that fits smaller images), averaged over the batch.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from genlab.data.convert import to_unit


def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB (a scalar) of recon against images, (B, C, H, W) in [-1, 1]."""
    return peak_signal_noise_ratio(
        to_unit(recon), to_unit(images), data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean"
    )


def ssim(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (a scalar, at most 1) of recon against images, (B, C, H, W) in [-1, 1]."""
    side = min(images.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    return structural_similarity_index_measure(
        to_unit(recon), to_unit(images), data_range=1.0, kernel_size=kernel
    )


__all__ = ["psnr", "ssim"]
