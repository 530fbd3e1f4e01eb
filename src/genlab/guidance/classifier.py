"""Classifier guidance (Dhariwal & Nichol 2021): the gradient of a noise-aware classifier's
log p(y | x_t) steers any diffusion model, conditional or not, toward class y.

The classifier reads the noisy image x_t and its noise level, given as log-SNR
log(a_t / (1 - a_t)) rather than a timestep, so one classifier serves every noise schedule of
the same data. genlab ships one for MNIST (``genlab/guidance/weights/noisy_digits.pt``, trained
by ``python -m genlab.guidance.train_classifier``); ``guidance.classifier=<file>`` takes
another trained by the same script.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genlab.families.contract import EncodedData
from genlab.guidance.base import GuidanceError, cycle
from genlab.guidance.gradient import GradientGuidance
from genlab.metrics.common import WeightsNotFoundError, sha256_file
from genlab.metrics.digits import WeightsFileError, load_state, load_weights_file

WEIGHTS = Path(__file__).with_name("weights") / "noisy_digits.pt"
LOG_SNR_RANGE = (-15.0, 15.0)  # inputs are clamped to it (beyond it the image is noise / clean)


def noise_embedding(log_snr: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) log-SNR -> (B, dim) sinusoidal features of the clamped, rescaled value."""
    x = log_snr.float().clamp(*LOG_SNR_RANGE) / LOG_SNR_RANGE[1]  # in [-1, 1]
    freqs = torch.exp(torch.arange(dim // 2, device=x.device) * (-math.log(100.0) / (dim // 2)))
    angles = x[:, None] * freqs[None] * 100.0
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    """Conv -> GroupNorm -> FiLM(noise) -> SiLU, twice, with a residual connection."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(emb, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class NoisyClassifier(nn.Module):
    """p(y | x_t, log-SNR): three residual blocks at full, 1/2 and 1/4 resolution, each
    modulated by the noise level, then global average pooling and a linear head."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 16, emb: int = 64):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "width": width,
                       "emb": emb}  # fmt: skip
        self.emb_dim = emb
        self.embed = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            [
                _Block(width, width, emb),
                _Block(width, 2 * width, emb),
                _Block(2 * width, 2 * width, emb),
            ]  # fmt: skip
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x_t: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        emb = self.embed(noise_embedding(log_snr.to(x_t.device), self.emb_dim))
        h = self.stem(x_t)
        for i, block in enumerate(self.blocks):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
        return self.head(h.mean((2, 3)))


def load_noisy_classifier(path: str | Path | None = None, device: str = "cpu") -> NoisyClassifier:
    """The shipped (or given) noise-aware classifier in eval mode. Raises WeightsNotFoundError
    for a missing file, WeightsFileError for a corrupt one, one of another network or one
    holding more than tensors (read with weights_only=True: never unpickled beyond them)."""
    path = Path(path or WEIGHTS)
    fix = (
        f"train them with `python -m genlab.guidance.train_classifier data_dir=<dir with "
        f"MNIST/raw> out={path}` (or point guidance.classifier at a file it wrote)"
    )
    if not path.exists():
        raise WeightsNotFoundError(f"noise-aware classifier weights not found at {path}: {fix}")
    what = "noise-aware classifier"
    blob = load_weights_file(path, what, fix)
    if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict):
        raise WeightsFileError(f"{what} weights {path} have no config: {fix}")
    try:
        net = NoisyClassifier(**blob["config"])
    except TypeError as err:
        msg = f"{what} weights {path} have an unknown config ({err}): {fix}"
        raise WeightsFileError(msg) from err
    net = load_state(net, blob.get("state_dict"), path, what, fix)
    return net.to(device).eval().requires_grad_(False)


class ClassifierGuidance(GradientGuidance):
    """Args:
    scale: guidance scale s (gradient of s log p(y | x_t)); 0 is the unguided model.
    classes: the classes the images are steered toward, cycled over the images of every
        ``sample`` call (default: every class); a conditional model's labels take precedence.
    weights: optional relative weights of ``classes`` (consecutive blocks, like prompts).
    classifier: a weights file written by ``genlab.guidance.train_classifier`` (default: the
        shipped MNIST one).
    """

    name = "classifier"
    through_denoiser = False  # the classifier reads x_t itself

    def __init__(
        self,
        scale: float = 30.0,
        classes: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        classifier: str | None = None,
        device: str = "cpu",
    ):
        super().__init__(scale)
        self.path = Path(classifier or WEIGHTS)
        self.net = load_noisy_classifier(self.path, device)
        k = self.net.config["num_classes"]
        self.classes = list(range(k)) if classes is None else [int(c) for c in classes]
        if not self.classes or not all(0 <= c < k for c in self.classes):
            raise GuidanceError(f"guidance.classes must be classes in [0, {k}), got {classes}")
        self.weights = None if weights is None else [float(w) for w in weights]
        cycle(self.classes, self.weights, len(self.classes), what="class")  # checks the weights

    def check(self, model) -> None:
        super().check(model)
        if isinstance(model, EncodedData):
            raise GuidanceError(
                f"guidance=classifier: the noise-aware classifier reads noisy images, and "
                f"{type(model).__name__} denoises latents; use guidance=cfg or guidance=clip"
            )
        channels = int(model.image_shape[0])
        if channels != self.net.config["channels"]:
            raise GuidanceError(
                f"guidance=classifier: the classifier reads {self.net.config['channels']}-channel "
                f"images but the model draws {channels}-channel ones (guidance.classifier=<file>)"
            )

    def targets(self) -> list[int]:
        return self.classes

    def targets_for(self, n: int) -> list[int]:
        return cycle(self.classes, self.weights, n, what="class")

    def batch_targets(self, n: int, index: slice, y: torch.Tensor | None) -> list[int]:
        return y.tolist() if y is not None else self.targets_for(n)[index]

    def objective(self, x, sigma, x0, targets) -> torch.Tensor:
        """log p(y | x_t) of the classifier, which reads the variance-preserving image
        x_t = x / sqrt(1 + sigma^2) and log-SNR = -2 log sigma (the same for every family)."""
        device = next(self.net.parameters()).device
        x_t = x / (1 + sigma**2).sqrt().to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        logits = self.net(x_t.to(device), (-2 * sigma.log()).float().to(device))
        target = torch.as_tensor(targets, device=logits.device)
        return logits.log_softmax(1).gather(1, target[:, None])[:, 0].to(x.device)

    def protocol(self) -> dict:
        return {
            "name": self.name,
            "scale": self.scale,
            "classes": self.classes,
            "weights": self.weights,
            "classifier": {"file": str(self.path), "sha256": sha256_file(self.path)},
        }
