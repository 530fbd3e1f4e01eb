"""Latent interpolation and traversal grids.

Interpolation for ``Latent`` families (GANs, VAEs): each row walks from one latent to another
along the great circle (spherical interpolation, White 2016), so a smooth row says the
generator's latent space is smooth. Written to ``<run>/samples/interp_XXXXXXX.png`` every
``every_n_steps`` steps and at the end; other families are skipped. The images are
``generate(z, y)`` (a VAE's decoder mean), with no guidance: the latents are given."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.callbacks.reconstruction import validation_images
from genlab.data.convert import save_grid
from genlab.families.contract import Encoding, Latent


@torch.no_grad()
def generate(pl_module, z: torch.Tensor, y: torch.Tensor | None, batch: int = 256):
    """``generate(z, y)`` in batches, clamped to [-1, 1]."""
    out = []
    for i in range(0, len(z), batch):
        yb = None if y is None else y[i : i + batch].to(pl_module.device)
        out.append(pl_module.generate(z[i : i + batch], yb).clamp(-1, 1))
    return torch.cat(out)


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

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path | None:
        if not isinstance(pl_module, Latent):
            return None
        g = torch.Generator().manual_seed(self.seed)
        ends = pl_module.latents(2 * self.rows, g)
        z = slerp(ends[: self.rows], ends[self.rows :], torch.linspace(0, 1, self.steps))
        z = z.reshape(self.rows * self.steps, -1)
        y = None
        if pl_module.num_classes:  # one class per row
            y = (torch.arange(self.rows) % pl_module.num_classes).repeat_interleave(self.steps)
        images = generate(pl_module, z, y)
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "samples" / f"interp_{step:07d}.png"
        return save_grid(images, path, nrow=self.steps)

    def fire(self, trainer, pl_module):
        self.write(trainer, pl_module)


class LatentTraversal(PeriodicCallback):
    """One row per latent dimension: the latent of a validation image with that dimension set
    to ``steps`` values in [-span, span] (Higgins et al. 2017, Fig. 7). Rows are the ``dims``
    dimensions with the largest KL on the first validation batch when the family reports
    ``latent_kl`` (informative dimensions first). Written to ``samples/traverse_XXXXXXX.png``
    for ``Encoding`` families (VAEs); others are skipped."""

    def __init__(
        self,
        every_n_steps: int = 2000,
        dims: int = 10,
        steps: int = 9,
        span: float = 3.0,
        image_index: int = 0,
    ):
        super().__init__(every_n_steps, at_end=True)
        self.dims, self.steps, self.span, self.image_index = dims, steps, span, image_index

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path | None:
        if not isinstance(pl_module, Encoding) or not isinstance(pl_module, Latent):
            return None
        x, y = validation_images(trainer, pl_module, max(256, self.image_index + 1))
        i = self.image_index
        y0 = None if y is None else y[i : i + 1]
        base = pl_module.encode_mean(x[i : i + 1], y0).cpu()  # (1, latent_dim)
        order = pl_module.latent_kl(x, y).cpu().argsort(descending=True)
        dims = order[: self.dims]
        values = torch.linspace(-self.span, self.span, self.steps)
        z = base.repeat(len(dims) * self.steps, 1)
        for row, d in enumerate(dims.tolist()):
            z[row * self.steps : (row + 1) * self.steps, d] = values
        labels = None if y0 is None else y0.cpu().repeat(len(z))
        images = generate(pl_module, z, labels)
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "samples" / f"traverse_{step:07d}.png"
        return save_grid(images, path, nrow=self.steps)

    def fire(self, trainer, pl_module):
        self.write(trainer, pl_module)
