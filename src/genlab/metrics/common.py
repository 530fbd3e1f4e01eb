"""Small pieces shared by the metrics: the missing-weights error and weight fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from genlab.utils import UserError


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights a metric needs are neither on disk nor downloadable. The message is
    one line naming the file, where it comes from and the config key that points at a copy."""


def sha256_file(path: str | Path, length: int = 16) -> str:
    """First ``length`` hex digits of the file's sha256 (weights fingerprints in protocols)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def sha256_state(module: torch.nn.Module, length: int = 16) -> str:
    """Fingerprint of a module's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]
