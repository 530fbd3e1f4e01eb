"""CLIP score: how well images match text prompts, measured with an open_clip model.

Definition (per image-prompt pair, Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning", EMNLP; CLIP from Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", ICML)::

    s(I, T) = 100 * max(cos(E_I(I), E_T(T)), 0)           in [0, 100]
    CLIPScore = mean over the N pairs of s(I_i, T_i)

with E_I, E_T the CLIP image and text embeddings. Hessel et al. use the weight w = 2.5 and clamp
each pair at 0; genlab clamps each pair the same way but uses the weight 100 that torchmetrics and
most text-to-image papers report. No prompt prefix is added (Hessel et al. prepend "A photo
depicts"); prompts are scored as given.

How this differs from torchmetrics' ``CLIPScore`` (read in torchmetrics 1.9.0): its docstring
writes ``max(100 * cos(E_I, E_C), 0)``, but the code computes the unclamped per-pair value
``score = 100 * (source_features * target_features).sum(axis=-1)``
(``functional/multimodal/clip_score.py``), averages it and clamps only the MEAN:
``torch.max(self.score / self.n_samples, torch.zeros_like(self.score))`` in
``multimodal/clip_score.py`` (``compute``), and ``score = score.mean(0); return
torch.max(score, torch.zeros_like(score))`` in the functional ``clip_score``. genlab clamps EACH
pair at 0 before averaging, so a pair with a negative cosine contributes 0 rather than pulling
the mean down. The two agree whenever every cosine is >= 0 (the usual case for real CLIP
weights and sensible prompts) and otherwise genlab's value is the larger one.

Images are float (N, C, H, W) in [-1, 1] with C in {1, 3}. Preprocessing reproduces open_clip's
evaluation transform with differentiable tensor ops (grey repeated to RGB; shorter side resized
with antialiased bicubic, or whatever interpolation the model's preprocess config names; centre
crop; the model's mean/std), so the image path can carry gradients (CLIP guidance).

The model is loaded by ``genlab.metrics.clip_loader.load_clip`` (open_clip names and tags,
local open_clip folders, the bundled digit CLIP), which never falls back to random weights and
reads weights files with ``weights_only=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.data.convert import to_unit
from genlab.metrics.clip_loader import load_clip

WEIGHT = 100.0  # torchmetrics' and most papers' scale; Hessel et al. use 2.5
LONG_PROMPTS = ("truncate", "error")


# ------------------------------------------------------------------ the metric
class CLIPScore(nn.Module):
    """Per-pair CLIP score ``100 * max(cos(E_I, E_T), 0)`` and its mean (see the module doc).

    ``model``/``pretrained``/``device`` as in :func:`load_clip`. ``long_prompts``: what to do with
    a prompt longer than the text encoder's context length (start/end tokens included):
    "truncate" (one warning per call; the end-of-text token is kept) or "error" (ValueError).
    ``batch_size``: images per forward pass in :meth:`score`. ``key``: the config key a
    missing-weights message names (``metrics.clip``, or ``guidance`` for CLIP guidance).

    The CLIP weights are frozen and stay in eval mode (``train()`` is a no-op), but the image path
    is differentiable with respect to the input images.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        device: str | torch.device = "cpu",
        long_prompts: str = "truncate",
        batch_size: int = 64,
        *,
        allow_random: bool = False,
        cache_dir: str | None = None,
        key: str = "metrics.clip",
    ):
        super().__init__()
        if long_prompts not in LONG_PROMPTS:
            raise ValueError(f"long_prompts must be one of {LONG_PROMPTS}, got {long_prompts!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.long_prompts = long_prompts
        self.batch_size = int(batch_size)
        self.model, self.tokenizer, self.info = load_clip(
            model, pretrained, device, allow_random=allow_random, cache_dir=cache_dir, key=key
        )
        size = self.info["image_size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.context_length: int = self.info["context_length"]
        if self.info["resize_mode"] not in ("shortest", "squash"):
            raise NotImplementedError(
                f"CLIP {model}: resize_mode={self.info['resize_mode']!r} is not reproduced "
                f"(only 'shortest' and 'squash')"
            )
        self._interpolation = "bilinear" if self.info["interpolation"] == "bilinear" else "bicubic"
        mean = torch.tensor(self.info["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.info["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean.to(device), persistent=False)
        self.register_buffer("std", std.to(device), persistent=False)
        self.train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> CLIPScore:
        """Kept in eval mode whatever ``mode`` says: CLIP is a fixed feature extractor."""
        return super().train(False)

    # -------------------------------------------------------------- images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [-1, 1], C in {1, 3} -> (N, 3, h, w) normalised CLIP input.

        [-1, 1] -> [0, 1] (clamped), grey repeated to RGB, shorter side resized to the model's
        size with antialiased bicubic (clamped to [0, 1] like the uint8 PIL path) and centre
        cropped, or squashed when the model says so; then (x - mean) / std. Differentiable.
        """
        _check_images(images)
        x = to_unit(images.to(self.device), detach=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self._resize(x)
        return (x - self.mean) / self.std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize like open_clip's eval transform (torchvision Resize + CenterCrop)."""
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if (h, w) == (th, tw):
            return x
        if self.info["resize_mode"] == "squash":
            size = (th, tw)
        elif th == tw:  # torchvision Resize(int): shorter side -> th, longer side truncated
            short, long = min(h, w), max(h, w)
            size = (th, int(th * long / short)) if h <= w else (int(th * long / short), th)
        else:
            scale = max(th / h, tw / w)
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(
                x, size=size, mode=self._interpolation, align_corners=False, antialias=True
            ).clamp(0, 1)
        top = int(round((size[0] - th) / 2.0))
        left = int(round((size[1] - tw) / 2.0))
        return x[..., top : top + th, left : left + tw]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) L2-normalised image embeddings (differentiable)."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    # -------------------------------------------------------------- text
    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the text encoder, start and end tokens included."""
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "eot_token_id"):  # open_clip SimpleTokenizer
            return len(tok.encode(prompt)) + 2
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap a HF one
        if inner is not None:
            return len(inner(prompt)["input_ids"])
        raise TypeError(f"cannot count tokens with {type(tok).__name__}")

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Apply the ``long_prompts`` policy: ValueError ("error") or one warning ("truncate")."""
        ctx = self.context_length
        too_long = [(p, n) for p in prompts if (n := self.count_tokens(p)) > ctx]
        if not too_long:
            return
        first, count = too_long[0]
        if self.long_prompts == "error":
            raise ValueError(
                f"prompt {_short(first)!r} has {count} tokens (start/end included) but the CLIP "
                f"context length is {ctx}: shorten it or use long_prompts='truncate'"
            )
        warnings.warn(
            f"{len(too_long)} of {len(prompts)} prompts exceed the CLIP context length ({ctx} "
            f"tokens) and were truncated (end-of-text token kept); first: {_short(first)!r} "
            f"({count} tokens)",
            UserWarning,
            stacklevel=2,
        )

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """P prompts -> (P, D) L2-normalised text embeddings (long prompts per ``long_prompts``)."""
        prompts = _as_prompts(prompts)
        self.check_prompts(prompts)
        return self._encode_text(prompts)

    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    # -------------------------------------------------------------- scores
    def cosine(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """(N,) raw cosines cos(E_I(image_i), E_T(prompt_i)) in [-1, 1]; one prompt is shared
        by all images. Differentiable with respect to ``images``."""
        prompts = _pair_prompts(images, prompts)
        return (self.encode_images(images) * self.encode_text(prompts)).sum(-1)

    def score_pairs(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """(N,) per-pair scores 100 * max(cos, 0) in [0, 100]. ``images`` (N, C, H, W) in
        [-1, 1]; ``prompts`` N strings or one for all. Differentiable w.r.t. ``images``
        (zero gradient for pairs whose cosine is negative; use :meth:`cosine` for guidance)."""
        return WEIGHT * self.cosine(images, prompts).clamp(min=0)

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Same as :meth:`score_pairs`."""
        return self.score_pairs(images, prompts)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: str | Sequence[str]) -> float:
        """Mean of the per-pair scores (each clamped at 0 before averaging), in [0, 100].
        Computed in batches of ``batch_size`` images without gradients."""
        prompts = _pair_prompts(images, prompts)
        self.check_prompts(prompts)
        shared = self._encode_text(prompts) if len(prompts) == 1 else None
        total = 0.0
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            text = shared if shared is not None else self._encode_text(prompts[start:end])
            cos = (self.encode_images(images[start:end]) * text).sum(-1)
            total += (WEIGHT * cos.clamp(min=0)).double().sum().item()
        return total / len(images)

    def protocol(self) -> dict:
        """What an evaluation records: the model description plus the score's definition."""
        return {
            **self.info,
            "weight": WEIGHT,
            "clamp": "per pair",
            "long_prompts": self.long_prompts,
        }


# ------------------------------------------------------------------ input checks
def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected images (N, C, H, W) with C in {{1, 3}}, got {shape}")
    if not images.is_floating_point():
        raise TypeError(
            f"expected float images in [-1, 1], got {images.dtype} (genlab.data.to_model converts)"
        )


def _as_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("expected a non-empty list of prompt strings")
    return prompts


def _pair_prompts(images: torch.Tensor, prompts: str | Sequence[str]) -> list[str]:
    """One prompt per image, or a single prompt for all; anything else is a ValueError."""
    _check_images(images)
    prompts = _as_prompts(prompts)
    if len(images) == 0:
        raise ValueError("no images to score")
    if len(prompts) not in (1, len(images)):
        raise ValueError(
            f"got {len(prompts)} prompts for {len(images)} images: pass one prompt per image "
            f"or a single prompt for all"
        )
    return prompts


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
