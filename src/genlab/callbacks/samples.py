"""Sample grids every N steps: a PNG in ``<run>/samples/step_XXXXXXX.png`` and the same image
through every logger that has an image API (W&B). Uses only the family contract
``sample(n, y=None, generator=None)``; a fixed seed shows the same noise at every step, so
grids over time show the model's progress, not sampling noise."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.data.convert import make_grid, save_grid


def class_grid(model, n: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels (n,) cycling through the classes of a conditional model (None if unconditional)
    and the grid width that puts one class per column (None: square grid)."""
    k = int(getattr(model, "num_classes", 0) or 0)
    if k <= 0:
        return None, None
    return torch.arange(n) % k, (k if k <= 16 else None)


def log_grid(trainer: L.Trainer, key: str, images: torch.Tensor, nrow: int | None = None) -> None:
    """The grid of images (N, C, H, W) in [-1, 1] through every logger with an image API."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            grid = make_grid(images, nrow).permute(1, 2, 0).numpy()
            logger.log_image(key, [grid], step=step, caption=[f"step {step}"])


class SampleGrid(PeriodicCallback):
    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        dirpath: str | None = None,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, at_end)
        self.num_samples = num_samples
        self.seed = seed
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "samples")

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        generator = torch.Generator().manual_seed(self.seed)
        labels, nrow = class_grid(pl_module, self.num_samples)
        images = pl_module.sample(self.num_samples, y=labels, generator=generator)
        path = save_grid(images, self._dir(trainer) / f"step_{step:07d}.png", nrow=nrow)
        log_grid(trainer, "samples", images, nrow)
        self.last_path = path
        return path

    def fire(self, trainer, pl_module):
        if getattr(pl_module, "can_sample", True):  # a VQ-VAE without a prior cannot
            self.write(trainer, pl_module)
