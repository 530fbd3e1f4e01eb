"""The shipped digit classifier: loads through the real path, and is as accurate as recorded."""

import pytest
import torch

from genlab.data import MNISTDataModule, to_model
from genlab.metrics.digits import (
    FEATURE_DIM,
    WEIGHTS,
    DigitNet,
    digit_weights_info,
    load_digit_classifier,
)

from .conftest import SHARED


def test_shapes_and_input_handling():
    net = DigitNet().eval()
    for shape in [(2, 1, 28, 28), (2, 1, 32, 32), (2, 3, 28, 28)]:
        x = torch.rand(shape) * 2 - 1
        assert net(x).shape == (2, 10) and net.features(x).shape == (2, FEATURE_DIM)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m genlab.metrics.train_digits"):
        load_digit_classifier(tmp_path / "nope.pt")


def test_shipped_weights_are_small_and_recorded():
    assert WEIGHTS.stat().st_size < 3 * 2**20
    info = digit_weights_info()
    assert info["test_accuracy"] >= 0.99 and len(info["sha256"]) == 64


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="needs ../shared/assets/mnist")
def test_shipped_weights_reach_99_percent_on_mnist_test():
    images, labels = (
        MNISTDataModule(root=str(SHARED / "mnist"), download=False).load_split("val").tensors
    )
    net = load_digit_classifier()
    with torch.no_grad():
        pred = torch.cat(
            [net(to_model(images[i : i + 1000])).argmax(1) for i in range(0, 10000, 1000)]
        )
    accuracy = (pred == labels).float().mean().item()
    assert accuracy >= 0.99
    assert accuracy == pytest.approx(digit_weights_info()["test_accuracy"], abs=1e-4)
