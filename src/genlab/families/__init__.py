"""One LightningModule per family. Each keeps the contract in DESIGN.md:
``sample(n, y=None, generator=None) -> (n, C, H, W) in [-1, 1]`` and ``image_shape``;
likelihood families add ``bits_per_dim(x) -> (B,)``."""

from genlab.families.autoregressive import AutoregressiveModule
from genlab.families.diffusion import DiffusionModule
from genlab.families.gan import GANModule
from genlab.families.vae import VAEModule
from genlab.families.vqvae import VQPriorModule, VQVAEModule

__all__ = [
    "AutoregressiveModule",
    "DiffusionModule",
    "GANModule",
    "VAEModule",
    "VQVAEModule",
    "VQPriorModule",
]
