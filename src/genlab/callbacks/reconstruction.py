"""Reconstruction grids for families with an encoder (VAEs, VQ-VAE): the first ``num_images``
validation images and their reconstructions, in alternating rows (inputs, then what the model
makes of them), written to ``<run>/samples/recon_XXXXXXX.png`` every ``every_n_steps`` steps
and at the end, and logged to W&B. Families without ``reconstruct(x, y)`` are skipped."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.callbacks.samples import log_grid
from genlab.data.convert import save_grid, to_model
from genlab.families.contract import Reconstructing


def validation_images(trainer, pl_module, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n validation images in [-1, 1] on the module's device, and their labels for a
    conditional model (else None)."""
    images, labels = trainer.datamodule.load_split("val").tensors
    x = to_model(images[:n]).to(pl_module.device)
    y = labels[:n].to(pl_module.device) if pl_module.num_classes else None
    return x, y


class Reconstructions(PeriodicCallback):
    def __init__(self, every_n_steps: int = 1000, num_images: int = 32, nrow: int = 8):
        super().__init__(every_n_steps, at_end=True)
        self.num_images, self.nrow = num_images, nrow

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path | None:
        if not isinstance(pl_module, Reconstructing):
            return None
        x, y = validation_images(trainer, pl_module, self.num_images)
        recon = pl_module.reconstruct(x, y)
        rows = [
            t
            for i in range(0, len(x), self.nrow)
            for t in (x[i : i + self.nrow], recon[i : i + self.nrow])
        ]
        images = torch.cat(rows)
        path = Path(trainer.default_root_dir) / "samples" / f"recon_{trainer.global_step:07d}.png"
        log_grid(trainer, "reconstructions", images, self.nrow)
        return save_grid(images, path, nrow=self.nrow)

    def fire(self, trainer, pl_module):
        self.write(trainer, pl_module)
