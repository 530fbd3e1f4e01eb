"""What the evaluation protocol records about a family's sampling: the sampler and its
settings, and the number of network evaluations per image."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

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


def sampling_protocol(model) -> dict | None:
    """How the family samples: ``model.sampling_protocol()`` if it has one, else the name and
    keyword arguments of a partial ``model.sampler`` (e.g. ddim, steps=50, eta=0.0); with the
    attached guidance's settings under "guidance"."""
    described = _sampler_protocol(model)
    guidance = getattr(model, "guidance", None)
    if guidance is not None:
        described = {**(described or {}), "guidance": guidance.protocol()}
    return described


def _sampler_protocol(model) -> dict | None:
    if hasattr(model, "sampling_protocol"):
        return model.sampling_protocol()
    sampler = getattr(model, "sampler", None)
    if isinstance(sampler, partial):
        keywords = {k: v for k, v in sampler.keywords.items() if isinstance(v, int | float | str)}
        return {"name": sampler.func.__name__, **keywords}
    if callable(sampler):
        return {"name": getattr(sampler, "__name__", type(sampler).__name__)}
    return None


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
