"""Guidance: steering a family's samples, selected with the ``guidance`` config group.

A guidance object is built from the group (``build_guidance``) and handed to a model
(``model.set_guidance(g)``), which binds it after a check; the family then asks it to wrap
what it samples with (``genlab.guidance.base``). ``guidance=none`` (the default) builds none.

- ``cfg``: classifier-free guidance (Ho & Salimans 2021), ``genlab.guidance.cfg``.
- ``classifier``: the gradient of a noise-aware classifier (Dhariwal & Nichol 2021) for any
  diffusion model, ``genlab.guidance.classifier``.
- ``clip``: CLIP guidance toward text prompts, one class per method (gradient for diffusion,
  latent optimisation for GAN and VAE decoders, reranking for every family) with
  ``method=auto`` resolved per model, ``genlab.guidance.clip``.
"""

from genlab.guidance.base import Guidance, GuidanceError, build_guidance, cycle
from genlab.guidance.cfg import ClassifierFree
from genlab.guidance.gradient import GradientGuidance

__all__ = [
    "ClassifierFree",
    "GradientGuidance",
    "Guidance",
    "GuidanceError",
    "build_guidance",
    "cycle",
]
