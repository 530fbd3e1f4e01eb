"""Atomic checkpoint writes: a checkpoint file is either the old one or the complete new one.

Lightning's own writer streams into the target path, so a run killed mid-write (SIGKILL, out
of memory, preemption) can leave a truncated ``last.ckpt``. Here it goes through
``genlab.runs.atomic_torch_save``. Loading defaults to ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from genlab.callbacks import preemption
from genlab.runs import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves; pass in ``Trainer(plugins=[...])``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True):
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class LastCheckpoint(L.Callback):
    """Keeps ``<dirpath>/last.ckpt`` current, the file to resume from: every
    ``every_n_train_steps`` steps; at the step where ``max_steps`` ends training, from inside the
    loop (so the saved loop state is mid-epoch and a resume continues exactly); and after
    ``fit`` for any other stop (``max_time``, ``max_epochs``, early stopping); and when a stop
    signal ends the run (``preemption``: SIGTERM, Ctrl-C), at the step where it stopped. The
    only writer of ``last.ckpt`` (the ModelCheckpoint presets do not ``save_last``)."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 500):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.saved_step = -1
        self._step_before = -1  # global_step when the current batch began

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # once per step, at the batch that completed it: a GAN's global step spans n_critic
        # batches (and accumulate_grad_batches makes one span several), and a save at a later
        # one would hold discriminator updates that a resume, skipping whole steps of batches,
        # would take again
        step, every = trainer.global_step, self.every_n_train_steps
        if step == self._step_before:
            return
        if (every > 0 and step % every == 0) or 0 < trainer.max_steps <= step:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        # only at the safe points a stop signal leads to: a step boundary (SIGTERMException) or
        # a grid / evaluation after a complete step (Preempted); never mid-step
        safe = isinstance(exception, SIGTERMException | preemption.Preempted)
        if safe and preemption.requested() and self.saved_step != trainer.global_step:
            self._save(trainer)

    def on_fit_end(self, trainer, pl_module):
        if self.saved_step != trainer.global_step:
            self._save(trainer)
