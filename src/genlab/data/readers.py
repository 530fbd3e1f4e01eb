"""Dataset readers: each turns a source on disk into uint8 images (N, C, S, S) and int64
labels (N,) at the target resolution. No Lightning here; caching lives in the DataModules.

Missing files raise ``DatasetNotFoundError`` with one line naming the expected files and
the override to use; unreadable images are skipped and counted in one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from genlab.utils import UserError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not where the config says (and could not be downloaded)."""


class CorruptImageWarning(UserWarning):
    """Some image files could not be decoded and were skipped."""


def not_found(dataset: str, expected: str | Path, extra: str = "") -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{dataset} not found: expected {expected}{extra}. Put the files there, or point genlab "
        f"at your copy with paths.data_dir=<dir> (or the GENLAB_DATA_DIR environment variable)."
    )


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) to (N, C, size, size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> ``channels`` (grey <-> RGB, ITU-R 601 luma)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


# ------------------------------------------------------------------ torchvision datasets


def read_torchvision(
    dataset: str, root: str | Path, split: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST, FashionMNIST or CIFAR10 through torchvision; ``split`` is train or val (the
    official test set). Returns uint8 (N, C, H, W) at native size and labels (N,)."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[dataset]
    train = split == "train"
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True"
        expected = _expected_files(dataset, root)
        raise not_found(cls.__name__, expected, f" ({one_line(err, 90)})") from None
    except OSError as err:  # download attempted without network
        raise not_found(
            cls.__name__, _expected_files(dataset, root), f"; download failed: {one_line(err, 90)}"
        ) from None
    data = torch.as_tensor(ds.data)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def _expected_files(dataset: str, root: str | Path) -> str:
    if dataset == "cifar10":
        return f"{Path(root) / 'cifar-10-batches-py'}/ (data_batch_1..5, test_batch)"
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[dataset]
    return (
        f"{Path(root) / folder / 'raw'}/ train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*"
    )


# ------------------------------------------------------------------ image files


def list_images(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    return files


def files_signature(files: list[Path]) -> str:
    """A cheap fingerprint of a file list (count, total size, newest mtime)."""
    size = mtime = 0
    for f in files:
        st = f.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return f"{len(files)}-{size}-{mtime}"


#: what ``_decode`` does to a file, part of the decoded cache's key
DECODER = "pil, 16-bit scaled, alpha over white, centre crop, bicubic"


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images scaled to 8 bits (Pillow's ``convert`` clips them,
    so a 16-bit grey PNG would come out white); images with transparency composited over
    white (``convert`` would drop the alpha and show whatever colour transparent pixels
    hold)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        peak = 65535 if img.mode.startswith("I;16") or values.max() > 255 else 255
        grey = (values.clip(0, peak) * 255 + peak // 2) // peak  # rounded
        return Image.fromarray(grey.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def _decode(path: Path, size: int, crop: float, channels: int) -> torch.Tensor | str:
    """Decode one file (``to_8bit``): centre square crop of side crop * min(W, H), resize to
    size x size."""
    try:
        with Image.open(path) as img:
            img = to_8bit(img).convert("RGB" if channels == 3 else "L")
            w, h = img.size
            side = max(1, round(crop * min(w, h)))
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{path.name}: {err}"
    return array.view(size, size, channels).permute(2, 0, 1)


def decoded(
    files: list[Path], size: int, crop: float, channels: int, desc: str = "decoding"
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode files one after another (in order, on a thread pool): yields ``(index, uint8
    (C, size, size))`` for each readable file; unreadable ones are skipped and reported at the
    end in one ``CorruptImageWarning``. Nothing is held beyond the pool's read-ahead, so a
    caller can stream a dataset larger than memory to disk."""
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"crop is a fraction of the shorter side in (0, 1], got {crop}")
    bad, n_ok = [], 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda f: _decode(f, size, crop, channels), files, chunksize=64)
        for i, res in enumerate(tqdm(results, total=len(files), desc=desc, leave=False)):
            if isinstance(res, str):
                bad.append(res)
            else:
                n_ok += 1
                yield i, res
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {len(files)} (first: {bad[0]})",
            CorruptImageWarning,
            stacklevel=2,
        )
    if not n_ok:
        raise ValueError(f"none of the {len(files)} image files could be read (first: {bad[0]})")


def decode_images(
    files: list[Path], size: int, crop: float, channels: int, desc: str = "decoding"
) -> tuple[torch.Tensor, list[int]]:
    """Decode files to uint8 (N_ok, C, size, size) in memory; returns the tensor and the
    indices kept (see ``decoded``)."""
    kept, out = [], []
    for i, image in decoded(files, size, crop, channels, desc):
        kept.append(i)
        out.append(image)
    return torch.stack(out), kept
