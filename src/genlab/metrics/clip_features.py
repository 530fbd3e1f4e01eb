"""CLIP image embeddings as a feature space, for CMMD (``genlab.metrics.kernels.cmmd``).

Two extractors, two metric names, since their numbers do not compare:

- ``clip``: an open_clip model, by default ViT-L/14 at 336 px with OpenAI's weights, the
  network Jayasumana et al. 2024 compute CMMD with -> ``val/cmmd``. Loaded, downloaded or
  refused offline by ``genlab.metrics.clip_loader.load_clip`` (one line naming the file).
- ``clip_digits``: the domain CLIP for digits that ships with genlab (``genlab-digits``,
  ``genlab.metrics.train_clip``), offline -> ``val/cmmd_digits``; digit datasets only.

Images go through ``CLIPScore.encode_images``: open_clip's evaluation preprocessing
reproduced on tensors, L2-normalised embeddings.
"""

from __future__ import annotations

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.data.convert import from_levels

CMMD_CLIP = {"model": "ViT-L-14-336", "pretrained": "openai"}  # Jayasumana et al. 2024
DIGITS_CLIP = {"model": "genlab-digits", "pretrained": None}


class CLIPImageFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of a CLIP image tower: feature ``"embedding"`` (L2-normalised) of
    uint8 (B, 3, H, W) images. ``clip_model`` / ``clip_pretrained`` as in ``load_clip``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 clip_model: str = CMMD_CLIP["model"],
                 clip_pretrained: str | None = CMMD_CLIP["pretrained"], **kwargs):  # fmt: skip
        super().__init__(name, features_list)
        from genlab.metrics.clip import CLIPScore  # open_clip is imported when needed

        pretrained = feature_extractor_weights_path or clip_pretrained
        self.clip = CLIPScore(clip_model, pretrained, key="metrics.cmmd_clip")
        self.info = self.clip.info
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("embedding",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"cmmd": "embedding"}.get(metric)

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        images = from_levels(x.float()).to(self.clip.device)
        return (self.clip.encode_images(images).float(),)


if "genlab-clip-image" not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("genlab-clip-image", CLIPImageFeatureExtractor)

__all__ = ["CLIPImageFeatureExtractor", "CMMD_CLIP", "DIGITS_CLIP"]
