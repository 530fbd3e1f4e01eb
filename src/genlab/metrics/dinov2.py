"""DINOv2 features for FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics and their unfair treatment of diffusion models", NeurIPS): the Frechet
distance, KID, precision/recall and density/coverage on the CLS token of a DINOv2 ViT
(Oquab et al. 2023), which ranks models closer to human judgement than Inception does.

The network is timm's port (``vit_base_patch14_dinov2.lvd142m`` = ViT-B/14, or
``vit_large_patch14_dinov2.lvd142m`` = ViT-L/14, the one Stein et al. use), built at 224x224
as their dgm-eval does: uint8 images to [0, 1], bicubic antialiased resize to 224x224, ImageNet
mean/std, the final-norm CLS token (768-d for B/14, 1024-d for L/14).

Weights, in order: ``metrics.dinov2.weights=<file>`` (a timm or the original facebookresearch
state dict, ``.pth`` or ``.safetensors``; timm's filter converts the original keys and resizes
the position embeddings), else the Hugging Face cache, else a download through timm when the
hub is reachable. Offline with none of them: one ``WeightsNotFoundError`` line that names the
file and where to put it. Files are read by genlab (``weights_only=True``; safetensors) and the
state dict handed to timm.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.digits import WeightsFileError, load_weights_file
from genlab.utils import one_line, reachable

DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"
IMAGE_SIZE = 224  # dgm-eval's input size for DINOv2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HF_FILE = "model.safetensors"


def _hint(model: str) -> str:
    repo = f"timm/{model}"
    return (
        f"download {HF_FILE} of https://huggingface.co/{repo} (or the original "
        f"facebookresearch DINOv2 .pth) and set metrics.dinov2.weights=<path to the file>"
    )


def _read(path: Path, model: str) -> dict:
    """The state dict in ``path``: safetensors, or torch.load with ``weights_only=True``
    (genlab's reader: a crafted pickle is refused, a corrupt file is one line)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 -- any unreadable file is one line
            raise WeightsFileError(
                f"DINOv2 weights {path} are not a readable safetensors file ({one_line(err)}): "
                f"{_hint(model)}"
            ) from err
    state = load_weights_file(path, "DINOv2", _hint(model))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint around the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"DINOv2 weights {path} are not a state dict: {_hint(model)}")
    return state


def _create(model: str, weights: Path | None):
    """timm's ``model`` at 224x224 without a head: random (no weights), or loaded from the state
    dict in ``weights`` through timm's filter (original DINOv2 keys converted, position
    embeddings resized)."""
    import timm  # installed with open_clip; imported only when DINOv2 is asked for

    kwargs = dict(num_classes=0, img_size=IMAGE_SIZE)
    if weights is None:
        return timm.create_model(model, pretrained=False, **kwargs)
    state = _read(Path(weights), model)
    try:
        return timm.create_model(
            model, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as err:  # other keys or shapes
        raise WeightsFileError(
            f"DINOv2 weights {weights} do not fit {model} ({one_line(err)}): {_hint(model)}"
        ) from err


def dinov2_weights_path(model: str = DEFAULT_MODEL, weights: str | Path | None = None,
                        download: bool = True) -> Path | None:  # fmt: skip
    """The local weights file to load: ``weights`` if given, else the Hugging Face cache's copy;
    None when neither exists but the hub is reachable (timm downloads it); otherwise
    ``WeightsNotFoundError``."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"DINOv2 weights not found at {path}: {_hint(model)}")
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(f"timm/{model}", HF_FILE)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    if download and reachable("huggingface.co"):
        return None
    raise WeightsNotFoundError(
        f"DINOv2 weights {HF_FILE} of timm/{model} are not in the Hugging Face cache and "
        f"huggingface.co is not reachable: {_hint(model)}"
    )


def load_dinov2(model: str = DEFAULT_MODEL, weights: str | Path | None = None) -> torch.nn.Module:
    """The DINOv2 ViT ``model`` in eval mode with its pretrained weights (see the module doc)."""
    path = dinov2_weights_path(model, weights)
    if path is None:  # online: timm downloads into the Hugging Face cache
        import timm

        net = timm.create_model(model, pretrained=True, num_classes=0, img_size=IMAGE_SIZE)
    else:
        net = _create(model, path)
    return net.eval().requires_grad_(False)


def save_random_dinov2(path: str | Path, model: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """Write a randomly initialised DINOv2 ``model`` state dict (timm keys) to ``path``, for
    offline tests and benchmarks. timm's initialisation makes every image's CLS token nearly the
    same (LayerScale starts at 1e-5 and weights at std 0.02, so the blocks add almost nothing):
    LayerScale is set to 1 and linear/conv weights re-drawn at std 1/sqrt(fan_in), which keeps
    features distinct per image."""
    torch.manual_seed(seed)
    net = _create(model, None)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".gamma"):  # LayerScale
                p.fill_(1.0)
            elif p.dim() >= 2 and "pos_embed" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class DINOv2FeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of a DINOv2 ViT: feature ``"cls"`` (the final-norm CLS token) of
    uint8 (B, 3, H, W) images, preprocessed as dgm-eval does (see the module doc). No Inception
    Score: DINOv2 has no class head. ``feature_extractor_weights_path``: the weights file (None:
    cache or download); ``model``: the timm name."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 model: str = DEFAULT_MODEL, **kwargs):  # fmt: skip
        super().__init__(name, features_list)
        self.net = load_dinov2(model, feature_extractor_weights_path)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("cls",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "cls", "kid": "cls", "prc": "cls"}.get(metric)

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        x = x.float() / 255.0
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)  # fmt: skip
        return (self.net((x - self.mean) / self.std).float(),)


if "genlab-dinov2" not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("genlab-dinov2", DINOv2FeatureExtractor)

__all__ = ["DEFAULT_MODEL", "DINOv2FeatureExtractor", "load_dinov2", "save_random_dinov2"]
