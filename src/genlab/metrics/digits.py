"""A small MNIST digit classifier used as an offline, CPU-fast feature extractor for digit
datasets (the domain analogue of Inception for FID/IS on MNIST-like data).

Its 128-d penultimate activations give a Frechet distance and its softmax a classifier
Inception Score. These numbers are NOT comparable with Inception FID/IS; they are reported
under their own names (``val/fd_digits``, ``val/is_digits``). Weights are trained by
``python -m genlab.metrics.train_digits`` and shipped in ``genlab/metrics/weights/digits.pt``
together with their MNIST test accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).with_name("weights") / "digits.pt"
FEATURE_DIM = 128


class DigitNet(nn.Module):
    """Conv(32)x2 -> pool -> Conv(64)x2 -> pool -> FC(128) -> FC(10), BatchNorm + ReLU.
    Input (B, 1, 28, 28) in [-1, 1] (other sizes are resized, RGB is averaged to grey)."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.conv = nn.Sequential(
            *block(1, 32),
            *block(32, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, FEATURE_DIM, bias=False),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(
                x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False
            )
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) penultimate activations."""
        return self.fc(self.conv(self.prepare(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits."""
        return self.head(self.dropout(self.features(x)))


def load_digit_classifier(path: str | Path | None = None, device: str = "cpu") -> DigitNet:
    """The shipped (or given) weights, in eval mode. Raises FileNotFoundError with the fix."""
    path = Path(path or WEIGHTS)
    if not path.exists():
        raise FileNotFoundError(
            f"digit classifier weights not found at {path}: train them with "
            f"`python -m genlab.metrics.train_digits paths.data_dir=<dir with MNIST/raw>`"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitNet()
    net.load_state_dict(blob["state_dict"])
    return net.to(device).eval()


def digit_weights_info(path: str | Path | None = None) -> dict:
    """Metadata stored beside the weights (test accuracy, epochs, sha256 of the state)."""
    blob = torch.load(Path(path or WEIGHTS), map_location="cpu", weights_only=True)
    return {k: v for k, v in blob.items() if k != "state_dict"}
