"""Exponential moving average of a network's weights (plain torch).

theta_ema <- d * theta_ema + (1 - d) * theta, with the warm-up d_n = min(decay, (1 + n) / (10 + n))
so that short runs are not dominated by the random initialisation (as in TensorFlow's
ExponentialMovingAverage with num_updates). Buffers (e.g. BatchNorm statistics) are copied.
The copy lives as a submodule, so it is saved in and restored from every checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # a host copy of num_updates, so that an update never waits for the GPU (None: read
        # the buffer once, after a checkpoint load)
        self._updates: int | None = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None

    def current_decay(self) -> float:
        if self._updates is None:  # after a checkpoint load: once, with or without warm-up
            self._updates = int(self.num_updates)
        if not self.warmup:
            return self.decay
        n = self._updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
        self._updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # the average is never in training mode
        super().train(mode)
        self.module.eval()
        return self
