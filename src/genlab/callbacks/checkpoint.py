"""Atomic checkpoint writes: a checkpoint file is either the old one or the complete new one.

Lightning's own writer streams into the target path, so a run killed mid-write (SIGKILL, out
of memory, preemption) can leave a truncated ``last.ckpt``. Here the bytes go to a temporary
file in the same directory, are flushed and fsynced, and replace the target with
``os.replace`` (atomic on POSIX and Windows). Loading defaults to ``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    ``fit`` for any other stop (``max_time``, ``max_epochs``, early stopping). The only writer
    of ``last.ckpt`` (the ModelCheckpoint presets do not ``save_last``)."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 500):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.saved_step = -1

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, every = trainer.global_step, self.every_n_train_steps
        if (every > 0 and step % every == 0) or 0 < trainer.max_steps <= step:
            self._save(trainer)

    def on_fit_end(self, trainer, pl_module):
        if self.saved_step != trainer.global_step:
            self._save(trainer)
