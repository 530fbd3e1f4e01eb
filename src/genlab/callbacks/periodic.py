"""The schedule shared by callbacks that act every N training steps and once at the end
(sample grids, latent interpolation, evaluation)."""

from __future__ import annotations

import lightning as L
import torch

from genlab.callbacks.preemption import interruptible


class PeriodicCallback(L.Callback):
    """Calls ``fire(trainer, pl_module)`` when ``global_step`` reaches a positive multiple of
    ``every_n_steps`` (0: never) and, with ``at_end``, when training ends, never twice at the
    same step. Several batches can share a step (a GAN's critic batches), hence the guard.
    ``fire`` runs with the global RNG states forked (restored afterwards)."""

    def __init__(self, every_n_steps: int, at_end: bool = True):
        self.every_n_steps = int(every_n_steps or 0)
        self.at_end = at_end
        self._last_step = -1

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule):
        raise NotImplementedError

    def _fire_once(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        # a stop signal ends a long grid or evaluation at once; and nothing these do (sampling,
        # building a feature extractor) draws from the training RNG, so a resumed run, which
        # builds its extractors at another step, trains exactly like an uninterrupted one
        device = pl_module.device
        on_accelerator = device.type not in ("cpu", "meta")
        devices = [device.index or 0] if on_accelerator else []
        rng = torch.random.fork_rng(devices=devices, device_type=device.type if devices else None)
        with interruptible(), rng:
            self.fire(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, every = trainer.global_step, self.every_n_steps
        if every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self._fire_once(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_end and trainer.global_step != self._last_step:
            self._fire_once(trainer, pl_module)
