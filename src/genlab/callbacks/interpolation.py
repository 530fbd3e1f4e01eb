"""Latent interpolation grids for families with an explicit latent space (GANs, VAEs): each row
walks from one latent to another along the great circle (spherical interpolation, White 2016),
so a smooth row says the generator's latent space is smooth. Written to
``<run>/samples/interp_XXXXXXX.png`` every ``every_n_steps`` steps and at the end; families
without ``latents(n, generator)`` and ``sample(n, z=...)`` are skipped."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.data.convert import save_grid


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (n, d) at fractions t (k,) -> (n, k, d)."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(1).clamp(-1 + 1e-7, 1 - 1e-7))[:, None, None]
    t = t[None, :, None]
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a[:, None] + (torch.sin(t * omega) / so) * b[:, None]


class LatentInterpolation(PeriodicCallback):
    def __init__(self, every_n_steps: int = 1000, rows: int = 8, steps: int = 10, seed: int = 0):
        super().__init__(every_n_steps, at_end=True)
        self.rows, self.steps, self.seed = rows, steps, seed

    @staticmethod
    def supported(pl_module) -> bool:
        return hasattr(pl_module, "latents") and hasattr(pl_module, "sample")

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path | None:
        if not self.supported(pl_module):
            return None
        g = torch.Generator().manual_seed(self.seed)
        ends = pl_module.latents(2 * self.rows, g)
        z = slerp(ends[: self.rows], ends[self.rows :], torch.linspace(0, 1, self.steps))
        z = z.reshape(self.rows * self.steps, -1)
        y = None
        if getattr(pl_module, "num_classes", 0):  # one class per row
            y = (torch.arange(self.rows) % pl_module.num_classes).repeat_interleave(self.steps)
        images = pl_module.sample(len(z), y=y, z=z)
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "samples" / f"interp_{step:07d}.png"
        return save_grid(images, path, nrow=self.steps)

    def fire(self, trainer, pl_module):
        self.write(trainer, pl_module)
