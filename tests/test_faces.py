"""The face encoder behind fd_faces: loading (and refusing) weights, the torch-fidelity
extractor, the training command on tiny data, and, on the real CelebA subset with the shipped
weights, that its Frechet distance separates held-out faces from damaged or foreign images."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image

from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.digits import WeightsFileError
from genlab.metrics.faces import (
    FEATURE_DIM,
    WEIGHTS,
    FaceFeatureExtractor,
    FaceNet,
    load_face_net,
)
from genlab.metrics.train_faces import main as train_faces

from .conftest import REPO, SHARED

HAVE_DATA = (SHARED / "celeba" / "img_align_celeba").is_dir() and (SHARED / "mnist").is_dir()


def _random_weights(path, seed=0):
    torch.manual_seed(seed)
    torch.save(FaceNet().state_dict(), path)
    return path


def test_saved_net_loads_and_gives_deterministic_finite_features(tmp_path):
    path = _random_weights(tmp_path / "faces.pt")
    net = load_face_net(path)
    assert not net.training
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    fx = FaceFeatureExtractor("genlab-faces", ["256"], feature_extractor_weights_path=str(path))
    (a,), (b,) = fx(x), fx(x)
    assert a.shape == (4, FEATURE_DIM) and torch.isfinite(a).all() and torch.equal(a, b)
    direct = net.features(x.float() / 127.5 - 1)
    torch.testing.assert_close(a, direct)
    other_size = net.features(torch.rand(2, 3, 89, 109) * 2 - 1)  # resized inside, as documented
    grey = net.features(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert other_size.shape == grey.shape == (2, FEATURE_DIM)
    assert fx.get_default_feature_layer_for_metric("fid") == "256"
    with pytest.raises(KeyError, match="no IS"):
        fx.get_default_feature_layer_for_metric("isc")
    with pytest.raises(ValueError, match="uint8"):
        fx(x.float())


def test_missing_weights_name_the_file_and_the_training_command(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsNotFoundError) as info:
        load_face_net(missing)
    message = str(info.value)
    assert str(missing) in message and "python -m genlab.metrics.train_faces" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["truncated", "pickle", "other-net"])
def test_unusable_weights_are_one_line(tmp_path, content):
    path = tmp_path / "faces.pt"
    if content == "pickle":
        torch.save({"conv.0.weight": object()}, path)
    elif content == "other-net":
        torch.save({"conv.0.weight": torch.zeros(3)}, path)
    else:  # the first half of a real file, as an interrupted copy leaves it
        data = _random_weights(tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError) as info:
        load_face_net(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "train_faces" in message
    assert ("refused" in message) == (content == "pickle")


def test_train_faces_runs_on_a_tiny_folder_and_writes_a_loadable_file(tmp_path):
    folder = tmp_path / "data" / "img_align_celeba"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        pixels = torch.randint(0, 256, (30, 24, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:06d}.png")
    out = tmp_path / "w" / "faces.pt"
    info = train_faces(
        [
            f"data_dir={tmp_path / 'data'}",
            f"out={out}",
            "steps=2",
            "batch=8",
            "seed=0",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert load_face_net(out).features(torch.zeros(1, 3, 64, 64)).shape == (1, FEATURE_DIM)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(info))
    assert written["steps"] == 2 and written["data"]["train_images"] == 19
    assert written["data"]["val_images"] == 1 and len(written["sha256"]) == 64
    assert "train_faces" in written["command"] and written["final_loss"] > 0


def _bench():
    spec = importlib.util.spec_from_file_location(
        "extractor_validation", REPO / "bench" / "extractor_validation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip("needs ../shared/assets/celeba and ../shared/assets/mnist")
    bench = _bench()
    train, val = bench.load_celeba(SHARED, str(tmp_path_factory.mktemp("celeba_cache")))
    _, mnist = bench.load_mnist(SHARED)
    return bench, train, val, mnist


def test_shipped_weights_are_small_and_recorded():
    assert WEIGHTS.stat().st_size < 6 * 2**20
    info = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert info["sha256"] == __import__("hashlib").sha256(WEIGHTS.read_bytes()).hexdigest()


def test_fd_faces_separates_held_out_faces_from_noise_blur_and_digits(faces):
    """FD(val, train) is below a fifth of FD against pure Gaussian noise images, val blurred
    with sigma 2 px, and MNIST digits (3 channels, 64x64). Reference: 4000 train images."""
    bench, train, val, mnist = faces
    features = bench.extractor("faces")
    stats = bench.fid_features_to_statistics(features(train[:4000]))
    g = torch.Generator().manual_seed(0)
    noise = bench.to_uint8(0.5 * torch.randn(val.shape, generator=g))
    fd = {
        "val": bench.frechet(stats, features(val)),
        "noise": bench.frechet(stats, features(noise)),
        "blur": bench.frechet(stats, features(bench.gaussian_blur(val, 2.0))),
        "digits": bench.frechet(stats, features(bench.match(mnist[: len(val)], val))),
    }
    for name in ("noise", "blur", "digits"):
        assert fd["val"] < fd[name] / 5, fd


@pytest.mark.slow
def test_fd_faces_rises_with_every_disturbance(faces):
    bench, train, val, mnist = faces
    strengths = {name: values[:1] + values[1::2][:3] for name, values in bench.STRENGTHS.items()}
    curves = bench.curves(bench.extractor("faces"), train, val[:500], mnist, strengths)
    for name, values in curves.items():
        assert bench.monotonic(values), (name, values)
