"""Counting the network evaluations a sampler makes (``val/sample_nfe``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def count_rows(module: torch.nn.Module | None) -> Iterator[list[int]]:
    """Counts the batch rows ``module`` processes (forward hook): rows / images = NFE per image."""
    total = [0]
    if module is None:
        yield total
        return

    def hook(_module, args, _output):
        if args and torch.is_tensor(args[0]):
            total[0] += int(args[0].shape[0])

    handle = module.register_forward_hook(hook)
    try:
        yield total
    finally:
        handle.remove()
