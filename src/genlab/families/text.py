"""Text-to-image denoising models, as Stable Diffusion conditions on text (Rombach et al. 2022,
Sec. 3.3): the denoising net cross-attends to the per-token features of a frozen CLIP text
transformer (``genlab.families.text_encoder.TextEncoder``), trained on image-caption pairs
with caption dropout, so that classifier-free guidance on the text works (Ho & Salimans
2021; for text: Nichol et al. 2022, GLIDE, Sec. 3.2; Saharia et al. 2022, Imagen, Sec. 2.3).

Design. ``TextConditioning`` is mixed into a denoising family ahead of it (DDPM, EDM, flow
matching: ``TextDiffusionModule``, ``TextEDMModule``, ``TextFlowModule``) and changes only
what the condition is; the families' losses, denoisers and samplers are untouched:

- the condition the family passes where it passes labels (``y``) is a
  ``genlab.nets.text.TextContext`` (tokens (B, L, D), mask (B, L)), and the net is wrapped in
  ``TextConditionedNet``, which hands it to the UNet's or DiT's cross-attention
  (``context_dim`` = the encoder's width, filled in when ``net`` is a partial);
- ``_labels(y, drop)`` (the families' hook for the condition of a training or validation
  batch) turns the batch's labels into captions, then into a context. Captions come from the
  data: for labelled data (MNIST) the domain CLIP's templates (``genlab.metrics.train_clip``),
  a random ``TRAIN_TEMPLATES`` one per sample in training, ``HELD_OUT_TEMPLATES`` (cycled)
  for validation and sampling, so the evaluation's class-balanced labels become held-out
  prompts and the digit-classifier metrics measure prompt accuracy; for a captioned folder
  (``data=folder data.captions=true``) the labels index the folder's captions, handed over
  by ``genlab.train`` (``set_captions``);
- caption dropout (``cond_drop_prob``, the families' condition dropout) replaces a training
  caption by the empty string "", as Stable Diffusion does; ``denoiser(None)`` is the
  empty-caption model, so ``guidance=cfg`` (``genlab.guidance.cfg.ClassifierFree``) is
  classifier-free guidance on the text, unchanged;
- ``denoiser(y)`` takes labels (held-out captions), captions (a list of strings) or a
  context; ``sample(n, prompts=[...])`` samples free text (prompts cycled over the images).

The text encoder is frozen and kept out of the state dict (reloaded by name; its weights'
hash is in ``describe()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from genlab.families.contract import Denoiser
from genlab.families.diffusion import DiffusionModule
from genlab.families.edm import EDMModule
from genlab.families.flow import FlowModule
from genlab.families.text_encoder import TextEncoder
from genlab.metrics.train_clip import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, WORDS
from genlab.nets.text import TextConditionedNet, TextContext
from genlab.utils import ConfigError

EMPTY = ""  # the unconditional caption (caption dropout, the CFG branch)
Condition = torch.Tensor | Sequence[str] | TextContext | None

__all__ = [
    "EMPTY",
    "TextConditioning",
    "TextDiffusionModule",
    "TextEDMModule",
    "TextFlowModule",
    "digit_caption",
]


def digit_caption(template: str, label: int) -> str:
    """A domain-CLIP caption of a digit label: ``"a handwritten {word}"`` -> "a handwritten
    seven" (``genlab.metrics.train_clip.captions``)."""
    if not 0 <= label < len(WORDS):
        raise ValueError(f"digit captions need labels in [0, {len(WORDS)}), got {label}")
    return template.format(word=WORDS[label], digit=label)


