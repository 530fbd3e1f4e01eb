"""CLIP guidance: steer samples toward text prompts, scored by an open_clip model (the bundled
domain CLIP ``genlab-digits`` works offline; real open_clip weights through the same path).

Three methods, chosen by ``method=auto`` from what the model offers:

- ``gradient`` (diffusion): at every sampler step, the gradient with respect to the noisy
  image x_t of the CLIP cosine between the prompt and the predicted clean image x0(x_t),
  averaged over random cutouts (crops resized back, so CLIP sees the digit at several scales
  and positions and the gradient does not chase one view), minus optional total-variation and
  range penalties. It enters the denoiser as gradient guidance does
  (``genlab.guidance.GradientGuidance``): x0' = x0 + scale (1 - a_t)/sqrt(a_t) grad.
- ``latent`` (GAN and VAE decoders, anything with ``generate(z, y)`` and ``latents``): Adam on
  the latent z of every image to raise the same CLIP objective of ``generate(z)``, with a prior
  penalty (|z| - sqrt(d))^2 that keeps z near the shell where N(0, I) puts its mass (the
  typical set), as VQGAN-CLIP does for its codes.
- ``rerank`` (any family, autoregressive ones included): draw ``k`` candidates for every image
  and keep the one whose CLIP embedding is closest to its prompt.

The prompts are cycled over the images of every ``sample`` call (with weights, a prompt of
weight 2 gets twice the images, in consecutive blocks); ``prompts_for(n)`` says which, so the
evaluation scores each guided sample against its own prompt (``val/clip_score``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genlab.guidance import GradientGuidance, GuidanceError, cycle

METHODS = ("auto", "gradient", "latent", "rerank")


def prompt_schedule(prompts: Sequence[str], weights: Sequence[float] | None, n: int) -> list[str]:
    """The prompt of each of n images: cycled without weights; with weights, in consecutive
    blocks whose sizes are proportional to them."""
    return cycle(prompts, weights, n, what="prompt")


def cutouts(
    images: torch.Tensor, count: int, cut_min: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` random square crops of every image, each resized back to the image's size
    (bilinear, differentiable): side a uniform fraction in [cut_min, 1] of the image, placed
    uniformly inside it. (B, C, H, W) -> (count * B, C, H, W), crops of image i at i, B + i, ...
    ``count=0`` returns the images themselves."""
    if count <= 0:
        return images
    b = images.shape[0]
    n = count * b
    side = cut_min + (1 - cut_min) * torch.rand(n, generator=generator)
    shift = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [n, *images.shape[1:]], align_corners=False)
    source = images.repeat(count, 1, 1, 1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute difference between neighbouring pixels."""
    dh = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def range_excess(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared distance of the pixels from [-1, 1]."""
    return (images - images.clamp(-1, 1)).pow(2).flatten(1).mean(1)


class ClipGuidance(GradientGuidance):
    """Args:
    prompts: the text prompts. weights: optional relative weights, one per prompt.
    model / pretrained: the CLIP (``metrics.clip``'s conventions; default ``genlab-digits``).
    method: ``auto`` (gradient for diffusion, latent for GAN/VAE, rerank otherwise),
        ``gradient``, ``latent`` or ``rerank``.
    scale: gradient guidance scale. cutouts / cut_min: random crops per image and the smallest
        crop side (a fraction of the image) the CLIP objective averages over (0: the image).
    tv_weight / range_weight: total-variation and range penalties in the objective.
    steps / lr / prior_weight: latent optimisation (Adam) steps, its learning rate and the
        weight of the typical-set penalty (|z| - sqrt(d))^2.
    k: candidates drawn per image by ``rerank``. seed: seeds the cutouts.
    """

    name = "clip"

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        model: str = "genlab-digits",
        pretrained: str | None = None,
        method: str = "auto",
        scale: float = 80.0,
        cutouts: int = 8,
        cut_min: float = 0.7,
        tv_weight: float = 0.0,
        range_weight: float = 0.0,
        steps: int = 30,
        lr: float = 0.05,
        prior_weight: float = 0.01,
        k: int = 8,
        seed: int = 0,
        device: str = "cpu",
    ):
        super().__init__(scale)
        if not prompts:
            raise GuidanceError(
                "guidance=clip needs prompts: guidance.prompts=['a handwritten seven']"
            )
        if method not in METHODS:
            raise GuidanceError(f"guidance.method={method!r}: one of {', '.join(METHODS)}")
        if int(k) < 1:
            raise GuidanceError(f"guidance.k must be >= 1, got {k}")
        if not 0 < float(cut_min) <= 1:
            raise GuidanceError(f"guidance.cut_min must be in (0, 1], got {cut_min}")
        self.prompts = [str(p) for p in prompts]
        self.weights = None if weights is None else [float(w) for w in weights]
        prompt_schedule(self.prompts, self.weights, len(self.prompts))  # checks the weights
        self.clip_model, self.pretrained, self.device = model, pretrained, device
        self.requested, self.method, self.k = method, method, int(k)  # method: once attached
        self.cutouts, self.cut_min = int(cutouts), float(cut_min)
        self.tv_weight, self.range_weight = float(tv_weight), float(range_weight)
        self.steps, self.lr, self.prior_weight = int(steps), float(lr), float(prior_weight)
        self.seed = int(seed)
        self.history: list[list[float]] = []  # latent optimisation, per batch: mean cosine per step
        self._clip = None
        self._text: dict[str, torch.Tensor] = {}

    @property
    def clip(self):
        if self._clip is None:  # loaded on first use (a missing-weights error names the file)
            from genlab.metrics.clip import CLIPScore

            self._clip = CLIPScore(self.clip_model, self.pretrained, self.device)
        return self._clip

    # ------------------------------------------------------------------ attaching
    def check(self, model) -> None:
        if not callable(getattr(model, "sample", None)) or not getattr(model, "can_sample", True):
            raise GuidanceError(
                f"guidance=clip needs a model that samples; {type(model).__name__} cannot"
            )
        can = {
            "gradient": hasattr(model, "denoiser") and hasattr(model, "schedule"),
            "latent": callable(getattr(model, "generate", None)) and hasattr(model, "latents"),
            "rerank": True,
        }
        if self.requested == "auto":  # resolved per model: the same object may guide another
            self.method = next(m for m in ("gradient", "latent", "rerank") if can[m])
        elif not can[self.requested]:
            needs = {"gradient": "a diffusion model", "latent": "a GAN or VAE decoder"}
            raise GuidanceError(
                f"guidance.method={self.requested} needs {needs[self.requested]}; "
                f"{type(model).__name__} is not one (use guidance.method=auto)"
            )
        self.clip.check_prompts(self.prompts)

    def wrap_sample(self, sample: Callable, model) -> Callable:
        """The model's ``sample`` with this guidance (gradient guidance acts inside the sampler
        through ``wrap``, so ``sample`` comes back unchanged)."""
        if self.method == "gradient":
            return sample
        guided = self.rerank if self.method == "rerank" else self.optimise_latents
        target = sample if self.method == "rerank" else model

        def guided_sample(n: int, y=None, generator=None, **kw) -> torch.Tensor:
            if kw.get("z") is not None:  # given latents (interpolation grids): nothing to choose
                return sample(n, y=y, generator=generator, **kw)
            return guided(target, n, y, generator, **kw)

        return guided_sample

    def wrap(self, model, denoise, y, use_ema, **kw):
        """Gradient guidance of the denoiser; the other methods leave it alone (a diffusion
        model reranked by CLIP samples its candidates unguided)."""
        if self.method != "gradient":
            return denoise
        return super().wrap(model, denoise, y, use_ema, **kw)

    # ------------------------------------------------------------------ the objective
    def prompts_for(self, n: int) -> list[str]:
        """The prompt each of the n images of one ``sample`` call is steered toward."""
        return prompt_schedule(self.prompts, self.weights, n)

    targets_for = prompts_for

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D) text embeddings, each prompt encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            with torch.no_grad():
                self._text.update(zip(missing, self.clip.encode_text(missing)))
        return torch.stack([self._text[p] for p in prompts])

    def similarity(
        self, images: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B,) CLIP cosine of every image to its text embedding, averaged over the cutouts.
        CLIP sees the images clamped to [-1, 1], but the gradient passes the clamp (straight
        through): a background pixel predicted below -1 can still be drawn on."""
        images = images + (images.clamp(-1, 1) - images).detach()
        views = cutouts(images, self.cutouts, self.cut_min, generator)
        emb = self.clip.encode_images(views).view(-1, *text.shape)
        return (emb * text.to(emb.device)).sum(-1).mean(0).to(images.device)

    def clip_objective(self, images, text, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) objective, (B,) similarity): similarity minus the TV and range penalties."""
        sim = self.similarity(images, text, generator)
        value = sim
        if self.tv_weight:
            value = value - self.tv_weight * total_variation(images)
        if self.range_weight:
            value = value - self.range_weight * range_excess(images)
        return value, sim

    def objective(self, x_t, t, x0, targets, schedule) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + int(t.flatten()[0]))
        return self.clip_objective(x0, self.text(targets), generator)[0]

    # ------------------------------------------------------------------ latent optimisation
    def prior_penalty(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) (|z| - sqrt(d))^2: zero on the shell where a standard normal's mass lies."""
        flat = z.flatten(1)
        return (flat.norm(dim=1) - math.sqrt(flat.shape[1])).pow(2)

    def optimise_latents(self, model, n: int, y=None, generator=None, **kw) -> torch.Tensor:
        """n images of ``model.generate(z, y)`` with z optimised from a prior draw by Adam to
        raise the CLIP objective minus ``prior_weight`` times the prior penalty."""
        truncation = kw.get("truncation", getattr(model, "truncation", None))
        if truncation:  # a GAN's truncation trick, as its own sample applies it
            z0 = model.latents(n, generator, truncation)
        else:
            z0 = model.latents(n, generator)
        if getattr(model, "num_classes", 0) and y is None:
            y = torch.randint(0, model.num_classes, (n,), generator=generator)
        text = self.text(self.prompts_for(n))
        use_ema = {"use_ema": kw["use_ema"]} if "use_ema" in kw else {}
        gen = torch.Generator().manual_seed(self.seed)
        batch = int(getattr(model, "sample_batch_size", n) or n)
        bar = bool(kw.get("progress"))
        self.history = []
        out = []
        for start in range(0, n, batch):
            part = slice(start, start + batch)
            z = z0[part].clone().to(model.device).requires_grad_(True)
            yb = None if y is None else y[part].to(model.device)
            opt = torch.optim.Adam([z], lr=self.lr)
            trace = []
            for _ in tqdm(range(self.steps), desc="clip: latent", leave=False, disable=not bar):
                with torch.enable_grad():
                    images = model.generate(z, yb, **use_ema)
                    value, sim = self.clip_objective(images, text[part], gen)
                    loss = -value.sum() + self.prior_weight * self.prior_penalty(z).sum()
                    (z.grad,) = torch.autograd.grad(loss, z)  # the model's own grads untouched
                trace.append(float(sim.detach().mean()))
                opt.step()
            with torch.no_grad():
                out.append(model.generate(z.detach(), yb, **use_ema).clamp(-1, 1))
            self.history.append(trace)
        return torch.cat(out)

    # ------------------------------------------------------------------ reranking
    @torch.no_grad()
    def rerank(self, sample: Callable, n: int, y=None, generator=None, **kw) -> torch.Tensor:
        """n images, each the best of ``k`` candidates for its prompt."""
        k = self.k
        labels = None if y is None else torch.as_tensor(y).repeat_interleave(k)
        candidates = sample(n * k, y=labels, generator=generator, **kw)
        prompts = self.prompts_for(n)
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
        settings = {
            "gradient": {"scale": self.scale, "cutouts": self.cutouts, "cut_min": self.cut_min,
                         "tv_weight": self.tv_weight, "range_weight": self.range_weight},
            "latent": {"steps": self.steps, "lr": self.lr, "prior_weight": self.prior_weight,
                       "cutouts": self.cutouts, "cut_min": self.cut_min,
                       "tv_weight": self.tv_weight, "range_weight": self.range_weight},
            "rerank": {"k": self.k},
        }  # fmt: skip
        return {
            "name": self.name,
            "method": self.method,
            **settings.get(self.method, {}),
            "prompts": self.prompts,
            "weights": self.weights,
            "clip": {key: self.clip.info.get(key) for key in ("model", "weights_sha256")},
        }
