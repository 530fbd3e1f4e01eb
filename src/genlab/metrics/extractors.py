"""Feature extractors for FID / IS / KID / precision-recall, as torch-fidelity feature
extractors (so torch-fidelity's own metric code runs on their features).

- ``inception``: torch-fidelity's ``inception-v3-compat``, the TF-Inception port that papers'
  FID numbers come from. Its weights file is looked up (``path``, then the torch hub cache) and
  downloaded as torch-fidelity does when online; otherwise ``WeightsNotFoundError`` names the
  file, its URL and ``metrics.inception_weights=<path>``. genlab reads the file itself with
  ``weights_only=True`` (``SafeInceptionV3``): torch-fidelity would unpickle it with
  ``weights_only=False``, running whatever code a crafted file holds.
- ``digits``: ``genlab-digits``, the small MNIST classifier shipped in ``metrics/weights``: a
  128-d penultimate layer for Frechet distance / KID / precision-recall and 10 logits for a
  classifier Inception Score. Offline and fast on a CPU; its numbers are not comparable with
  Inception FID and are logged under their own names (``val/fd_digits``, ``val/is_digits``).

Both take uint8 (B, 3, H, W) images, as torch-fidelity's extractors do; grey images are
repeated to RGB before they get here (``genlab.data.convert.to_rgb_uint8``).
"""

from __future__ import annotations

import io
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    BasicConv2d,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.data.convert import from_levels
from genlab.metrics.common import WeightsNotFoundError, sha256_file
from genlab.metrics.digits import WEIGHTS as DIGIT_WEIGHTS
from genlab.metrics.digits import (
    WeightsFileError,
    load_digit_classifier,
    load_weights_file,
)
from genlab.utils import one_line

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
INCEPTION_HINT = f"download {URL_INCEPTION_V3} and set metrics.inception_weights=<path to the file>"
DOWNLOAD_TIMEOUT_S = 30


# ------------------------------------------------------------------ the digit classifier
class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of ``DigitNet``: features ``"128"`` (penultimate, after ReLU)
    and ``"logits"`` (10 classes). Input uint8 (B, 3, H, W); it is averaged to grey, mapped to
    [-1, 1] and resized to 28x28 (bilinear, antialiased) inside ``DigitNet``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_digit_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        grey = from_levels(x.float().mean(1, keepdim=True))
        feats = self.net.features(grey)
        out = {"128": feats, "logits": self.net.head(feats)}
        return tuple(out[name].float() for name in self.features_list)


if "genlab-digits" not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("genlab-digits", DigitFeatureExtractor)


