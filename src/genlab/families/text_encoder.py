"""The frozen text encoder of text-to-image models: an open_clip text transformer loaded by
``genlab.metrics.clip_loader.load_clip`` (offline: ``genlab-digits``, the domain CLIP that
ships with genlab; online any open_clip name and tag, or a ``local-dir:`` folder), returning
per-token features as a ``genlab.nets.text.TextContext``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer
from torch import nn

from genlab.metrics.clip_loader import load_clip
from genlab.nets.text import TextContext

__all__ = ["TextEncoder"]


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module holding open_clip's text transformer: the CLIP itself (``CLIP``) or its
    ``text`` tower (``CustomTextCLIP``)."""
    if isinstance(clip, CLIP):
        return clip
    tower = getattr(clip, "text", None)
    if isinstance(tower, TextTransformer) and getattr(tower, "cls_emb", None) is None:
        return tower
    raise ValueError(
        f"text encoder: {type(clip).__name__} has no open_clip text transformer whose tokens "
        "can be read (CLIP or CustomTextCLIP with a TextTransformer); choose another model"
    )


class TextEncoder:
    """A frozen open_clip text transformer: captions -> per-token features (B, L, width), the
    hidden states after the final LayerNorm and before pooling and projection (what Stable
    Diffusion's UNet cross-attends to), with the padding mask (tokenizer id 0 = padding for
    open_clip's ``SimpleTokenizer``). Encodings of repeated captions come from a cache (up to
    ``cache_size`` captions; MNIST's templated captions all fit), on the device they were
    asked for.

    Not an ``nn.Module`` on purpose: a model that holds it keeps it out of its parameters,
    state dict and EMA; the weights are reloaded by name and recorded by hash (``info``).

    Args:
        model: open_clip name (``ViT-B-32``), ``genlab-digits`` or ``local-dir:<dir>``.
        pretrained: open_clip tag or weights file (ignored for folders).
        cache_size: most captions whose encodings are kept.
    """

    def __init__(
        self, model: str = "genlab-digits", pretrained: str | None = None, cache_size: int = 1024
    ):
        clip, self.tokenizer, info = load_clip(model, pretrained, "cpu", key="model.text")
        self.tower = _text_tower(clip)
        self.width = int(self.tower.transformer.width)
        self.context_length = int(info["context_length"])
        self.info = {k: info[k] for k in ("model", "pretrained", "weights_sha256")}
        self.info["context_length"] = self.context_length
        self.info["width"] = self.width
        self.cache_size = int(cache_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device = torch.device("cpu")

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> TextContext:
        """Token ids (B, L) -> ``TextContext``: open_clip's ``encode_text`` up to its final
        LayerNorm (token + position embedding, the causal transformer, ``ln_final``)."""
        t = self.tower
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast) + t.positional_embedding.to(cast)
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask))
        return TextContext(x.float(), tokens != 0)

    def __call__(self, captions: Sequence[str], device: torch.device | str = "cpu") -> TextContext:
        """(B,) captions -> ``TextContext`` (B, context_length, width) on ``device``."""
        device = torch.device(device)
        if device != self._device:  # the frozen tower follows the model; the cache too
            self.tower.to(device)
            self._device, self._cache = device, {}
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            encoded = self.encode_tokens(self.tokenizer(missing).to(device))
            fresh = dict(zip(missing, zip(encoded.tokens, encoded.mask)))
            room = max(0, self.cache_size - len(self._cache))
            self._cache.update(dict(list(fresh.items())[:room]))
        else:
            fresh = {}
        pairs = [self._cache[c] if c in self._cache else fresh[c] for c in captions]
        return TextContext(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
