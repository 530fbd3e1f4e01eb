"""A small self-supervised face encoder used as an offline, CPU-fast feature extractor for face
datasets (the domain analogue of Inception for FID on CelebA-like data).

Its 256-d globally pooled embedding gives a Frechet distance, KID and precision/recall. It has
no classifier head, so there is no Inception Score in its space. The numbers are NOT
comparable with Inception FID; they are reported under their own names (``val/fd_faces``,
``val/kid_faces_mean``, ``val/precision_faces``). The weights are trained by
``python -m genlab.metrics.train_faces`` (SimCLR, Chen et al. 2020, on the CelebA train split
with genlab's own preprocessing) and shipped in ``genlab/metrics/weights/faces.pt`` as a plain
state dict, with their provenance in ``faces.json`` beside it.

The torch-fidelity extractor ``genlab-faces`` (:class:`FaceFeatureExtractor`) takes uint8
(B, 3, H, W) images as torch-fidelity's own extractors do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.data.convert import from_levels
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.digits import WeightsFileError, load_state, load_weights_file

WEIGHTS = Path(__file__).with_name("weights") / "faces.pt"
FEATURE_DIM = 256
IMAGE_SIZE = 64
TRAIN_HINT = (
    "train them with `python -m genlab.metrics.train_faces data_dir=<dir holding img_align_celeba>`"
)


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class FaceNet(nn.Module):
    """Eight 3x3 convs (BatchNorm + ReLU) in four resolution stages, 32 -> 16 -> 8 -> 4 px
    (a stride-2 conv opens each), widths 32/64/128/256, then global average pooling to a 256-d
    embedding. About 1.2 M parameters. Input (B, 3, 64, 64) in [-1, 1]; other sizes are
    resized (bilinear, antialiased), grey (B, 1, H, W) is repeated to RGB."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            *_conv(3, 32, stride=2),  # 32x32
            *_conv(32, 32),
            *_conv(32, 64, stride=2),  # 16x16
            *_conv(64, 64),
            *_conv(64, 128, stride=2),  # 8x8
            *_conv(128, 128),
            *_conv(128, FEATURE_DIM, stride=2),  # 4x4
            *_conv(FEATURE_DIM, FEATURE_DIM),
        )

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            size = (IMAGE_SIZE, IMAGE_SIZE)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 256) embedding: the last stage's activations averaged over the 4x4 grid."""
        return self.conv(self.prepare(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_face_net(path: str | Path | None = None, device: str = "cpu") -> FaceNet:
    """The shipped (or given) weights, in eval mode. Raises WeightsNotFoundError naming the file
    and the training command, or WeightsFileError for a file that is corrupt, refused (more
    than tensors) or the state of another network."""
    path = Path(path or WEIGHTS)
    if not path.is_file():
        raise WeightsNotFoundError(f"face extractor weights not found at {path}: {TRAIN_HINT}")
    state = load_weights_file(path, "face extractor", TRAIN_HINT)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsFileError(
            f"face extractor weights {path} are not a state dict (name -> tensor): {TRAIN_HINT}"
        )
    net = load_state(FaceNet(), dict(state), path, "face extractor", TRAIN_HINT)
    return net.to(device).eval()


class FaceFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of ``FaceNet``: one feature, ``"256"`` (the pooled embedding),
    the default layer for FID, KID and precision/recall. There is no classifier head, so no
    Inception Score: the default layer for ``"isc"`` raises KeyError. Input uint8
    (B, 3, H, W); it is mapped to [-1, 1] and resized to 64x64 inside ``FaceNet``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_face_net(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("256",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        layers = {"fid": "256", "kid": "256", "prc": "256"}
        if metric not in layers:
            raise KeyError(f"genlab-faces has no layer for {metric!r} (no classifier: no IS)")
        return layers[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        out = {"256": self.net.features(from_levels(x))}
        return tuple(out[name].float() for name in self.features_list)


if "genlab-faces" not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("genlab-faces", FaceFeatureExtractor)
