"""Sample grids every N steps: a PNG in ``<run>/samples/step_XXXXXXX.png`` and the same image
through every logger that has an image API (W&B). Uses only the family contract
``sample(n, y=None, generator=None)``; a fixed seed shows the same noise at every step, so
grids over time show the model's progress, not sampling noise."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.data.convert import make_grid, save_grid
from genlab.families.contract import Generative
from genlab.nets.rng import SampleSeeds


def class_grid(model, n: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels (n,) cycling through the classes of a conditional model (None if unconditional)
    and the grid width that puts one class per column (None: square grid)."""
    k = model.num_classes
    if k <= 0:
        return None, None
    return torch.arange(n) % k, (k if k <= 16 else None)


def guided_columns(model) -> list[str] | None:
    """What each grid column is steered toward (``Guidance.columns``), None if unguided."""
    return None if model.guidance is None else model.guidance.columns()


def grid_layout(model, n: int) -> tuple[torch.Tensor | None, int | None, list[str] | None]:
    """(labels, grid width, column captions) for a grid of n samples: one class per column for
    a conditional model, one guidance target per column for a guided unconditional one."""
    labels, nrow = class_grid(model, n)
    columns = guided_columns(model) if labels is None else None
    return labels, (len(columns) if columns else nrow), columns


def log_grid(
    trainer: L.Trainer,
    key: str,
    images: torch.Tensor,
    nrow: int | None = None,
    columns: list[str] | None = None,
) -> None:
    """The grid of images (N, C, H, W) in [-1, 1] through every logger with an image API,
    captioned with its step and, for guided grids, what each column was steered toward."""
    step = trainer.global_step
    caption = f"step {step}" + (f"; columns: {' | '.join(columns)}" if columns else "")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            grid = make_grid(images, nrow).permute(1, 2, 0).numpy()
            logger.log_image(key, [grid], step=step, caption=[caption])


def save_columns(grid: Path, columns: list[str]) -> Path:
    """``<grid>.json``: {"columns": [...]}, what each column of a guided grid was steered to."""
    path = Path(grid).with_suffix(".json")
    path.write_text(json.dumps({"columns": columns}, indent=1) + "\n")
    return path


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
        generator = SampleSeeds.for_indices(self.seed, range(self.num_samples))
        labels, nrow, columns = grid_layout(pl_module, self.num_samples)
        images = pl_module.sample(self.num_samples, y=labels, generator=generator)
        path = save_grid(images, self._dir(trainer) / f"step_{step:07d}.png", nrow=nrow)
        if columns:  # the prompts (or classes) of the columns, beside the grid
            save_columns(path, columns)
        log_grid(trainer, "samples", images, nrow, columns)
        self.last_path = path
        return path

    def fire(self, trainer, pl_module):
        if isinstance(pl_module, Generative):  # a VQ-VAE without a prior cannot
            self.write(trainer, pl_module)
