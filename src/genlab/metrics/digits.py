"""A small MNIST digit classifier used as an offline, CPU-fast feature extractor for digit
datasets (the domain analogue of Inception for FID/IS on MNIST-like data).

Its 128-d penultimate activations give a Frechet distance and its softmax a classifier
Inception Score. These numbers are NOT comparable with Inception FID/IS; they are reported
under their own names (``val/fd_digits``, ``val/is_digits``). Weights are trained by
``python -m genlab.metrics.train_digits`` and shipped in ``genlab/metrics/weights/digits.pt``
together with their MNIST test accuracy.

Every weights file genlab reads (this classifier, Inception, the noise-aware guidance classifier,
CLIP files) goes through :func:`load_weights_file`: ``torch.load(weights_only=True)``, so a
crafted pickle is refused before it can run code, and a truncated, corrupt or refused file is
one ``WeightsFileError`` line naming the file and what to do.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genlab.utils import UserError, one_line

WEIGHTS = Path(__file__).with_name("weights") / "digits.pt"
FEATURE_DIM = 128
TRAIN_HINT = (
    "train them with `python -m genlab.metrics.train_digits paths.data_dir=<dir with MNIST/raw>`"
)


class WeightsFileError(UserError, ValueError):
    """A weights file exists but cannot be used: truncated or corrupt, holding more than tensors
    (refused: unpickling it could run code), or the state of another network. The message is
    one line naming the file and what to do."""


def weights_error(what: str, path: str | Path, err: BaseException, fix: str) -> WeightsFileError:
    """The one-line error for a weights file that ``torch.load`` rejected."""
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        reason = "refused: it holds pickled objects other than tensors, which could run code"
    else:
        reason = f"truncated or corrupt: {one_line(err)}"
    return WeightsFileError(f"{what} weights {path} cannot be loaded ({reason}): {fix}")


def load_weights_file(path: str | Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and plain
    containers only. Any failure is a one-line ``WeightsFileError`` "<what> weights <path> ...:
    <fix>" (torch's own messages run to many lines, or say only ``[Errno 22]``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- whatever torch.load rejects, the file is unusable
        raise weights_error(what, path, err, fix) from err


def load_state(net: nn.Module, state: Any, path: str | Path, what: str, fix: str) -> nn.Module:
    """``net.load_state_dict(state)`` (strict); a state of another network (missing keys, other
    shapes, not a dict) is a one-line ``WeightsFileError`` naming the file."""
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise WeightsFileError(
            f"{what} weights {path} do not fit {type(net).__name__} ({one_line(err)}): {fix}"
        ) from err
    return net


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
    """The shipped (or given) weights, in eval mode. Raises FileNotFoundError with the fix, or
    WeightsFileError for a file that is corrupt, refused or of another network."""
    path = Path(path or WEIGHTS)
    if not path.exists():
        raise FileNotFoundError(f"digit classifier weights not found at {path}: {TRAIN_HINT}")
    blob = _blob(path)
    net = load_state(DigitNet(), blob["state_dict"], path, "digit classifier", TRAIN_HINT)
    return net.to(device).eval()


def digit_weights_info(path: str | Path | None = None) -> dict:
    """Metadata stored beside the weights (test accuracy, epochs, sha256 of the state)."""
    return {k: v for k, v in _blob(Path(path or WEIGHTS)).items() if k != "state_dict"}


def _blob(path: Path) -> dict:
    """The file written by ``train_digits``: {"state_dict": ..., metadata ...}, loaded safely."""
    blob = load_weights_file(path, "digit classifier", TRAIN_HINT)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise WeightsFileError(
            f"digit classifier weights {path} are not a file train_digits wrote (no state_dict): "
            f"{TRAIN_HINT}"
        )
    return blob