class TextConditioning:
    """Mixed into a denoising family ahead of it: a text-to-image model.

    Args (beyond the family's):
        net: the denoising net built with ``context_dim`` = the encoder's width, or a partial
            that is called with ``context_dim`` (``_partial_: true`` in the preset).
        text: the frozen ``genlab.families.text_encoder.TextEncoder`` (``_target_`` in the config).
        cond_drop_prob: the caption dropout: the probability that a training caption is "".
    """

    def __init__(
        self, net: nn.Module | Callable[..., nn.Module], text: TextEncoder, **family_options
    ):
        if not isinstance(net, nn.Module):  # a partial: the encoder's width
            net = net(context_dim=text.width)
        width = getattr(net, "context_dim", None)
        if width != text.width:
            raise ConfigError(
                f"model.net has context_dim={width} but the text encoder "
                f"{text.info['model']} gives {text.width}-wide tokens: set "
                f"model.net.context_dim={text.width}"
            )
        if family_options.get("coupling", "independent") != "independent":
            raise ConfigError(
                "a text model pairs noise independently: set model.coupling=independent"
            )
        super().__init__(net=TextConditionedNet(net), **family_options)
        self.text_encoder = text  # not an nn.Module: outside the state dict and the EMA
        self.captions: list[str] | None = None  # a captioned dataset's captions (labels index)

    def set_captions(self, captions: Sequence[str] | None) -> None:
        """Train on a dataset's captions: batch labels index ``captions`` (a captioned folder,
        ``genlab.data.FolderDataModule(captions=True)``); None: captions from the labels."""
        if captions is None and self.num_classes == 0:
            raise ConfigError(
                "a text model needs captions: labelled data (digit captions from the labels, "
                "e.g. data=mnist) or a captioned folder (data=folder data.captions=true)"
            )
        self.captions = None if captions is None else [str(c) for c in captions]

    # ------------------------------------------------------------------ captions
    def captions_for(self, y: torch.Tensor, training: bool, offset: int = 0) -> list[str]:
        """The caption of every label of y (B,): the dataset's caption it indexes, or a digit
        caption, by a random training template (``training``) or the held-out templates
        cycled from position ``offset``."""
        labels = [int(v) for v in y.tolist()]
        if self.captions is not None:
            return [self.captions[i] for i in labels]
        if self.num_classes == 0:
            raise ConfigError(
                "a text model needs captions: labelled data (digit captions from the labels, "
                "e.g. data=mnist) or a captioned folder (data=folder data.captions=true)"
            )
        if training:
            which = torch.randint(0, len(TRAIN_TEMPLATES), (len(labels),)).tolist()
            return [digit_caption(TRAIN_TEMPLATES[k], c) for k, c in zip(which, labels)]
        held = HELD_OUT_TEMPLATES
        return [digit_caption(held[(offset + i) % len(held)], c) for i, c in enumerate(labels)]

    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        """Caption dropout: each caption becomes "" with probability ``cond_drop_prob``."""
        if not self.cond_drop_prob:
            return list(captions)
        drop = (torch.rand(len(captions)) < self.cond_drop_prob).tolist()
        return [EMPTY if d else c for c, d in zip(captions, drop)]

    def context(self, cond: Condition, offset: int = 0) -> TextContext:
        """The ``TextContext`` of a condition: None -> the empty caption (one row, repeated
        over any batch by the net), labels (B,) -> held-out captions, captions -> encoded."""
        if isinstance(cond, TextContext):
            return cond.to(self.device)
        if cond is None:
            cond = [EMPTY]
        elif isinstance(cond, torch.Tensor):
            cond = self.captions_for(cond, training=False, offset=offset)
        return self.text_encoder(list(cond), self.device)

    def _labels(self, y: torch.Tensor | None, drop: bool) -> TextContext:
        """The condition of a training (``drop``: training templates, caption dropout) or a
        validation batch (held-out templates)."""
        if y is None:
            return self.context(None)
        captions = self.captions_for(y, training=drop)
        return self.context(self.drop_captions(captions) if drop else captions)

    # ------------------------------------------------------------------ the family contract
    def denoiser(self, y: Condition = None, use_ema: bool = True) -> Denoiser:
        """The family's denoiser conditioned on ``y``: None (the empty caption: the
        unconditional branch of classifier-free guidance), labels (B,) (held-out captions),
        captions (B,) or a ``TextContext``."""
        return super().denoiser(self.context(y), use_ema)

    def draw(self, m, y, generator, *, index: slice, prompts: Sequence[str] | None = None,
             **opts):  # fmt: skip
        """One chunk, conditioned on ``prompts`` (cycled over the n images) if given, else on
        the held-out captions of the labels y (m,), else unconditionally."""
        if prompts is not None:
            if isinstance(prompts, str) or not len(prompts):
                raise ValueError("prompts must be a non-empty list of strings")
            y = [str(prompts[i % len(prompts)]) for i in range(index.start, index.stop)]
        elif isinstance(y, torch.Tensor):
            y = self.captions_for(y, training=False, offset=index.start)
        return super().draw(m, y, generator, index=index, **opts)

    def bits_per_dim(self, x, y=None, generator=None, **kwargs) -> torch.Tensor:
        cond = self.context(None if y is None else y.to(self.device))
        return super().bits_per_dim(x, cond.expand(x.shape[0]), generator, **kwargs)

    def ode_bits_per_dim(self, x, y=None, generator=None, **kwargs) -> torch.Tensor:
        cond = self.context(None if y is None else y.to(self.device))
        return super().ode_bits_per_dim(x, cond.expand(x.shape[0]), generator, **kwargs)

    def describe(self, use_ema: bool = True) -> dict:
        out = super().describe(use_ema)
        out["text"] = {
            **self.text_encoder.info,
            "captions": "dataset captions" if self.captions is not None else "digit templates",
            "caption_drop_prob": self.cond_drop_prob,
        }
        if self.captions is None:
            out["text"]["sampling_templates"] = list(HELD_OUT_TEMPLATES)
        return out


class TextDiffusionModule(TextConditioning, DiffusionModule):
    """DDPM conditioned on text by cross-attention."""

    family = "text_diffusion"


class TextEDMModule(TextConditioning, EDMModule):
    """EDM (Karras et al. 2022) conditioned on text by cross-attention."""

    family = "text_edm"


class TextFlowModule(TextConditioning, FlowModule):
    """Flow matching conditioned on text by cross-attention (as SD3, Esser et al. 2024,
    conditions a rectified flow on text, here with a UNet's or DiT's cross-attention)."""

    family = "text_flow"
