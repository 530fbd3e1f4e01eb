"""LightningDataModules. Every dataset is decoded once to uint8 images at the target
resolution and cached on disk (``cache_dir``) as a raw file that is memory-mapped, so a
dataset larger than memory (ImageNet-64: 1.28 M images, 15.7 GB) trains with bounded private
memory, and DataLoader workers and DDP ranks share one copy in the page cache
(``in_memory=true`` reads it into RAM instead). A folder is decoded straight into the file,
never whole into memory. Batches are converted to [-1, 1] after they reach the device
(``on_after_batch_transfer``), with an optional random horizontal flip on training batches.

The cache of a split is three files beside each other, each written atomically: ``<key>.u8``
(the images, row after row, (N, C, H, W)), ``<key>.labels.npy`` and ``<key>.json`` (shape and
count of unreadable files), written last: a cache without its ``.json``, or whose files do
not match it, is rebuilt.

Splits: ``train`` and ``val``. For MNIST, Fashion-MNIST and CIFAR-10 ``val`` is the official
test set; for CelebA it is the official validation partition when
``list_eval_partition.txt`` is present, else the last ``val_fraction`` of the sorted files;
for a folder it is a fixed random ``val_fraction`` of the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from genlab.data import readers
from genlab.data.captions import read_captions
from genlab.data.convert import to_model
from genlab.data.readers import not_found
from genlab.runs import atomic_file, atomic_write_text
from genlab.utils import ConfigError

SPLITS = ("train", "val")
CACHE_FORMAT = "genlab-uint8-cache/2"  # version 1 was one torch.save'd .pt file
BINARIZE = (None, "static", "dynamic")
BINARIZE_SEEDS = {"train": 0, "val": 1}


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic binarisation of uint8 images: 255 with probability k/255, else 0 (uint8).
    With no generator it draws from the global stream on the images' device."""
    if generator is None:
        u = torch.rand(images.shape, device=images.device)
    else:
        u = torch.rand(images.shape, generator=generator).to(images.device)
    return torch.where(u * 255 < images.float(), 255, 0).to(torch.uint8)


