"""The evaluation protocol: parity with torch-fidelity, the Frechet formula, the reference cache,
bits/dim bookkeeping, and the missing-weights paths."""

from __future__ import annotations

import json
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_statistics_to_metric

from genlab.data import MNISTDataModule
from genlab.evaluate import load_images
from genlab.evaluate import main as evaluate_main
from genlab.metrics import Evaluator, WeightsNotFoundError
from genlab.metrics import extractors as extractors_module
from genlab.metrics import features as features_module
from genlab.metrics.extractors import (
    build_extractor,
    inception_weights_path,
    save_random_inception,
)
from genlab.metrics.fidelity import TensorReference
from genlab.metrics.likelihood import (
    bits_per_dim_to_nats,
    categorical_bits_per_dim,
    continuous_to_bits_per_dim,
    importance_weighted_bound,
    nats_to_bits_per_dim,
)

from .conftest import SHARED


def ArrayData(images: torch.Tensor, tag: str = "a") -> TensorReference:
    return TensorReference(images, name="arrays", tag=tag)


class Uint8Set(Dataset):
    """What torch-fidelity reads: one uint8 (3, H, W) tensor per item."""

    def __init__(self, images):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def image_sets(n: int, size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clearly different uint8 sets: smooth colour blobs, and the same plus strong noise."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, channels, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    noisy = (smooth + 0.5 * torch.randn(smooth.shape, generator=g)).clamp(0, 1)
    to_u8 = lambda x: (x * 255).round().to(torch.uint8)
    return to_u8(smooth), to_u8(noisy)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised, re-initialised (non-degenerate) Inception-v3 saved to a file."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random-inception.pth")


def tf_metrics(gen, ref, extractor: str, weights: str, kid_subset_size: int, splits: int) -> dict:
    return torch_fidelity.calculate_metrics(
        input1=Uint8Set(gen),
        input2=Uint8Set(ref),
        cuda=False,
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights,
        kid_subset_size=kid_subset_size,
        isc_splits=splits,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )


@pytest.mark.parametrize("key", [pytest.param("inception", marks=pytest.mark.slow), "digits"])
def test_parity_with_torch_fidelity(key, random_inception, tmp_path):
    n = 20 if key == "inception" else 64
    gen, ref = image_sets(n)
    weights = str(random_inception) if key == "inception" else None
    ev = Evaluator(
        metrics=["fid", "kid", "is", "pr"],
        extractors=[key],
        inception_weights=weights,
        digit_datasets=["arrays"],
        reference_samples=None,
        isc_splits=4,
        progress=False,
    )
    ours = ev.evaluate_images(gen, ArrayData(ref))["metrics"]
    ext = ev.extractors[0]
    theirs = tf_metrics(gen, ref, ext.module.get_name(), ext.weights_path, min(1000, n), splits=4)
    names = {
        "inception": ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"),
        "digits": ("fd_digits", "kid_digits_mean", "kid_digits_std", "is_digits")
        + ("is_digits_std", "precision_digits", "recall_digits"),
    }[key]
    tf_keys = (
        torch_fidelity.KEY_METRIC_FID,
        torch_fidelity.KEY_METRIC_KID_MEAN,
        torch_fidelity.KEY_METRIC_KID_STD,
        torch_fidelity.KEY_METRIC_ISC_MEAN,
        torch_fidelity.KEY_METRIC_ISC_STD,
        torch_fidelity.KEY_METRIC_PRECISION,
        torch_fidelity.KEY_METRIC_RECALL,
    )
    for name, tf_key in zip(names, tf_keys):
        assert ours[f"val/{name}"] == pytest.approx(theirs[tf_key], rel=1e-6, abs=1e-9), name
    # the extractor is not degenerate: the two sets are far apart and images differ
    assert ours[f"val/{names[0]}"] > 1.0
    feats = ev.features(ext, gen)[ext.layers["fid"]]
    assert feats.std(0).mean() > 1e-2 * feats.abs().mean()


