"""One LightningModule per family. Each keeps the contract in DESIGN.md:
``sample(n, y=None, generator=None) -> (n, C, H, W) in [-1, 1]`` and ``image_shape``;
likelihood families add ``bits_per_dim(x) -> (B,)``."""

from genlab.families.diffusion import DiffusionModule
from genlab.families.gan import GANModule
from genlab.families.vae import VAEModule
from genlab.families.vqvae import VQVAEModule

__all__ = ["DiffusionModule", "GANModule", "VAEModule", "VQVAEModule"]
