"""The family contract: the capabilities callers use, as small runtime-checkable Protocols.

Callbacks, the evaluation, guidance and the command-line tools ask ``isinstance(model,
Likelihood)`` and the like; they never probe a model for attributes. A family has a
capability by having its members (``typing.runtime_checkable`` checks that they exist; the
signatures below are the contract the tests hold every family to).

Images are float tensors (B, C, H, W) in [-1, 1]; labels are long tensors (B,); a
``generator`` is a CPU ``torch.Generator`` so that a seed gives the same images on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

# denoise(x, sigma) -> x0_hat: noisy images x = x0 + sigma eps (B, C, H, W) and their noise
# levels sigma (B,) (float64) to the predicted clean image (genlab.diffusion.frame)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Generative(Protocol):
    """Draws images on its own.

    ``sample(n, y=None, generator=None, **opts)`` returns (n, C, H, W) in [-1, 1]; ``y`` (n,)
    are labels for a class-conditional model (``num_classes`` > 0; None lets the family choose:
    uniform random labels, or the unconditional model where it has one). Options every family
    takes: ``use_ema`` (sample with the EMA weights where the family keeps them) and
    ``progress`` (a progress bar).
    """

    image_shape: tuple[int, int, int]
    num_classes: int

    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
        **opts,
    ) -> torch.Tensor: ...  # fmt: skip

    def describe(self) -> dict: ...


@runtime_checkable
class Likelihood(Protocol):
    """Reports -log2 p(x) per dimension on discrete 8-bit data, one convention for all
    (``genlab.metrics.likelihood``): ``bits_per_dim(x, y=None, generator=None)`` -> (B,) for
    x (B, C, H, W) on the 256-value grid in [-1, 1]; an estimator's randomness comes from
    ``generator``. ``bpd_protocol()`` says how the number was estimated."""

    def bits_per_dim(
        self, x: torch.Tensor, y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...  # fmt: skip

    def bpd_protocol(self) -> dict: ...


@runtime_checkable
class ODELikelihood(Protocol):
    """Bits/dim by the probability-flow ODE of a denoising model, in the convention of
    ``Likelihood`` (``genlab.diffusion.ode_likelihood``, uniform dequantisation): the
    ``val/bpd_ode`` metric, next to a variational bound where the family reports one as its
    ``bits_per_dim`` (DDPM). ``ode_protocol()`` says how."""

    def ode_bits_per_dim(
        self, x: torch.Tensor, y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...  # fmt: skip

    def ode_protocol(self) -> dict: ...


@runtime_checkable
class Denoising(Protocol):
    """A denoiser in the shared sigma frame and its noise process: ``denoiser(y, use_ema)``
    returns ``denoise(x, sigma) -> x0_hat`` (what every sampler calls and guidance wraps), and
    ``frame`` (a ``genlab.diffusion.frame.NoiseFrame``) maps the family's own noise process
    into that frame: its sigma range, input scaling and step spacings. ``cond_drop_prob`` is
    the label dropout of training (> 0: classifier-free guidance works). The denoiser works on
    tensors of ``space_shape``: the images' shape, or a latent model's latents, which
    ``decode(x0)`` maps to images (B, C, H, W) in [-1, 1], differentiably (the identity in
    pixel space); guidance that reads images (CLIP) reads ``decode(x0_hat)``."""

    frame: object
    cond_drop_prob: float
    space_shape: tuple[int, int, int]

    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser: ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextConditional(Protocol):
    """Conditioned on captions (text-to-image, ``genlab.families.text``): its denoiser takes
    captions, or labels that ``captions_for(y, training)`` turns into captions, and None is
    the empty caption, the unconditional branch of classifier-free guidance.
    ``set_captions(captions)`` trains on a dataset's captions (batch labels index them)."""

    def captions_for(self, y: torch.Tensor, training: bool, offset: int = 0) -> list[str]: ...

    def set_captions(self, captions) -> None: ...


@runtime_checkable
class EncodedData(Protocol):
    """Trains on an encoding of the images rather than the images (a latent model):
    ``encoded_data(images, cache_dir)`` -> the LightningDataModule of its training batches,
    built from the images' ``ImageDataModule`` (encoded once, cached under ``cache_dir``). The
    evaluation still compares its decoded samples with ``images``."""

    def encoded_data(self, images, cache_dir): ...


@runtime_checkable
class Latent(Protocol):
    """An explicit latent space with a prior: ``latents(n, generator)`` draws z (n, d) on the
    CPU from the prior, ``generate(z, y, use_ema)`` maps latents to images (B, C, H, W) in
    eval mode, differentiably with respect to z (latent optimisation, interpolation)."""

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def generate(
        self, z: torch.Tensor, y: torch.Tensor | None = None, use_ema: bool = True
    ) -> torch.Tensor: ...


@runtime_checkable
class Encoding(Protocol):
    """A latent model with an encoder: ``encode_mean(x, y)`` -> the posterior mean (B, d) of
    images, and ``latent_kl(x, y)`` -> (d,) the mean KL of each latent dimension over the
    batch (informative dimensions have large values)."""

    def encode_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...

    def latent_kl(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class Reconstructing(Protocol):
    """``reconstruct(x, y=None)`` -> (B, C, H, W) in [-1, 1]: what the model makes of images
    it encodes (autoencoders)."""

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


__all__ = [
    "Denoiser",
    "Denoising",
    "Encoding",
    "Generative",
    "Latent",
    "ODELikelihood",
    "Likelihood",
    "Reconstructing",
]
