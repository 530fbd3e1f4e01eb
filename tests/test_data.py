"""DataModules: geometry, caching, folders with corrupt files, clear errors for missing data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data import (
    CelebADataModule,
    CorruptImageWarning,
    DatasetNotFoundError,
    FolderDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from genlab.data.convert import to_model, to_uint8
from genlab.data.datamodules import ResumableSampler

from .conftest import SHARED


def _write_images(folder, n, size=(20, 24), color=None):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        array = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
        if color is not None:
            array[:] = torch.tensor(color, dtype=torch.uint8)
        Image.fromarray(array.numpy()).save(folder / f"{i:04d}.jpg")


def test_value_range_round_trip():
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model(k)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), k)


def test_synthetic_batches_are_in_model_range():
    dm = SyntheticDataModule(
        num_samples=32, num_val=8, image_size=12, channels=3, num_classes=3, batch_size=8
    )
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 12, 12)
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1, 2}


def test_folder_with_class_subfolders_and_a_corrupt_jpeg(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root / "cats", 6)
    _write_images(root / "dogs", 6)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    dm = FolderDataModule(
        root=str(root),
        image_size=8,
        channels=3,
        num_classes=2,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
        batch_size=4,
    )
    with pytest.warns(CorruptImageWarning, match=r"skipped 1 unreadable image file\(s\) of 13"):
        data = dm.load_split("train")
    images, labels = data.tensors
    assert images.shape == (12, 3, 8, 8)
    assert labels.tolist() == [0] * 6 + [1] * 6
    assert dm.unreadable == {"train": 1}  # train() records it in summary.json and train.log
    again = FolderDataModule(
        root=str(root), image_size=8, channels=3, num_classes=2, val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"), batch_size=4,
    )  # fmt: skip
    again.load_split("train")  # from the cache: the count came with it
    assert again.unreadable == {"train": 1}


@pytest.mark.parametrize("bad", [0, -2, "abc"])
def test_a_batch_size_that_is_not_positive_is_one_line(bad):
    message = f"data.batch_size must be a positive integer, got {bad!r}"
    with pytest.raises(ValueError, match=message):
        SyntheticDataModule(batch_size=bad)


@pytest.mark.parametrize("n", [64, 67])
def test_the_sampler_shards_an_epoch_across_ranks_and_skips_within_each_share(n):
    """One process: the (seed, epoch) permutation. Two ranks: the same permutation, padded to a
    multiple of the world by repeating its head, dealt out in turn; a rank told to skip k
    serves the tail of its own share (issue 18, item 14)."""
    one = ResumableSampler(n, seed=3)
    one.set_epoch(2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2)).tolist()
    assert list(one) == perm and len(one) == n
    padded = (perm * 2)[: 2 * -(-n // 2)]
    shares = []
    for rank in range(2):
        sampler = ResumableSampler(n, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        share = list(sampler)
        assert share == padded[rank::2] and len(sampler) == len(share) == -(-n // 2)
        sampler.skip = 16
        assert list(sampler) == share[16:]
        assert list(sampler) == share  # the skip applies to one pass only
        shares += share
    assert sorted(set(shares)) == list(range(n)) and len(shares) == len(padded)


def test_lightning_serves_the_sampler_under_ddp_without_wrapping_it():
    """Lightning wraps any sampler that is not a DistributedSampler in its
    DistributedSamplerWrapper, which rebuilt the index list from len() and ran off the end of a
    skipped one; ours is served as it is."""
    import lightning as L
    from torch.utils.data import DataLoader

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    loader = DataLoader(range(64), batch_size=16, sampler=ResumableSampler(64, 0, 2, 1))
    assert not trainer._data_connector._requires_distributed_sampler(loader)
    plain = DataLoader(range(64), batch_size=16, shuffle=True)
    assert trainer._data_connector._requires_distributed_sampler(plain)


def test_16_bit_grey_and_transparent_images_decode_to_what_they_show(tmp_path):
    """A 16-bit grey PNG at half scale decodes to grey 128 (Pillow's convert gives 255), an
    RGBA PNG is composited over white (convert drops alpha: the hidden red would show)."""

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "a_grey16.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, half opaque on the right
    rgba[:, 4:, 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "b_rgba.png")
    assert Image.open(root / "a_grey16.png").mode.startswith("I")
    dm = FolderDataModule(
        root=str(root), image_size=8, channels=3, val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"), batch_size=2,
    )  # fmt: skip
    images = dm.load_split("train").tensors[0]
    grey, composited = images[0], images[1]
    assert grey.min() == grey.max() == 128
    assert composited[:, :, :3].eq(255).all()  # transparent: the white background
    assert composited[0, 2:6, 5].eq(255).all() and composited[1, 2:6, 5].eq(127).all()


def _folder_kwargs(tmp_path, n=10, **extra):
    root = tmp_path / "imgs"
    _write_images(root, n)
    return dict(root=str(root), image_size=8, channels=3, val_fraction=0.2,
                cache_dir=str(tmp_path / "cache"), **extra)  # fmt: skip


def _mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose mapping (/proc/self/maps) holds the tensor's memory, if any."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            path = fields[5].strip() if len(fields) == 6 else ""
            return Path(path) if path.startswith("/") else None
    return None


def test_decoded_images_are_cached_memory_mapped_and_reused(tmp_path, monkeypatch):
    """The cache is a raw uint8 file, its labels and a .json written last; a second DataModule
    maps the file (no decoding, nothing read into memory up front) and serves equal images;
    in_memory=true reads the same images into RAM."""
    kwargs = _folder_kwargs(tmp_path)
    first = FolderDataModule(**kwargs).load_split("train").tensors[0]
    cache = tmp_path / "cache"
    (meta,) = cache.glob("folder-train-3x8x8-*.json")
    stem = meta.with_suffix("")
    assert json.loads(meta.read_text())["shape"] == [8, 3, 8, 8]
    assert stem.with_suffix(".u8").stat().st_size == 8 * 3 * 8 * 8
    assert not list(cache.glob(".*.tmp"))

    def no_decoding(*args, **kw):
        raise AssertionError("images were decoded again despite the cache")

    monkeypatch.setattr("genlab.data.readers.decoded", no_decoding)
    monkeypatch.setattr("genlab.data.readers.decode_images", no_decoding)
    second = FolderDataModule(**kwargs).load_split("train").tensors[0]
    assert torch.equal(first, second)
    assert _mapped_file(second) == stem.with_suffix(".u8")  # mapped, not copied
    loaded = FolderDataModule(**kwargs, in_memory=True).load_split("train").tensors[0]
    assert torch.equal(first, loaded) and _mapped_file(loaded) is None
    # a different resolution is a different cache entry, not a stale hit
    with pytest.raises(AssertionError, match="decoded again"):
        FolderDataModule(**{**kwargs, "image_size": 4}).load_split("train")


@pytest.mark.parametrize("damage", ["no json", "short images", "garbled json"])
def test_an_incomplete_cache_is_rebuilt_not_served(tmp_path, damage):
    """What a kill between the files, a truncated copy or a bad edit leaves is decoded again."""
    kwargs = _folder_kwargs(tmp_path)
    first = FolderDataModule(**kwargs).load_split("train").tensors[0].clone()
    (meta,) = (tmp_path / "cache").glob("folder-train-*.json")
    if damage == "no json":
        meta.unlink()
    elif damage == "short images":
        data = meta.with_suffix(".u8")
        data.write_bytes(data.read_bytes()[:-5])
    else:
        meta.write_text("{not json")
    again = FolderDataModule(**kwargs).load_split("train").tensors[0]
    assert torch.equal(first, again)
    assert json.loads(meta.read_text())["shape"][0] == 8


def test_a_folder_is_decoded_into_the_cache_without_holding_the_split(tmp_path, monkeypatch):
    """Folders stream: each image goes to the file as it is decoded; the in-memory decoder
    (which stacks the split) is never called, and corrupt files are skipped and counted."""
    kwargs = _folder_kwargs(tmp_path, n=12)
    (Path(kwargs["root"]) / "bad.jpg").write_bytes(b"not a jpeg")

    def stacks(*args, **kw):
        raise AssertionError("the split was decoded into memory")

    monkeypatch.setattr("genlab.data.readers.decode_images", stacks)
    dm = FolderDataModule(**{**kwargs, "val_fraction": 0.0})
    with pytest.warns(CorruptImageWarning, match="skipped 1"):
        images = dm.load_split("train").tensors[0]
    assert images.shape == (12, 3, 8, 8) and dm.unreadable["train"] == 1
    (meta,) = (tmp_path / "cache").glob("folder-train-*.json")
    assert json.loads(meta.read_text())["unreadable"] == 1


def test_workers_serve_the_mapped_cache_batch_for_batch(tmp_path):
    """num_workers=2 (forked workers share the mapping) gives the batches of num_workers=0."""
    kwargs = _folder_kwargs(tmp_path, n=40, batch_size=4)
    batches = {}
    for workers in (0, 2):
        dm = FolderDataModule(**kwargs, num_workers=workers)
        dm.setup()
        batches[workers] = [b[0] for b in dm.train_dataloader()]
    assert len(batches[0]) == 8
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b)


def test_celeba_crop_is_a_fraction_so_full_and_half_size_copies_agree(tmp_path):
    """A centred square on a striped background: the same crop fraction frames it the same way
    at 178x218 and at 89x109."""
    for name, (w, h) in {"full": (178, 218), "half": (89, 109)}.items():
        folder = tmp_path / name / "img_align_celeba"
        folder.mkdir(parents=True)
        img = Image.new("RGB", (w, h), (0, 0, 0))
        side = int(0.4 * w)
        img.paste(
            (255, 255, 255), ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        )
        for i in range(4):
            img.save(folder / f"{i:06d}.jpg", quality=95)
    out = {}
    for name in ("full", "half"):
        dm = CelebADataModule(
            root=str(tmp_path / name),
            image_size=16,
            channels=3,
            crop=0.8,
            val_fraction=0.25,
            cache_dir=None,
            download=False,
        )
        out[name] = dm.load_split("train").tensors[0].float()
    assert out["full"].shape == (3, 3, 16, 16)
    assert (out["full"] - out["half"]).abs().mean() < 12  # same framing, up to resampling


def test_missing_celeba_names_the_files_and_the_override(tmp_path):
    dm = CelebADataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert "img_align_celeba" in message and "paths.data_dir" in message
    assert "\n" not in message


def test_missing_mnist_offline_names_the_files_and_the_override(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "empty"), download=False, cache_dir=None)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "paths.data_dir" in message


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="paths.data_dir"):
        FolderDataModule(root=str(tmp_path / "missing")).setup()


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="needs ../shared/assets/mnist")
def test_real_mnist_reads_exactly(tmp_path):
    dm = MNISTDataModule(root=str(SHARED / "mnist"), download=False, cache_dir=str(tmp_path))
    dm.setup()
    train, val = dm.load_split("train").tensors, dm.load_split("val").tensors
    assert train[0].shape == (60000, 1, 28, 28) and val[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(train[1]).tolist()[:3] == [5923, 6742, 5958]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "celeba").exists(), reason="needs ../shared/assets/celeba")
def test_real_celeba_subset_decodes(tmp_path):
    dm = CelebADataModule(root=str(SHARED / "celeba"), image_size=64, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.load_split("train").tensors[0].shape == (9500, 3, 64, 64)
    assert dm.load_split("val").tensors[0].shape == (500, 3, 64, 64)