# ------------------------------------------------------------------ Inception weights
class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` whose weights file genlab reads itself, with
    ``torch.load(weights_only=True)``: torch-fidelity's constructor unpickles the file it is
    given with ``weights_only=False``, which runs any code a crafted file holds. It is handed
    the checked state dict re-serialised in memory (tensors only), never the file. A refused,
    corrupt or mismatching file is one ``WeightsFileError`` line naming it."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if not feature_extractor_weights_path:  # torch-fidelity would download and unpickle
            raise WeightsNotFoundError(f"no Inception weights file given: {INCEPTION_HINT}")
        path = feature_extractor_weights_path
        safe = _in_memory(load_inception_state(path))
        try:
            super().__init__(name, features_list, feature_extractor_weights_path=safe, **kwargs)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys, other shapes
            raise WeightsFileError(
                f"Inception weights {path} do not fit inception-v3-compat ({one_line(err)}): "
                f"{INCEPTION_HINT}"
            ) from err


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception state dict in ``path``, read with ``weights_only=True``; WeightsFileError
    when it is unreadable, refused or not a {name: tensor} dict."""
    state = load_weights_file(path, "Inception", INCEPTION_HINT)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsFileError(
            f"Inception weights {path} are not a state dict (name -> tensor): {INCEPTION_HINT}"
        )
    return dict(state)


def _in_memory(state: dict[str, torch.Tensor]) -> io.BytesIO:
    """``state`` as a torch.save file in memory (what torch-fidelity's constructor loads)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def inception_weights_path(path: str | Path | None = None, download: bool = True) -> Path:
    """The Inception-v3 weights file torch-fidelity uses: ``path`` if given, else the torch hub
    cache (``$TORCH_HOME/hub/checkpoints``), downloaded there when missing and online."""
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"Inception weights not found at {path}: {INCEPTION_HINT}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    reason = "downloads disabled"
    if download:
        reason = _download(URL_INCEPTION_V3, cached)
        if reason is None:
            return cached
    raise WeightsNotFoundError(
        f"Inception weights {INCEPTION_FILE} not found in {cached.parent} and not downloadable "
        f"({reason}): download {URL_INCEPTION_V3} and put it there, or set "
        f"metrics.inception_weights=<path to the file>"
    )


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised ``inception-v3-compat`` state dict to ``path``: the real
    architecture and cost with meaningless features, for offline tests and benchmarks.

    PyTorch's default initialisation shrinks activations layer after layer, so through
    Inception's depth every image would get nearly the same features (and FID ~ 0 for any
    inputs). Convolutions are re-drawn He-normal (std sqrt(2 / fan_in)) with identity
    BatchNorm, which keeps activations at scale and features distinct per image."""

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # architecture only, nothing to load
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _Unloaded("inception-v3-compat", ["2048"], _in_memory({}))  # it insists on a file
    g = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, BasicConv2d):
            w = module.conv.weight
            w.data = torch.randn(w.shape, generator=g) * math.sqrt(2.0 / w[0].numel())
    net.fc.weight.data = torch.randn(net.fc.weight.shape, generator=g) / math.sqrt(2048)
    torch.save(net.state_dict(), path)
    return path


@lru_cache(maxsize=8)
def _download(url: str, target: Path) -> str | None:
    """Download url to target (atomically, via torch.hub); None on success, else the reason.
    Failures are remembered for the process so an offline run tries once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
        return None
    except Exception as err:  # no network, proxy, HTTP error: all mean "provide the file"
        return f"{type(err).__name__}: {err}".splitlines()[0][:200]
    finally:
        socket.setdefaulttimeout(previous)


# ------------------------------------------------------------------ what the evaluator uses
@dataclass
class Extractor:
    """A ready feature extractor and what the protocol records about it."""

    key: str  # "inception" | "digits": selects metric names
    module: FeatureExtractorBase
    weights_path: str
    weights_sha256: str
    resize: str
    layers: dict[str, str] = field(default_factory=dict)  # metric -> feature layer

    def protocol(self) -> dict:
        return {
            "name": self.module.get_name(),
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "resize": self.resize,
            "layers": dict(self.layers),
        }


def _layers(cls) -> dict[str, str]:
    return {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "isc", "prc")}


@lru_cache(maxsize=4)
def _file_hash(path: str, mtime: float) -> str:
    return sha256_file(path)


def build_extractor(
    key: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> Extractor:
    """``inception`` or ``digits``, in eval mode on ``device``. Raises WeightsNotFoundError."""
    if key == "inception":
        path = inception_weights_path(weights)
        cls, name, resize = (
            SafeInceptionV3,
            "inception-v3-compat",
            "torch-fidelity TF1-compatible bilinear resize of uint8 images to 299x299",
        )
    elif key == "digits":
        path = Path(weights or DIGIT_WEIGHTS)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"digit classifier weights not found at {path}: train them with "
                f"`python -m genlab.metrics.train_digits data_dir=<dir with MNIST/raw>`"
            )
        cls, name, resize = (
            DigitFeatureExtractor,
            "genlab-digits",
            "grey average, bilinear antialiased resize to 28x28",
        )
    else:
        raise ValueError(f"unknown feature extractor {key!r}: use inception or digits")
    layers = _layers(cls)
    module = cls(name, sorted(set(layers.values())), feature_extractor_weights_path=str(path))
    module = module.to(device).eval().requires_grad_(False)
    sha = _file_hash(str(path.resolve()), path.stat().st_mtime)
    return Extractor(key, module, str(path), sha, resize, layers)