def test_frechet_formula_matches_scipy_float64():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b += 0.3
    s1 = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    s2 = {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}
    ours = fid_statistics_to_metric(s1, s2, verbose=False)[torch_fidelity.KEY_METRIC_FID]
    covmean = scipy_linalg.sqrtm(s1["sigma"] @ s2["sigma"]).real
    diff = s1["mu"] - s2["mu"]
    ref = diff @ diff + np.trace(s1["sigma"]) + np.trace(s2["sigma"]) - 2 * np.trace(covmean)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_self_fid_is_zero_and_the_reference_cache_is_hit(tmp_path, monkeypatch):
    images, other = image_sets(200, size=28, channels=1)
    data = ArrayData(images)
    settings = dict(
        metrics=["fid", "kid", "pr"],
        extractors=["digits"],
        digit_datasets=["arrays"],
        reference_samples=None,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    first = Evaluator(**settings)
    same = first.evaluate_images(images, data)["metrics"]
    assert abs(same["val/fd_digits"]) < 1e-3 and same["val/precision_digits"] == 1.0
    assert first.counters["reference_computed"] == 1
    assert list((tmp_path / "cache" / "reference").glob("arrays-train-1x28x28-digits-*.pt"))

    second = Evaluator(**settings)  # a new process would do the same: load from disk
    calls = []
    original = features_module.extract_features
    monkeypatch.setattr(
        features_module,
        "extract_features",
        lambda ext, x, *args, **kw: calls.append(len(x)) or original(ext, x, *args, **kw),
    )
    result = second.evaluate_images(other, data)
    assert second.counters == {
        "reference_computed": 0,
        "reference_loaded": 1,
        "reference_reused": 0,
    }
    assert calls == [200]  # only the generated side went through the extractor
    assert result["metrics"]["val/fd_digits"] > 1.0
    assert result["protocol"]["extractors"]["digits"]["reference_cache"].endswith(".pt")
    # the cache key includes the weights: a different weights file misses the cache
    fake = tmp_path / "digits-copy.pt"
    blob = torch.load(extractors_module.DIGIT_WEIGHTS, weights_only=True)
    blob["state_dict"]["head.bias"] += 1.0
    torch.save(blob, fake)
    third = Evaluator(**settings, digits_weights=str(fake))
    third.evaluate_images(other, data)
    assert third.counters["reference_computed"] == 1


def test_uniform_categorical_is_exactly_8_bits_per_dim():
    x = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8)
    bpd = categorical_bits_per_dim(torch.zeros(3, 256, 2, 5, 5), x)
    assert torch.equal(bpd, torch.full((3,), 8.0))
    # float images on the 8-bit grid give the same answer as uint8
    logits = torch.randn(3, 256, 2, 5, 5)
    assert torch.allclose(
        categorical_bits_per_dim(logits, x.float() / 127.5 - 1), categorical_bits_per_dim(logits, x)
    )
    nats = torch.tensor([100.0, 7.0])
    assert torch.allclose(bits_per_dim_to_nats(nats_to_bits_per_dim(nats, 784), 784), nats)
    # a uniform density over the 256 bins (width 2/255 each, so an interval of 512/255) is the
    # uniform mass: 8 bits/dim
    nll_density = torch.tensor(10 * math.log(512 / 255), dtype=torch.float64)
    assert continuous_to_bits_per_dim(nll_density, 10).item() == pytest.approx(8.0, abs=1e-12)


