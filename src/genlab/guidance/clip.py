"""CLIP guidance: steer samples toward text prompts, scored by an open_clip model (the bundled
domain CLIP ``genlab-digits`` works offline; real open_clip weights through the same path).

Method ``rerank`` (any family, autoregressive ones included): draw ``k`` candidates for every
image and keep the one whose CLIP embedding is closest to its prompt (the prompts are cycled
over the images; with weights, a prompt of weight 2 gets twice the images). Gradient
guidance for diffusion and latent optimisation for GAN and VAE decoders are the next methods
of this option (issue 7); until they land, ``method=auto`` reranks for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from genlab.guidance import GuidanceError

METHODS = ("auto", "rerank")


def prompt_schedule(prompts: Sequence[str], weights: Sequence[float] | None, n: int) -> list[str]:
    """The prompt of each of n images: cycled without weights; with weights, in consecutive
    blocks whose sizes are proportional to them."""
    if weights is None:
        return [prompts[i % len(prompts)] for i in range(n)]
    if len(weights) != len(prompts) or min(weights) <= 0:
        raise GuidanceError(
            f"guidance.weights must be {len(prompts)} positive numbers, one per prompt"
        )
    total = float(sum(weights))
    counts = [int(n * w / total) for w in weights]
    for i in sorted(range(len(prompts)), key=lambda i: -weights[i])[: n - sum(counts)]:
        counts[i] += 1  # the images rounding left over go to the heaviest prompts
    return [p for p, c in zip(prompts, counts) for _ in range(c)]


class ClipGuidance:
    """Args:
    prompts: the text prompts. weights: optional relative weights, one per prompt.
    model / pretrained: the CLIP (``metrics.clip``'s conventions; default ``genlab-digits``).
    method: ``auto`` or ``rerank``. k: candidates drawn per image by ``rerank``.
    """

    name = "clip"

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        model: str = "genlab-digits",
        pretrained: str | None = None,
        method: str = "auto",
        k: int = 8,
        device: str = "cpu",
    ):
        if not prompts:
            raise GuidanceError(
                "guidance=clip needs prompts: guidance.prompts=['a handwritten seven']"
            )
        if method not in METHODS:
            raise GuidanceError(f"guidance.method={method!r}: one of {', '.join(METHODS)}")
        if int(k) < 1:
            raise GuidanceError(f"guidance.k must be >= 1, got {k}")
        self.prompts = [str(p) for p in prompts]
        self.weights = None if weights is None else [float(w) for w in weights]
        prompt_schedule(self.prompts, self.weights, len(self.prompts))  # checks the weights
        self.clip_model, self.pretrained, self.device = model, pretrained, device
        self.method, self.k = "rerank" if method == "auto" else method, int(k)
        self._clip = None

    @property
    def clip(self):
        if self._clip is None:  # loaded on first use (a missing-weights error names the file)
            from genlab.metrics.clip import CLIPScore

            self._clip = CLIPScore(self.clip_model, self.pretrained, self.device)
        return self._clip

    def check(self, model) -> None:
        if not callable(getattr(model, "sample", None)) or not getattr(model, "can_sample", True):
            raise GuidanceError(
                f"guidance=clip needs a model that samples; {type(model).__name__} cannot"
            )
        self.clip.check_prompts(self.prompts)

    def wrap_sample(self, sample: Callable) -> Callable:
        """``sample(n, y=None, generator=None, **kw)`` that returns the reranked images."""

        def reranked(n: int, y=None, generator=None, **kw) -> torch.Tensor:
            if kw.get("z") is not None:  # given latents (interpolation grids): nothing to choose
                return sample(n, y=y, generator=generator, **kw)
            return self.rerank(sample, n, y, generator, **kw)

        return reranked

    @torch.no_grad()
    def rerank(self, sample: Callable, n: int, y=None, generator=None, **kw) -> torch.Tensor:
        """n images, each the best of ``k`` candidates for its prompt."""
        k = self.k
        labels = None if y is None else torch.as_tensor(y).repeat_interleave(k)
        candidates = sample(n * k, y=labels, generator=generator, **kw)
        prompts = prompt_schedule(self.prompts, self.weights, n)
        scores = self.scores(candidates, [p for p in prompts for _ in range(k)]).view(n, k)
        best = scores.argmax(1)
        return candidates.view(n, k, *candidates.shape[1:])[torch.arange(n), best]

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), 256):
            chunk = images[i : i + 256].to(self.clip.device).float()
            out.append(self.clip.cosine(chunk, prompts[i : i + 256]).cpu())
        return torch.cat(out)

    def protocol(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "k": self.k,
            "prompts": self.prompts,
            "weights": self.weights,
            "clip": {key: self.clip.info.get(key) for key in ("model", "weights_sha256")},
        }
