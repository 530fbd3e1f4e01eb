"""Latent denoising models (Rombach et al. 2022): DDPM, EDM or flow matching in the latent
space of a frozen autoencoder (``model=autoencoder``), whose samples are decoded to images.

    z = s * E(x)  (s = the autoencoder's latent scale, 1 / std; Rombach et al. Sec. 4.3.2),
    train the denoiser on z,  sample z ~ p_theta,  x = D(z / s).

The dataset is encoded once per split and cached (``cached_encoding``): posterior mean and
std of every image (and of its mirror image when the data flips), in a file keyed by the
autoencoder's checkpoint hash and the images' cache key, so no training step runs the encoder
and a new autoencoder gets a new cache. ``genlab.data.latents.LatentDataModule`` serves the
cached posteriors (a fresh posterior sample every step) in place of the images.

Everything outside the training batches stays in image space: ``sample`` returns decoded
images in [-1, 1], so the evaluation protocol, the sample grids, classifier-free guidance
(on the latent denoiser) and CLIP guidance (its gradient flows back through the decoder:
``decode`` is differentiable) work unchanged. Two things do not carry over: bits/dim (a
latent density is not a density of the 8-bit images) and classifier guidance (its noise-aware
classifier reads noisy pixels); both are absent, not approximated.

Configured by ``model=latent_diffusion|latent_edm|latent_flow model.autoencoder_run=<run>``:
the denoiser's net is a partial that gets the latent channels and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from genlab.data.latents import EncodedSplit, LatentDataModule
from genlab.families.diffusion import DiffusionModule
from genlab.families.edm import EDMModule
from genlab.families.flow import FlowModule
from genlab.metrics.common import sha256_file
from genlab.runs import atomic_file, checkpoint_path

log = logging.getLogger("genlab")

CACHE_FORMAT = "genlab-latents/1"


class LatentSpace:
    """Mixed into a denoising family ahead of it: loads the frozen autoencoder, builds the
    net for the latent shape, and maps between latents and images.

    Args (beyond the family's): autoencoder_run: run directory of a ``model=autoencoder``
    run; autoencoder_ckpt: its checkpoint (last | best | <file>.ckpt); latent_sample: train
    on posterior samples (True) or means; image_shape: (C, H, W) of the data, which must be
    the autoencoder's. ``net`` may be a partial: it is called with the latents' channels
    (``in_channels``) and side (``image_size``).
    """

    family_base: type

    def __init__(
        self,
        autoencoder_run: str,
        net: nn.Module | Callable[..., nn.Module],
        image_shape=(1, 28, 28),
        autoencoder_ckpt: str = "last",
        latent_sample: bool = True,
        encode_batch_size: int = 256,
        **family_options,
    ):
        from genlab.families.autoencoder import AutoencoderModule
        from genlab.runs import load_model

        autoencoder = load_model(autoencoder_run, autoencoder_ckpt, "cpu").model
        if not isinstance(autoencoder, AutoencoderModule):
            raise ValueError(
                f"model.autoencoder_run: {autoencoder_run} is a {type(autoencoder).__name__} "
                "run, not a model=autoencoder run"
            )
        image_shape = tuple(int(s) for s in image_shape)
        if tuple(autoencoder.image_shape) != image_shape:
            raise ValueError(
                f"model.autoencoder_run: {autoencoder_run} was trained on "
                f"{tuple(autoencoder.image_shape)} images, this data is {image_shape}: use "
                "the autoencoder's dataset and image size"
            )
        latent_shape = tuple(int(s) for s in autoencoder.latent_shape)
        if latent_shape[1] != latent_shape[2]:
            raise ValueError(f"square latents only, the autoencoder gives {latent_shape}")
        if not isinstance(net, nn.Module):  # a partial: the latents' geometry
            net = net(in_channels=latent_shape[0], image_size=latent_shape[1])
        super().__init__(net=net, image_shape=latent_shape, **family_options)
        self.space_shape = latent_shape  # the denoiser's; image_shape is the data's
        self.image_shape = image_shape
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.autoencoder_run = str(autoencoder_run)
        # what keys the latent cache: the autoencoder's checkpoint file, byte for byte
        self.autoencoder_sha256 = sha256_file(
            checkpoint_path(Path(autoencoder_run), autoencoder_ckpt), length=64
        )
        self.latent_sample = bool(latent_sample)
        self.encode_batch_size = int(encode_batch_size)
        self.encoder_calls = 0  # batches encoded (the cache makes this 0 after the first run)
        self.scale_source = "the autoencoder's validation posterior means"

    @property
    def latent_scale(self) -> float:
        return float(self.autoencoder.latent_scale)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen
        return self

    def networks(self) -> list[nn.Module]:
        return [m for m in super().networks() if m is not self.autoencoder]

    # ------------------------------------------------------------------ latents <-> images
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) on the denoiser's scale -> images (B, C, H, W) in [-1, 1],
        differentiable with respect to z (CLIP guidance backpropagates through it)."""
        return self.autoencoder.decode(z / self.latent_scale).clamp(-1, 1)

    @torch.no_grad()
    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> posterior mean and std (B, c, h, w), unscaled."""
        self.encoder_calls += 1
        mean, logvar = self.autoencoder.encode_posterior(x)
        return mean, (0.5 * logvar).exp()

    # ------------------------------------------------------------------ the cached dataset
    def cache_key(self, images, split: str) -> str:
        fields = {
            "format": CACHE_FORMAT,
            "autoencoder": self.autoencoder_sha256,
            "images": images.cache_fields(split),
            "mirrored": bool(images.hflip) and split == "train",
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def cached_encoding(self, images, split: str, cache_dir: Path) -> EncodedSplit:
        """The split's posteriors from ``cache_dir``, encoding and writing them (atomically)
        if the cache has no file for this autoencoder and these images."""
        path = Path(cache_dir) / f"latents-{images.name}-{split}-{self.cache_key(images, split)}.pt"
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                return EncodedSplit(stored["mean"], stored["std"], stored["labels"])
            except (OSError, RuntimeError, KeyError, ValueError) as err:
                log.warning("%s is unreadable (%s): encoding again", path, err)
        encoded = self._encode_split(images, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as out:
            torch.save({"mean": encoded.mean, "std": encoded.std, "labels": encoded.labels}, out)
        log.info("encoded %s/%s: %d latents of %s -> %s", images.name, split,
                 len(encoded.labels), tuple(encoded.mean.shape[2:]), path)  # fmt: skip
        return encoded

    def _encode_split(self, images, split: str) -> EncodedSplit:
        from tqdm.auto import tqdm

        from genlab.data.convert import to_model

        data, labels = images.load_split(split).tensors
        views = 2 if images.hflip and split == "train" else 1
        device = next(self.autoencoder.parameters()).device
        means, stds = [], []
        batches = range(0, len(data), self.encode_batch_size)
        for start in tqdm(batches, desc=f"encoding {split}", leave=False, disable=len(batches) < 8):
            x = to_model(data[start : start + self.encode_batch_size].to(device))
            pairs = [self.encode_posterior(x)]
            if views == 2:
                pairs.append(self.encode_posterior(x.flip(-1)))
            means.append(torch.stack([m for m, _ in pairs], 1).cpu())
            stds.append(torch.stack([s for _, s in pairs], 1).cpu())
        return EncodedSplit(torch.cat(means), torch.cat(stds), labels.clone())

    def encoded_data(self, images, cache_dir: Path) -> LatentDataModule:
        """The datamodule that trains this model: ``images``' splits encoded (once, cached)."""
        images.setup("fit")
        splits = {s: self.cached_encoding(images, s, cache_dir) for s in ("train", "val")}
        if int(self.autoencoder.latent_scale_step) < 0:  # the autoencoder never validated
            scale = float(1.0 / splits["train"].mean[:, 0].double().std())
            self.autoencoder.latent_scale.fill_(scale)  # saved with this model's checkpoints
            self.scale_source = "the training posterior means (the autoencoder had none)"
            log.warning("%s has no measured latent_scale: 1/std of the training posterior "
                        "means, %.4g, is used", self.autoencoder_run, scale)  # fmt: skip
        return LatentDataModule(images, splits, self.latent_scale, sample=self.latent_sample)

    # ------------------------------------------------------------------ the family contract
    def draw(self, m, y, generator, **opts):
        return self.decode(super().draw(m, y, generator, **opts))

    def describe(self, use_ema: bool = True) -> dict:
        out = super().describe(use_ema)
        out["latent"] = {
            "autoencoder_run": self.autoencoder_run,
            "autoencoder_sha256": self.autoencoder_sha256[:16],
            "latent_shape": list(self.space_shape),
            "latent_scale": self.latent_scale,
            "latent_scale_from": self.scale_source,
            "training_latents": "posterior samples" if self.latent_sample else "posterior means",
        }
        return out

    # a latent density is not one of the 8-bit images: no bits/dim (genlab.families.contract)
    bits_per_dim = None
    bpd_protocol = None
    ode_bits_per_dim = None
    ode_protocol = None


class LatentDiffusionModule(LatentSpace, DiffusionModule):
    """DDPM in an autoencoder's latent space (LDM, Rombach et al. 2022)."""

    family = "latent_diffusion"


class LatentEDMModule(LatentSpace, EDMModule):
    """EDM (Karras et al. 2022) in an autoencoder's latent space."""

    family = "latent_edm"


class LatentFlowModule(LatentSpace, FlowModule):
    """Flow matching in an autoencoder's latent space (as Esser et al. 2024 train SD3)."""

    family = "latent_flow"


__all__ = [
    "LatentDiffusionModule",
    "LatentEDMModule",
    "LatentFlowModule",
    "LatentSpace",
]