def test_importance_weighted_bound_is_above_the_elbo_and_rises_with_k():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(64, 5, generator=g) * 2  # K=64 samples for 5 images
    elbo = log_w.mean(0)
    bounds = [importance_weighted_bound(log_w[:k]) for k in (1, 4, 64)]
    assert torch.allclose(bounds[0], log_w[0])
    assert (importance_weighted_bound(log_w) >= elbo).all()
    # averaged over disjoint groups, the K-sample bound is non-decreasing in K (Burda et al.)
    avg = [
        importance_weighted_bound(log_w.view(64 // k, k, 5).transpose(0, 1)).mean()
        for k in (1, 4, 16, 64)
    ]
    assert all(a <= b + 1e-6 for a, b in zip(avg, avg[1:]))


def test_inception_weights_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    tried = []

    def offline(url, dst, progress=True):
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    extractors_module._download.cache_clear()
    with pytest.raises(WeightsNotFoundError) as err:
        inception_weights_path()
    message = str(err.value)
    assert "\n" not in message and "metrics.inception_weights=" in message
    assert (
        extractors_module.INCEPTION_FILE in message
        and extractors_module.URL_INCEPTION_V3 in message
    )
    assert tried == [extractors_module.URL_INCEPTION_V3]
    with pytest.raises(WeightsNotFoundError):  # the failure is remembered: one try per process
        inception_weights_path()
    assert len(tried) == 1
    extractors_module._download.cache_clear()
    # a file in the torch hub cache is used as torch-fidelity would
    cached = tmp_path / "hub" / "checkpoints" / extractors_module.INCEPTION_FILE
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    assert inception_weights_path() == cached
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):
        build_extractor("inception", tmp_path / "missing.pth")


def test_evaluator_warns_in_training_mode_and_raises_in_evaluate_mode(tmp_path, caplog):
    images, _ = image_sets(16, size=28, channels=1)
    missing = str(tmp_path / "missing.pth")
    ev = Evaluator(
        metrics=["fid"],
        extractors=["inception", "digits"],
        inception_weights=missing,
        digit_datasets=["arrays"],
        reference_samples=None,
        progress=False,
    )
    result = ev.evaluate_images(images, ArrayData(images))
    assert "val/fd_digits" in result["metrics"] and "val/fid" not in result["metrics"]
    assert missing in result["protocol"]["not_computed"]["inception"]
    assert sum("metrics.inception_weights=" in r.message for r in caplog.records) == 1
    strict = Evaluator(
        metrics=["fid"],
        extractors=["inception"],
        inception_weights=missing,
        on_missing_weights="raise",
        progress=False,
    )
    with pytest.raises(WeightsNotFoundError, match="metrics.inception_weights="):
        strict.evaluate_images(images, ArrayData(images))


@pytest.fixture
def mnist_root():
    root = SHARED / "mnist"
    if not root.exists():
        pytest.skip("needs ../shared/assets/mnist")
    return root


def test_evaluate_cli_on_images_in_three_formats(tmp_path, mnist_root):
    images = (
        MNISTDataModule(root=str(mnist_root), download=False).load_split("val").tensors[0][:200]
    )
    torch.save({"images": images}, tmp_path / "s.pt")
    np.savez(tmp_path / "s.npz", images.permute(0, 2, 3, 1).numpy())  # NHWC, as ADM writes
    folder = tmp_path / "pngs"
    folder.mkdir()
    from PIL import Image

    for i, im in enumerate(images[:200]):
        Image.fromarray(im[0].numpy()).save(folder / f"{i:04d}.png")
    for source in ("s.pt", "s.npz", "pngs"):
        assert torch.equal(load_images(tmp_path / source), images)
    common = [
        "data=mnist",
        f"paths.data_dir={mnist_root}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "+metrics.extractors=[digits]",
        "+metrics.reference_samples=2000",
        "device=cpu",
    ]
    results = [
        evaluate_main([f"images={tmp_path / s}", *common, f"out={tmp_path / s}.json"])
        for s in ("s.pt", "s.npz")
    ]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["metrics"]["val/fd_digits"] < 5.0  # real test digits vs train digits
    assert (
        json.loads((tmp_path / "s.pt.json").read_text())["protocol"]["reference"]["split"]
        == "train"
    )
    with pytest.raises(SystemExit, match="metrics.inception_weights="):
        evaluate_main(
            [
                f"images={tmp_path / 's.pt'}",
                *common[:3],
                "device=cpu",
                f"+metrics.inception_weights={tmp_path / 'nope.pth'}",
            ]
        )
    with pytest.raises(SystemExit, match="expected uint8"):
        torch.save(images.float(), tmp_path / "f.pt")
        evaluate_main([f"images={tmp_path / 'f.pt'}", *common])
    with pytest.raises(SystemExit, match="num_sampels"):  # Hydra: not in the config
        evaluate_main([f"images={tmp_path / 's.pt'}", *common, "num_sampels=3"])
    with pytest.raises(SystemExit, match="unknown metrics setting.*num_sampels"):
        evaluate_main([f"images={tmp_path / 's.pt'}", *common, "+metrics.num_sampels=3"])


@pytest.mark.slow
def test_digit_frechet_distance_separates_real_from_noise_and_blur(tmp_path, mnist_root):
    data = MNISTDataModule(root=str(mnist_root), download=False, cache_dir=str(tmp_path))
    test_images = data.load_split("val").tensors[0]
    blurred = torch.nn.functional.avg_pool2d(test_images.float(), 5, 1, 2).round().to(torch.uint8)
    noise = torch.randint(0, 256, test_images.shape, dtype=torch.uint8)
    ev = Evaluator(
        metrics=["fid", "is"],
        extractors=["digits"],
        reference_samples=None,
        cache_dir=str(tmp_path),
        progress=False,
    )
    fd = {
        name: ev.evaluate_images(x, data)["metrics"]
        for name, x in (("test", test_images), ("blur", blurred), ("noise", noise))
    }
    assert fd["test"]["val/fd_digits"] < 1.0
    assert fd["blur"]["val/fd_digits"] > 20 * fd["test"]["val/fd_digits"]
    assert fd["noise"]["val/fd_digits"] > 100 * fd["test"]["val/fd_digits"]
    assert fd["test"]["val/is_digits"] > 9.0 > fd["blur"]["val/is_digits"]
