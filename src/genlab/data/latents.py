"""Training data in an autoencoder's latent space: the encoded dataset served in place of the
images, for latent diffusion and flow models (Rombach et al. 2022, Sec. 3 and 4).

The encoding itself is the model's business (``genlab.families.latent`` encodes each split
once and caches the posteriors on disk, keyed by the autoencoder's checkpoint); this module
only serves tensors. ``LatentDataModule`` wraps the dataset's own ``ImageDataModule``: its
training and validation batches are latents, drawn from the cached Gaussian posterior
``z = scale * (mean + std * eps)`` at every step (``sample=True``; the posterior mean
otherwise, and always for validation), with a random choice between the encodings of each
image and of its mirror image when the images' module flips (``hflip``). Everything else
(the reference images of the evaluation, validation images for grids, the geometry, names,
the decoded-image cache) is the image module's, so the evaluation protocol sees images.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from genlab.data.datamodules import ImageDataModule


@dataclass
class EncodedSplit:
    """One split's posteriors: ``mean`` and ``std`` (N, V, c, h, w) float tensors, V = 1, or 2
    when the mirror images were encoded too (view 1), and ``labels`` (N,)."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.mean.shape != self.std.shape or self.mean.ndim != 5:
            raise ValueError(
                f"encoded split: mean {tuple(self.mean.shape)} and std "
                f"{tuple(self.std.shape)} must both be (N, views, c, h, w)"
            )
        if len(self.labels) != len(self.mean):
            raise ValueError(f"encoded split: {len(self.labels)} labels for {len(self.mean)}")


class _Posteriors(Dataset):
    def __init__(self, split: EncodedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        return self.split.mean[i], self.split.std[i], self.split.labels[i]


class LatentDataModule(L.LightningDataModule):
    """Args:
    images: the dataset's ``ImageDataModule`` (batch size, seed and workers come from it).
    splits: ``{"train": EncodedSplit, "val": EncodedSplit}``.
    scale: multiplies every latent (the autoencoder's latent scale, 1 / std).
    sample: draw training latents from the posterior (True) or use its mean.
    """

    def __init__(
        self,
        images: ImageDataModule,
        splits: dict[str, EncodedSplit],
        scale: float = 1.0,
        sample: bool = True,
    ):
        super().__init__()
        missing = {"train", "val"} - set(splits)
        if missing:
            raise ValueError(f"LatentDataModule needs the train and val splits, not {missing}")
        self.images = images
        self.splits = splits
        self.scale = float(scale)
        self.sample = bool(sample)

    def __getattr__(self, name: str):
        # what is not about the training batches is the image module's (geometry, name,
        # load_split for reference and validation images, caches, batches_per_step, ...)
        if name in ("images", "splits") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.images, name)

    @property
    def name(self) -> str:  # LightningDataModule has a ``name`` of its own: not __getattr__'s
        return self.images.name

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].mean.shape[2:])

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)

    def train_dataloader(self) -> DataLoader:
        self.images.batches_per_step = getattr(self, "batches_per_step", 1)
        return self.images.training_loader(_Posteriors(self.splits["train"]), self.trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _Posteriors(self.splits["val"]),
            batch_size=self.images.eval_batch_size,
            num_workers=self.images.num_workers,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        mean, std, labels = batch  # (B, V, c, h, w)
        training = self.trainer is not None and self.trainer.training
        view = torch.zeros(mean.shape[0], dtype=torch.long, device=mean.device)
        if training and mean.shape[1] > 1:  # the mirror image's encoding, half of the time
            view = torch.randint(mean.shape[1], view.shape, device=mean.device)
        pick = view[:, None, None, None, None].expand(-1, 1, *mean.shape[2:])
        mean, std = mean.gather(1, pick)[:, 0], std.gather(1, pick)[:, 0]
        z = mean + std * torch.randn_like(mean) if training and self.sample else mean
        module = self.trainer.lightning_module if self.trainer is not None else None
        prepare = getattr(module, "prepare_batch", None)
        batch = (self.scale * z.float(), labels)
        return prepare(batch) if prepare is not None else batch


__all__ = ["EncodedSplit", "LatentDataModule"]