class ResumableSampler(DistributedSampler):
    """Shuffles with a permutation fixed by (seed, epoch) and serves this rank's share of it.
    ``skip`` drops the first samples of this rank's next pass, so a run resumed mid-epoch sees
    exactly the batches an uninterrupted run would have seen (Lightning calls ``set_epoch`` at
    every epoch start).

    Under DDP every rank draws the same permutation, pads it to a multiple of the world size
    by repeating its head (as torch's ``DistributedSampler`` does) and takes every
    ``num_replicas``-th index from ``rank``. It is a ``DistributedSampler``, so Lightning serves
    it as it is instead of wrapping it in its ``DistributedSamplerWrapper`` (whose index list,
    built from ``len()``, a skipped prefix would leave short: the IndexError of issue 18,
    item 14). With one process it is the plain permutation."""

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in a world of {num_replicas}")
        # the parent only stores what it is given; range(n) stands in for the dataset
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n, self.skip = n, 0
        self.num_samples = -(-n // num_replicas)  # this rank's share, padded like torch's

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas > 1:
            total = self.num_samples * self.num_replicas
            perm = (perm * (-(-total // self.n)))[:total][self.rank :: self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(perm[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses implement ``read_split(split) -> (uint8 (N,C,H,W), labels (N,))``
    and may extend ``cache_fields`` with whatever identifies their source.

    Args:
        root: where the dataset's files are (``paths.data_dir``).
        image_size: side of the square images served to models.
        channels: 1 or 3; sources are converted if they differ.
        num_classes: number of labels (0 for unlabelled data); checked against the source.
        batch_size / eval_batch_size: per-process batch sizes for training / validation.
        num_workers: DataLoader workers (0 is fastest for cached images; workers share the
            memory-mapped cache).
        hflip: random horizontal flips on training batches.
        cache_dir: where decoded images are cached (None: no cache, decoded into memory).
        in_memory: read the cache into memory instead of memory-mapping it.
        download: let torchvision download missing files (needs network).
        seed: seeds the training shuffle.
        binarize: None (8-bit grey values), ``static`` (every split binarised once: pixel k
            becomes 255 with probability k/255, fixed seeds) or ``dynamic`` (validation and
            reference images as for static; training batches re-binarised at every step,
            as in Burda et al. 2016). For Bernoulli likelihoods and the classic binarised
            MNIST tables.
    """

    name = "images"
    # geometry used when the constructor is not told (configs always say it)
    geometry = {"image_size": 28, "channels": 1, "num_classes": 0}

    def __init__(
        self,
        root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        hflip: bool = False,
        cache_dir: str | None = None,
        download: bool = True,
        seed: int = 0,
        binarize: str | None = None,
        in_memory: bool = False,
    ):
        super().__init__()
        if binarize not in BINARIZE:
            raise ConfigError(f"data.binarize must be one of {BINARIZE}, got {binarize!r}")
        image_size = self.geometry["image_size"] if image_size is None else image_size
        channels = self.geometry["channels"] if channels is None else channels
        num_classes = self.geometry["num_classes"] if num_classes is None else num_classes
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        self.root = Path(os.path.expanduser(root)) if root else Path("data")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.hflip = hflip
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else None
        self.download = download
        self.seed = seed
        self.binarize = binarize
        self.in_memory = bool(in_memory)
        # data batches one global step consumes (a GAN's n_critic discriminator batches per
        # generator step): handed in by whoever pairs the data with a model (genlab.train),
        # so a mid-epoch resume skips exactly what was trained
        self.batches_per_step = 1
        self._splits: dict[str, TensorDataset] = {}
        self._grey: dict[str, TensorDataset] = {}  # 8-bit splits behind binarised ones
        self.unreadable: dict[str, int] = {}  # image files skipped per split (kept in the cache)

    # --------------------------------------------------------------- to implement
    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def cache_fields(self, split: str) -> dict:
        """What identifies the images served for ``split`` (keys the reference statistics)."""
        fields = {
            "dataset": self.name,
            "split": split,
            "root": str(self.root.resolve()),
            "image_size": self.image_size,
            "channels": self.channels,
            "version": 1,
        }
        if self.binarize:
            fields["binarize"] = f"bernoulli, seed {BINARIZE_SEEDS[split]}"
        return fields

    # --------------------------------------------------------------- loading and caching
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def cache_path(self, split: str) -> Path | None:
        """The cache's stem: ``<stem>.u8``, ``<stem>.labels.npy`` and ``<stem>.json``."""
        if self.cache_dir is None:
            return None
        fields = self.cache_fields(split)
        fields.pop("binarize", None)  # the cache holds the 8-bit images either way
        key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        name = f"{self.name}-{split}-{self.channels}x{self.image_size}x{self.image_size}-{key}"
        return self.cache_dir / name

    def write_split(self, split: str, out) -> torch.Tensor:
        """Write the split's uint8 images at the target geometry to the binary file ``out``,
        row after row; return the labels. Here: ``read_split`` in memory (the torchvision
        datasets are small); folders stream instead."""
        images, labels = self._read_resized(split)
        out.write(images.contiguous().numpy().data)
        return labels

    def _read_resized(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.read_split(split)
        images = readers.resize_uint8(
            readers.match_channels(images, self.channels), self.image_size
        )
        return images, labels.long()

    def _open_cache(self, stem: Path) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The cached images (memory-mapped, copy-on-write: never written back), labels and
        unreadable count; None when the cache is absent, incomplete or does not match."""
        meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".u8")
        labels_path = stem.with_suffix(".labels.npy")
        try:
            meta = json.loads(meta_path.read_text())
            shape = tuple(int(d) for d in meta["shape"])
            labels = torch.from_numpy(np.load(labels_path))
            complete = (
                meta.get("format") == CACHE_FORMAT
                and shape[1:] == self.image_shape
                and data_path.stat().st_size == int(np.prod(shape))
                and len(labels) == shape[0]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not complete:
            return None
        if self.in_memory:
            images = torch.from_numpy(np.fromfile(data_path, dtype=np.uint8).reshape(shape))
        else:
            images = torch.from_numpy(np.memmap(data_path, dtype=np.uint8, mode="c", shape=shape))
        return images, labels.long(), int(meta.get("unreadable", 0))

    def _build_cache(self, split: str, stem: Path) -> None:
        """Decode the split into ``stem``'s files, each atomically, the ``.json`` last."""
        with atomic_file(stem.with_suffix(".u8")) as out:
            labels = self.write_split(split, out)
            size = out.tell()
        row = int(np.prod(self.image_shape))
        if size != row * len(labels):
            raise RuntimeError(f"{self.name}/{split}: wrote {size} bytes for {len(labels)} images")
        with atomic_file(stem.with_suffix(".labels.npy")) as out:
            np.save(out, labels.numpy().astype(np.int64))
        meta = {"format": CACHE_FORMAT, "shape": [len(labels), *self.image_shape],
                "unreadable": self.unreadable.get(split, 0)}  # fmt: skip
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta))

    def load_split(self, split: str) -> TensorDataset:
        """uint8 images and labels of one split, from memory, the cache, or the source."""
        if split in self._splits:
            return self._splits[split]
        stem = self.cache_path(split)
        if stem is None:
            images, labels = self._read_resized(split)
        else:
            cached = self._open_cache(stem)
            if cached is None:
                self._build_cache(split, stem)
                cached = self._open_cache(stem)
                if cached is None:
                    raise RuntimeError(f"the cache {stem}.json was written but cannot be read")
            images, labels, self.unreadable[split] = cached
        self._check(images, labels, split)
        if self.binarize:
            self._grey[split] = TensorDataset(images, labels)
            images = binarize(images, torch.Generator().manual_seed(BINARIZE_SEEDS[split]))
        self._splits[split] = TensorDataset(images, labels)
        return self._splits[split]

    def _check(self, images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name}/{split}: expected uint8 {self.image_shape} images, "
                f"got {images.dtype} {tuple(images.shape[1:])}"
            )
        if self.num_classes > 0 and len(labels) and int(labels.max()) >= self.num_classes:
            raise ConfigError(
                f"{self.name}/{split} has label {int(labels.max())} but "
                f"data.num_classes={self.num_classes}"
            )

    # --------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:  # rank 0 of each node: fills the cache
        for split in SPLITS:
            self.load_split(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self.load_split(split)

    def train_dataloader(self) -> DataLoader:
        data = self.load_split("train")
        if self.binarize == "dynamic":  # 8-bit images, binarised per batch on the device
            data = self._grey["train"]
        return self.training_loader(data, self.trainer)

    def training_loader(self, data, trainer) -> DataLoader:
        """The shuffled training DataLoader over ``data`` (any map-style dataset, e.g. the
        cached latents of ``genlab.data.latents``): this module's batch size, workers and
        seed, sharded over ``trainer``'s ranks, and on a resume (``trainer.global_step`` > 0)
        skipping the batches of the current epoch that were already trained."""
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(len(data), self.seed, num_replicas=world, rank=rank)
        share = len(sampler)  # samples this rank serves per epoch
        drop_last = share >= self.batch_size
        if trainer is not None and trainer.global_step > 0:  # resuming: skip what was trained
            # this rank's batches per epoch: every rank steps once per global step
            per_epoch = share // self.batch_size if drop_last else -(-share // self.batch_size)
            # batches per global step: gradient accumulation times the family's count
            per_step = trainer.accumulate_grad_batches * self.batches_per_step
            done = (trainer.global_step * per_step) % per_epoch
            sampler.skip = done * self.batch_size
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # each new epoch's iterator draws its base seed from this, not the global RNG: a
            # run resumed from a checkpoint written at an epoch's last batch (its RNG state
            # taken before the next epoch's draw) then trains like an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.load_split("val"), batch_size=self.eval_batch_size, num_workers=self.num_workers
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            images = binarize(images)
        x = to_model(images)
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        # Lightning calls this hook instead of the model's: hand the batch on to it (e.g. a
        # family's channels-last layout)
        module = self.trainer.lightning_module if self.trainer is not None else None
        prepare = getattr(module, "prepare_batch", None)
        return prepare((x, labels)) if prepare is not None else (x, labels)


class _TorchvisionDataModule(ImageDataModule):
    tv_name = ""

    def read_split(self, split):
        return readers.read_torchvision(self.tv_name, self.root, split, self.download)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (LeCun et al. 1998): 60k train / 10k test digits, 28x28 grey, 10 classes."""

    name = tv_name = "mnist"
    geometry = {"image_size": 28, "channels": 1, "num_classes": 10}


class FashionMNISTDataModule(_TorchvisionDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60k / 10k, 28x28 grey, 10 classes."""

    name = tv_name = "fashion_mnist"
    geometry = {"image_size": 28, "channels": 1, "num_classes": 10}


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50k / 10k, 32x32 RGB, 10 classes."""

    name = tv_name = "cifar10"
    geometry = {"image_size": 32, "channels": 3, "num_classes": 10}


class FolderDataModule(ImageDataModule):
    """Any directory tree of images. If every image sits in a first-level subfolder, the
    subfolder names (sorted) are the classes; otherwise the data is unlabelled.

    Args (beyond the base): crop: centre square crop as a fraction of the shorter side,
    applied before resizing; val_fraction: share of files held out for validation;
    captions: serve captioned images for text-to-image models (``genlab.data.captions``:
    ``captions.jsonl`` or ``<image>.txt``): the label of an image is then its index in the
    sorted file list, and ``captions`` holds the caption of every file (needs
    ``num_classes=0``).
    """

    name = "folder"
    geometry = {"image_size": 32, "channels": 3, "num_classes": 0}

    def __init__(
        self, crop: float = 1.0, val_fraction: float = 0.05, captions: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.crop = crop
        self.val_fraction = val_fraction
        self.serves_captions = bool(captions)
        if self.serves_captions and self.num_classes:
            raise ConfigError(
                "data.captions=true labels each image by its caption's index, not a class: "
                "set data.num_classes=0"
            )
        self._captions: list[str] | None = None

    @property
    def captions(self) -> list[str] | None:
        """The caption of every image file (sorted order; the labels served index it), read
        once; None unless ``captions=true``. A missing caption is one ConfigError line."""
        if not self.serves_captions:
            return None
        if self._captions is None:
            self._captions = read_captions(self.image_dir(), self._files())
        return self._captions

    def served_labels(self, files: list[Path]) -> torch.Tensor:
        """(N,) labels of ``files``: classes (``labels_for``), or with captions the files'
        indices in the sorted file list."""
        if not self.serves_captions:
            return self.labels_for(files)
        index = {f: i for i, f in enumerate(self._files())}
        return torch.tensor([index[f] for f in files], dtype=torch.long)

    def image_dir(self) -> Path:
        if not self.root.is_dir():
            raise not_found(f"image folder {self.root}", f"a directory of images at {self.root}")
        return self.root

    def split_files(self, files: list[Path], split: str) -> list[Path]:
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = int(round(self.val_fraction * len(files)))
        idx = sorted(perm[:n_val]) if split == "val" else sorted(perm[n_val:])
        return [files[i] for i in idx]

    def _files(self) -> list[Path]:
        if not hasattr(self, "_file_list"):
            root = self.image_dir()
            files = readers.list_images(root)
            if not files:
                raise not_found(
                    f"images under {root}", f"files ending in {readers.IMAGE_EXTENSIONS}"
                )
            self._file_list = files
        return self._file_list

    def cache_fields(self, split):
        return {
            **super().cache_fields(split),
            "crop": self.crop,
            "val_fraction": self.val_fraction,
            "files": readers.files_signature(self._files()),
            "decoder": readers.DECODER,  # a cache decoded by an older decoder is not reused
            **({"labels": "caption index"} if self.serves_captions else {}),
        }

    def labels_for(self, files: list[Path]) -> torch.Tensor:
        root = self.image_dir()
        parents = [f.parent.relative_to(root).parts for f in self._files()]
        if parents and all(len(p) >= 1 for p in parents):
            classes = sorted({p[0] for p in parents})
            index = {c: i for i, c in enumerate(classes)}
            if self.num_classes and self.num_classes != len(classes):
                raise ConfigError(
                    f"{root} has {len(classes)} class folders but "
                    f"data.num_classes={self.num_classes}; set it to {len(classes)}"
                )
            return torch.tensor([index[f.parent.relative_to(root).parts[0]] for f in files])
        if self.num_classes:
            raise ConfigError(f"{root} has no class subfolders; set data.num_classes=0")
        return torch.zeros(len(files), dtype=torch.long)

    def read_split(self, split):
        files = self.split_files(self._files(), split)
        if not files:
            raise ConfigError(
                f"the {split} split of {self.root} is empty; adjust data.val_fraction"
            )
        images, kept = readers.decode_images(
            files, self.image_size, self.crop, self.channels, desc=f"{self.name}/{split}"
        )
        self.unreadable[split] = len(files) - len(kept)
        return images, self.served_labels([files[i] for i in kept])

    def write_split(self, split, out):
        """Streams: each image is written as it is decoded, never the split in memory."""
        files = self.split_files(self._files(), split)
        if not files:
            raise ConfigError(
                f"the {split} split of {self.root} is empty; adjust data.val_fraction"
            )
        kept = []
        decoded = readers.decoded(
            files, self.image_size, self.crop, self.channels, desc=f"{self.name}/{split}"
        )
        for i, image in decoded:
            out.write(image.contiguous().numpy().data)
            kept.append(i)
        self.unreadable[split] = len(files) - len(kept)
        return self.served_labels([files[i] for i in kept]).long()


class CelebADataModule(FolderDataModule):
    """Aligned CelebA faces (Liu et al. 2015), centre-cropped then resized (default 64x64).

    ``crop`` is a fraction of the image's shorter side (0.8 keeps the central 142 px of the
    178x218 originals, 71 px of a half-size copy), so full and reduced copies give the same
    framing. Reads ``<root>/img_align_celeba`` or ``<root>/celeba/img_align_celeba``; online
    it can download through torchvision (Google Drive quotas permitting).
    """

    name = "celeba"
    geometry = {"image_size": 64, "channels": 3, "num_classes": 0}

    def image_dir(self) -> Path:
        for candidate in (
            self.root / "img_align_celeba",
            self.root / "celeba" / "img_align_celeba",
        ):
            if candidate.is_dir():
                return candidate
        if self.download:
            try:
                import torchvision.datasets as tvd

                tvd.CelebA(str(self.root), split="all", target_type=[], download=True)
                return self.root / "celeba" / "img_align_celeba"
            except Exception as err:  # noqa: BLE001 - any download failure ends in one message
                raise not_found(
                    "CelebA",
                    f"{self.root}/img_align_celeba/*.jpg",
                    f"; download failed: {type(err).__name__}",
                ) from None
        raise not_found("CelebA", f"{self.root}/img_align_celeba/*.jpg")

    def split_files(self, files, split):
        image_dir = self.image_dir()
        for partition in (
            image_dir.parent / "list_eval_partition.txt",
            image_dir.parent / "celeba" / "list_eval_partition.txt",
        ):
            if partition.exists():
                wanted = {"train": "0", "val": "1"}[split]
                names = {
                    line.split()[0]
                    for line in partition.read_text().splitlines()
                    if line.strip() and line.split()[1] == wanted
                }
                return [f for f in files if f.name in names]
        n_val = int(round(self.val_fraction * len(files)))
        return files[len(files) - n_val :] if split == "val" else files[: len(files) - n_val]

    def labels_for(self, files):
        return torch.zeros(len(files), dtype=torch.long)


class SyntheticDataModule(ImageDataModule):
    """Tiny deterministic images generated in memory, for tests: class k is a bright square
    whose position depends on k (with jitter), on a dark noisy background."""

    name = "synthetic"
    geometry = {"image_size": 16, "channels": 1, "num_classes": 4}

    def __init__(self, num_samples: int = 256, num_val: int = 64, **kwargs):
        kwargs["cache_dir"] = None  # generated in a blink: never cached
        super().__init__(**kwargs)
        self.num_samples, self.num_val = num_samples, num_val

    def read_split(self, split):
        n = self.num_samples if split == "train" else self.num_val
        g = torch.Generator().manual_seed(1234 + (split == "val"))
        s, k = self.image_size, max(self.num_classes, 1)
        labels = torch.randint(0, k, (n,), generator=g)
        images = torch.randint(0, 40, (n, self.channels, s, s), generator=g, dtype=torch.uint8)
        side = max(2, s // 3)
        for i in range(n):
            cls = int(labels[i])
            row = (cls * (s - side)) // max(k - 1, 1)
            col = int(torch.randint(0, s - side + 1, (1,), generator=g))
            images[i, :, row : row + side, col : col + side] = 200 + 15 * (i % 4)
        if self.num_classes == 0:
            labels.zero_()
        return images, labels
