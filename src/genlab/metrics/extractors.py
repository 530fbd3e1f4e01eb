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

- ``faces`` (``genlab.metrics.faces``): a small self-supervised face network shipped with
  genlab, for face datasets offline (``val/fd_faces``, ...).
- ``dinov2`` (``genlab.metrics.dinov2``): DINOv2 ViT CLS tokens, FD_DINOv2 (``val/fd_dinov2``).
- ``clip`` / ``clip_digits`` (``genlab.metrics.clip_features``): CLIP image embeddings for CMMD
  (``val/cmmd``: open_clip ViT-L/14-336; ``val/cmmd_digits``: the bundled digit CLIP).

All take uint8 (B, 3, H, W) images, as torch-fidelity's extractors do; grey images are
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
from genlab.metrics.common import WeightsNotFoundError, sha256_file, sha256_state
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

    key: str  # one of EXTRACTORS: selects metric names
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


METRIC_LAYERS = ("fid", "kid", "isc", "prc", "cmmd")  # metric -> feature layer, where provided
EXTRACTORS = ("inception", "digits", "faces", "dinov2", "clip", "clip_digits")


def _layers(cls) -> dict[str, str]:
    """metric -> feature layer for the metrics the extractor serves (an extractor without a
    class head has no ``isc``; only CLIP embeddings serve ``cmmd``)."""
    out = {}
    for metric in METRIC_LAYERS:
        try:
            layer = cls.get_default_feature_layer_for_metric(metric)
        except KeyError:
            layer = None
        if layer is not None:
            out[metric] = layer
    return out


@lru_cache(maxsize=4)
def _file_hash(path: str, mtime: float) -> str:
    return sha256_file(path)


def _local_file(path: str | Path | None, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} weights not found at {path}: {fix}")
    return path


def build_extractor(
    key: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    options: Mapping | None = None,
) -> Extractor:
    """One of ``EXTRACTORS``, in eval mode on ``device``. ``weights``: a local weights file
    (None: the default place, a cache or a download); ``options``: ``dinov2.model`` for dinov2,
    ``model`` / ``pretrained`` of the open_clip model for clip. Raises WeightsNotFoundError."""
    options = dict(options or {})
    kwargs: dict = {}
    if key == "inception":
        path = inception_weights_path(weights)
        cls, name, resize = (
            SafeInceptionV3,
            "inception-v3-compat",
            "torch-fidelity TF1-compatible bilinear resize of uint8 images to 299x299",
        )
    elif key == "digits":
        fix = (
            "train them with `python -m genlab.metrics.train_digits data_dir=<dir with MNIST/raw>`"
        )
        path = _local_file(weights or DIGIT_WEIGHTS, "digit classifier", fix)
        cls, name = DigitFeatureExtractor, "genlab-digits"
        resize = "grey average, bilinear antialiased resize to 28x28"
    elif key == "faces":
        from genlab.metrics.faces import WEIGHTS as FACE_WEIGHTS
        from genlab.metrics.faces import FaceFeatureExtractor

        fix = (
            "train them with `python -m genlab.metrics.train_faces data_dir=<dir with "
            "img_align_celeba>`"
        )
        path = _local_file(weights or FACE_WEIGHTS, "face extractor", fix)
        cls, name = FaceFeatureExtractor, "genlab-faces"
        resize = "bilinear antialiased resize to 64x64"
    elif key == "dinov2":
        from genlab.metrics.dinov2 import DEFAULT_MODEL, DINOv2FeatureExtractor, dinov2_weights_path

        kwargs["model"] = options.get("model") or DEFAULT_MODEL
        path = dinov2_weights_path(kwargs["model"], weights)  # None: timm downloads it
        cls, name = DINOv2FeatureExtractor, "genlab-dinov2"
        resize = "bicubic antialiased resize to 224x224, ImageNet mean/std (dgm-eval)"
    elif key in ("clip", "clip_digits"):
        from genlab.metrics.clip_features import CMMD_CLIP, DIGITS_CLIP, CLIPImageFeatureExtractor

        spec = {**(CMMD_CLIP if key == "clip" else DIGITS_CLIP), **options}
        kwargs = {"clip_model": spec["model"], "clip_pretrained": spec.get("pretrained")}
        path = weights
        cls, name = CLIPImageFeatureExtractor, "genlab-clip-image"
        resize = "open_clip's evaluation transform on tensors, L2-normalised embedding"
    else:
        raise ValueError(f"unknown feature extractor {key!r}: use one of {', '.join(EXTRACTORS)}")
    layers = _layers(cls)
    weights_arg = str(path) if path is not None else None
    module = cls(name, sorted(set(layers.values())), feature_extractor_weights_path=weights_arg,
                 **kwargs)  # fmt: skip
    module = module.to(device).eval().requires_grad_(False)
    if key in ("clip", "clip_digits"):
        info = module.info
        return Extractor(key, module, str(info["weights_file"] or info["model"]),
                         info["weights_sha256"], resize, layers)  # fmt: skip
    if path is None:  # dinov2 downloaded by timm: identify it by its weights
        sha = sha256_state(module)
    else:
        sha = _file_hash(str(path.resolve()), path.stat().st_mtime)
    return Extractor(key, module, str(path) if path else f"hf-hub:timm/{kwargs['model']}", sha,
                     resize, layers)  # fmt: skip
