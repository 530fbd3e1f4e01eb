"""CLIP guidance: steer samples toward text prompts, scored by an open_clip model (the bundled
domain CLIP ``genlab-digits`` works offline; real open_clip weights through the same path).

Three methods, one class each, chosen by ``ClipGuidance(method=auto)`` for each model it is
bound to (``bind``), from the capabilities the model has:

- ``ClipGradient`` (``Denoising`` models): at every sampler step, the gradient with respect
  to the noisy image x_t of the CLIP cosine between the prompt and the predicted clean image
  x0(x), averaged over random cutouts (crops resized back, so CLIP sees the digit at
  several scales and positions and the gradient does not chase one view), minus optional
  total-variation and range penalties. It enters the denoiser as gradient guidance does
  (``genlab.guidance.GradientGuidance``): x0' = x0 + scale (1 - a_t)/sqrt(a_t) grad.
- ``ClipLatent`` (``Latent`` models: GAN and VAE decoders): Adam on the latent z of every
  image to raise the same CLIP objective of ``generate(z)``, with a prior penalty
  (|z| - sqrt(d))^2 that keeps z near the shell where N(0, I) puts its mass (the typical
  set), as VQGAN-CLIP does for its codes.
- ``ClipRerank`` (any ``Generative`` family, autoregressive ones included): draw ``k``
  candidates for every image and keep the one whose CLIP embedding is closest to its prompt.

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

from genlab.families.contract import Denoising, Generative, Latent
from genlab.guidance.base import Guidance, GuidanceError, cycle
from genlab.guidance.gradient import GradientGuidance
from genlab.nets import rng

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


class ClipObjective:
    """What every CLIP method shares: the prompts and their schedule, the CLIP scorer (loaded
    on first use; a missing-weights error names the file), the text embeddings (each prompt
    encoded once), and the objective: the CLIP cosine to the prompt averaged over ``cutouts``
    random crops, minus the total-variation and range penalties."""

    def __init__(
        self,
        prompts: Sequence[str],
        weights: Sequence[float] | None,
        model: str,
        pretrained: str | None,
        cutouts: int,
        cut_min: float,
        tv_weight: float,
        range_weight: float,
        seed: int,
        device: str,
    ):
        self.prompts = [str(p) for p in prompts]
        self.weights = None if weights is None else [float(w) for w in weights]
        prompt_schedule(self.prompts, self.weights, len(self.prompts))  # checks the weights
        self.clip_model, self.pretrained, self.device = model, pretrained, device
        self.cutouts, self.cut_min = int(cutouts), float(cut_min)
        self.tv_weight, self.range_weight = float(tv_weight), float(range_weight)
        self.seed = int(seed)
        self._clip = None
        self._text: dict[str, torch.Tensor] = {}

    @property
    def clip(self):
        if self._clip is None:
            from genlab.metrics.clip import CLIPScore

            self._clip = CLIPScore(self.clip_model, self.pretrained, self.device, key="guidance")
        return self._clip

    def prompts_for(self, n: int) -> list[str]:
        """The prompt each of the n images of one ``sample`` call is steered toward."""
        return prompt_schedule(self.prompts, self.weights, n)

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

    def value(self, images, text, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) objective, (B,) similarity): similarity minus the TV and range penalties."""
        sim = self.similarity(images, text, generator)
        value = sim
        if self.tv_weight:
            value = value - self.tv_weight * total_variation(images)
        if self.range_weight:
            value = value - self.range_weight * range_excess(images)
        return value, sim

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N,) CLIP cosine of each image to its prompt, in chunks of 256."""
        out = []
        for i in range(0, len(images), 256):
            chunk = images[i : i + 256].to(self.clip.device).float()
            out.append(self.clip.cosine(chunk, prompts[i : i + 256]).cpu())
        return torch.cat(out)

    def penalties(self) -> dict:
        return {"cutouts": self.cutouts, "cut_min": self.cut_min,
                "tv_weight": self.tv_weight, "range_weight": self.range_weight}  # fmt: skip

    def protocol(self) -> dict:
        return {
            "prompts": self.prompts,
            "weights": self.weights,
            "clip": {key: self.clip.info.get(key) for key in ("model", "weights_sha256")},
        }


class _ClipMethod(Guidance):
    """The parts of a CLIP method that only read its ``ClipObjective``."""

    name = "clip"
    method = ""

    def __init__(self, objective: ClipObjective):
        self.clip_objective = objective
        self.prompts, self.weights = objective.prompts, objective.weights

    @property
    def clip(self):
        """The CLIP scorer (``genlab.metrics.clip.CLIPScore``)."""
        return self.clip_objective.clip

    def prompts_for(self, n: int) -> list[str]:
        return self.clip_objective.prompts_for(n)

    def targets(self) -> list[str]:
        return self.prompts

    def clip_targets(self, n: int):
        return self.clip_objective.clip, self.prompts_for(n)

    def bind(self, model) -> Guidance:
        self.check(model)
        self.clip_objective.clip.check_prompts(self.prompts)
        return self

    def settings(self) -> dict:
        return {}

    def protocol(self) -> dict:
        return {"name": self.name, "method": self.method, **self.settings(),
                **self.clip_objective.protocol()}  # fmt: skip


class ClipGradient(GradientGuidance, _ClipMethod):
    """Every sampler step follows the gradient of the CLIP objective of the predicted clean
    image x0(x) with respect to the noisy image x (``GradientGuidance``); for ``Denoising``
    models."""

    name, method = "clip", "gradient"

    def __init__(self, objective: ClipObjective, scale: float = 80.0):
        _ClipMethod.__init__(self, objective)
        GradientGuidance.__init__(self, scale)

    def check(self, model) -> None:
        if not isinstance(model, Denoising):
            raise GuidanceError(
                f"guidance.method=gradient needs a diffusion model; {type(model).__name__} is "
                "not one (use guidance.method=auto)"
            )

    def targets_for(self, n: int) -> list[str]:
        return self.prompts_for(n)

    def objective(self, x, sigma, x0, targets) -> torch.Tensor:
        level = int(torch.round(1000 * sigma.flatten()[0].double().log()))  # cutouts per step
        generator = torch.Generator().manual_seed(self.clip_objective.seed + level)
        return self.clip_objective.value(x0, self.clip_objective.text(targets), generator)[0]

    def settings(self) -> dict:
        return {"scale": self.scale, **self.clip_objective.penalties()}


class ClipLatent(_ClipMethod):
    """Adam on the latent z of every image to raise the CLIP objective of
    ``model.generate(z)``, minus ``prior_weight`` (|z| - sqrt(d))^2 (the typical-set penalty);
    for ``Latent`` models. ``history``: per batch, the mean cosine after each step."""

    method = "latent"

    def __init__(self, objective: ClipObjective, steps=30, lr=0.05, prior_weight=0.01):
        super().__init__(objective)
        self.steps, self.lr, self.prior_weight = int(steps), float(lr), float(prior_weight)
        self.history: list[list[float]] = []

    def check(self, model) -> None:
        if not isinstance(model, Latent):
            raise GuidanceError(
                f"guidance.method=latent needs a GAN or VAE decoder; {type(model).__name__} is "
                "not one (use guidance.method=auto)"
            )

    @staticmethod
    def prior_penalty(z: torch.Tensor) -> torch.Tensor:
        """(B,) (|z| - sqrt(d))^2: zero on the shell where a standard normal's mass lies."""
        flat = z.flatten(1)
        return (flat.norm(dim=1) - math.sqrt(flat.shape[1])).pow(2)

    def sample(self, model, draw: Callable, n: int, y=None, generator=None, **opts):
        """n images of ``model.generate(z, y)`` with z optimised from a prior draw; given
        latents (``z=``, interpolation grids) pass through unguided."""
        if opts.get("z") is not None:
            return draw(n, y=y, generator=generator, **opts)
        if opts.get("truncation") is not None:  # a GAN's truncation trick, asked for
            z0 = model.latents(n, generator, opts["truncation"])
        else:  # the prior the model samples from (a GAN's own truncation included)
            z0 = model.latents(n, generator)
        if model.num_classes and y is None:
            y = rng.randint(0, model.num_classes, (n,), generator)
        text = self.clip_objective.text(self.prompts_for(n))
        gen = torch.Generator().manual_seed(self.clip_objective.seed)
        use_ema = bool(opts.get("use_ema", True))
        self.history = []
        out = []
        for start in range(0, n, model.sample_batch_size):
            part = slice(start, start + model.sample_batch_size)
            yb = None if y is None else y[part].to(model.device)
            z = self._optimise(model, z0[part], yb, text[part], gen, use_ema, opts)
            with torch.no_grad():
                out.append(model.generate(z, yb, use_ema).clamp(-1, 1))
        return torch.cat(out)

    def _optimise(self, model, z0, y, text, gen, use_ema: bool, opts) -> torch.Tensor:
        z = z0.clone().to(model.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        trace = []
        bar = not opts.get("progress")
        for _ in tqdm(range(self.steps), desc="clip: latent", leave=False, disable=bar):
            with torch.enable_grad():
                images = model.generate(z, y, use_ema)
                value, sim = self.clip_objective.value(images, text, gen)
                loss = -value.sum() + self.prior_weight * self.prior_penalty(z).sum()
                (z.grad,) = torch.autograd.grad(loss, z)  # the model's own grads untouched
            trace.append(float(sim.detach().mean()))
            opt.step()
        self.history.append(trace)
        return z.detach()

    def settings(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "prior_weight": self.prior_weight,
                **self.clip_objective.penalties()}  # fmt: skip


class ClipRerank(_ClipMethod):
    """Draw ``k`` candidates for every image and keep the one closest to its prompt; for any
    ``Generative`` model (a diffusion model's candidates are drawn unguided)."""

    method = "rerank"

    def __init__(self, objective: ClipObjective, k: int = 8):
        super().__init__(objective)
        self.k = int(k)

    def check(self, model) -> None:
        if not isinstance(model, Generative):
            raise GuidanceError(
                f"guidance=clip needs a model that samples; {type(model).__name__} cannot"
            )

    @torch.no_grad()
    def sample(self, model, draw: Callable, n: int, y=None, generator=None, **opts):
        """n images, each the best of ``k`` candidates for its prompt (given latents pass)."""
        if opts.get("z") is not None:
            return draw(n, y=y, generator=generator, **opts)
        k = self.k
        labels = None if y is None else torch.as_tensor(y).repeat_interleave(k)
        if isinstance(generator, rng.SampleSeeds):  # sample i's k candidates: streams of its own
            generator = generator.spawn(k)
        candidates = draw(n * k, y=labels, generator=generator, **opts)
        prompts = self.prompts_for(n)
        scores = self.clip_objective.scores(candidates, [p for p in prompts for _ in range(k)])
        best = scores.view(n, k).argmax(1)
        return candidates.view(n, k, *candidates.shape[1:])[torch.arange(n), best]

    def settings(self) -> dict:
        return {"k": self.k}


class ClipGuidance(Guidance):
    """CLIP guidance as configured by ``guidance=clip``; ``bind(model)`` returns the method
    object for that model (``method=auto``: gradient for ``Denoising`` models, latent for
    ``Latent`` ones, rerank otherwise), so one ``ClipGuidance`` guides any number of models.
    The methods share one CLIP scorer and text cache.

    Args:
    prompts: the text prompts. weights: optional relative weights, one per prompt.
    model / pretrained: the CLIP (``metrics.clip``'s conventions; default ``genlab-digits``).
    method: ``auto``, ``gradient``, ``latent`` or ``rerank``.
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
        self.objective = ClipObjective(
            prompts, weights, model, pretrained, cutouts, cut_min, tv_weight, range_weight,
            seed, device,
        )  # fmt: skip
        self.prompts, self.weights = self.objective.prompts, self.objective.weights
        self.method = method
        self.options = {
            "gradient": {"scale": scale},
            "latent": {"steps": steps, "lr": lr, "prior_weight": prior_weight},
            "rerank": {"k": k},
        }

    def resolve(self, model) -> str:
        """The method this guidance uses for ``model``."""
        if self.method != "auto":
            return self.method
        if isinstance(model, Denoising):
            return "gradient"
        return "latent" if isinstance(model, Latent) else "rerank"

    def bind(self, model) -> Guidance:
        method = self.resolve(model)
        cls = {"gradient": ClipGradient, "latent": ClipLatent, "rerank": ClipRerank}[method]
        return cls(self.objective, **self.options[method]).bind(model)

    @property
    def clip(self):
        """The CLIP scorer the methods share."""
        return self.objective.clip

    def targets(self) -> list[str]:
        return self.prompts

    def protocol(self) -> dict:
        return {"name": self.name, "method": self.method, **self.objective.protocol()}
