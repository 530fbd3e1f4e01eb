"""GANs as one LightningModule with manual optimisation of generator and discriminator.

Objectives (``loss``):
- ``bce``: non-saturating cross-entropy (Goodfellow et al. 2014, Sec. 3; DCGAN, Radford et al.
  2016): D minimises softplus(-D(x)) + softplus(D(G(z))), G minimises softplus(-D(G(z))).
- ``wgan-gp``: Wasserstein critic with gradient penalty (Gulrajani et al. 2017, Alg. 1):
  D minimises D(G(z)) - D(x) + lambda (||grad D(x_hat)|| - 1)^2 on random interpolates x_hat.
- ``hinge``: hinge loss (Lim & Ye 2017; with spectral normalisation, Miyato et al. 2018):
  D minimises relu(1 - D(x)) + relu(1 + D(G(z))), G minimises -D(G(z)).
An optional R1 penalty (Mescheder et al. 2018, Eq. 9) adds gamma/2 E||grad D(x)||^2 on reals.

Each training batch is one discriminator step; every ``n_critic``-th batch also takes a
generator step, so ``global_step`` (and ``trainer.max_steps``) counts generator steps, as GAN
papers do. Class-conditional training uses the batch labels (conditional batch norm in G,
projection in D). An EMA copy of G samples and is evaluated; ``diffaugment`` augments what D
sees (Zhao et al. 2020). A NaN or Inf loss raises ``DivergenceError`` (the run stops; the last
checkpoint is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.families.base import GenerativeModule, fused_on_cuda
from genlab.nets import rng
from genlab.nets.augment import diff_augment
from genlab.nets.ema import EMA

LOSSES = ("bce", "wgan-gp", "hinge")


def gradient_penalty(
    discriminator: Callable, real: torch.Tensor, fake: torch.Tensor, y=None, eps=None
) -> torch.Tensor:
    """E[(||grad_x_hat D(x_hat)||_2 - 1)^2], x_hat = eps x + (1 - eps) x_fake, eps ~ U[0, 1]
    per sample (Gulrajani et al. 2017, Alg. 1, lines 6-7)."""
    if eps is None:
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(x_hat, y).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(discriminator: Callable, real: torch.Tensor, y=None) -> torch.Tensor:
    """E[||grad_x D(x)||^2] on real data (Mescheder et al. 2018)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real, y).sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


class GANModule(GenerativeModule):
    """Args:
    generator: ``G(z, y) -> (B, C, H, W)`` in [-1, 1] with attribute ``z_dim``.
    discriminator: ``D(x, y) -> (B,)`` logits / critic values.
    image_shape: (C, H, W). loss: bce | wgan-gp | hinge. n_critic: D steps per G step.
    gp_weight: lambda of the gradient penalty (wgan-gp). r1_gamma: R1 weight (0: off).
    g_optimizer / d_optimizer: partial optimizers, called with the parameters.
    ema_decay: EMA of G for sampling and evaluation (0: off). num_classes: > 0 conditional.
    diffaugment: DiffAugment policy, e.g. "color,translation,cutout" (None: off).
    truncation: default truncation of z at sampling (None: off). sample_batch_size.
    gradient_clip_val: clip each network's gradient norm to this before its step (None: off,
    as in the GAN papers; Lightning cannot clip under manual optimisation, so the family does).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        loss: str = "bce",
        n_critic: int = 1,
        gp_weight: float = 10.0,
        r1_gamma: float = 0.0,
        g_optimizer: Callable | None = None,
        d_optimizer: Callable | None = None,
        ema_decay: float = 0.999,
        num_classes: int = 0,
        diffaugment: str | None = None,
        truncation: float | None = None,
        sample_batch_size: int = 256,
        gradient_clip_val: float | None = None,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(compile=compile, channels_last=channels_last)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.automatic_optimization = False
        self.generator, self.discriminator = generator, discriminator
        self.image_shape = tuple(int(s) for s in image_shape)
        self.loss, self.n_critic = loss, int(n_critic)
        self.gp_weight, self.r1_gamma = float(gp_weight), float(r1_gamma)
        adam = lambda params: torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))
        self.g_optimizer_fn = g_optimizer or adam
        self.d_optimizer_fn = d_optimizer or adam
        self.ema = EMA(generator, ema_decay) if ema_decay > 0 else None
        self.num_classes = int(num_classes)
        self.diffaugment = diffaugment
        self.truncation = truncation
        self.sample_batch_size = sample_batch_size
        self.z_dim = int(generator.z_dim)
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.batches_per_step = self.n_critic  # data batches per global step
        # discriminator steps taken: decides when the generator steps; in the state dict so
        # a resumed run keeps the D/G rhythm
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ losses
    def _d(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.discriminator(diff_augment(x, self.diffaugment), y)

    def d_loss(self, real, y_real, fake, y_fake) -> tuple[torch.Tensor, dict]:
        d_real, d_fake = self._d(real, y_real), self._d(fake, y_fake)
        if self.loss == "bce":
            loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        elif self.loss == "hinge":
            loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        else:
            loss = d_fake.mean() - d_real.mean()
        stats = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        if self.loss == "wgan-gp":
            gp = gradient_penalty(self._d, real, fake, y_real if self.num_classes else None)
            loss, stats["gp"] = loss + self.gp_weight * gp, gp.detach()
        if self.r1_gamma > 0:
            r1 = r1_penalty(self._d, real, y_real)
            loss, stats["r1"] = loss + 0.5 * self.r1_gamma * r1, r1.detach()
        return loss, stats

    def g_loss(self, fake, y_fake) -> torch.Tensor:
        d_fake = self._d(fake, y_fake)
        return F.softplus(-d_fake).mean() if self.loss == "bce" else -d_fake.mean()

    # ------------------------------------------------------------------ training
    def _noise(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(b, self.z_dim, device=self.device)
        y = (
            torch.randint(0, self.num_classes, (b,), device=self.device)
            if self.num_classes
            else None
        )
        return z, y

    def _clip(self, opt) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(opt, self.gradient_clip_val, gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        real, labels = batch
        y_real = labels if self.num_classes else None
        opt_g, opt_d = self.optimizers()
        z, y_fake = self._noise(real.shape[0])
        with torch.no_grad():
            fake = self.generator(z, y_fake)
        loss_d, stats = self.d_loss(real, y_real, fake, y_fake)
        self.check_finite("train/loss_d", loss_d)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        self._clip(opt_d)
        opt_d.optimizer.step()  # the raw optimizer: global_step counts generator steps only
        self.d_steps += 1
        self.log("train/loss_d", loss_d, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        if int(self.d_steps) % self.n_critic:
            return
        self.discriminator.requires_grad_(False)
        z, y_fake = self._noise(real.shape[0])
        loss_g = self.g_loss(self.generator(z, y_fake), y_fake)
        self.check_finite("train/loss_g", loss_g)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip(opt_g)
        opt_g.step()
        self.discriminator.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(self.generator)
        self.log("train/loss_g", loss_g, prog_bar=True)
        self.log("train/loss", loss_g)

    def configure_optimizers(self):
        return [
            fused_on_cuda(self.g_optimizer_fn, self.device)(self.generator.parameters()),
            fused_on_cuda(self.d_optimizer_fn, self.device)(self.discriminator.parameters()),
        ]

    # ------------------------------------------------------------------ precision
    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "GANModule steps the discriminator's optimizer directly, which fp16 loss scaling "
                "does not support: use trainer.precision=bf16-mixed or 32-true"
            )

    # ------------------------------------------------------------------ the family contract
    def ema_target(self) -> nn.Module:
        return self.generator

    def counted_module(self) -> nn.Module:
        return self.generator

    def nfe_module(self) -> nn.Module:
        return self.generator

    def sampling_protocol(self) -> dict:
        return {"name": "generator", "truncation": self.truncation}

    def latents(
        self, n: int, generator: torch.Generator | None = None, truncation: float | None = None
    ) -> torch.Tensor:
        """z ~ N(0, I) (n, z_dim) on the CPU; with ``truncation`` t (default: the model's),
        entries with |z| > t are redrawn until inside (the truncation trick, Brock et al.
        2019)."""
        truncation = self.truncation if truncation is None else truncation
        z = rng.randn((n, self.z_dim), generator)
        if truncation:
            for _ in range(1000):
                outside = z.abs() > truncation
                if not outside.any():
                    break
                if isinstance(generator, rng.SampleSeeds):  # each sample redraws from its own
                    for i in outside.any(1).nonzero().flatten().tolist():
                        g = generator.generators[i]
                        z[i, outside[i]] = torch.randn(int(outside[i].sum()), generator=g)
                else:
                    z[outside] = torch.randn(int(outside.sum()), generator=generator)
        return z

    def prior_noise(self, n, generator, *, truncation=None, z=None, **_) -> torch.Tensor:
        """The latents of the whole request: ``z`` (n, z_dim) if given, else a prior draw
        (truncated at ``truncation``, default the model's)."""
        return self.latents(n, generator, truncation) if z is None else z

    def draw(self, m, y, generator, *, noise, index, n, progress, truncation=None, z=None):
        """G(z, y) for this chunk's latents (``sample(n, y, generator, truncation=, z=)``;
        a conditional model given no labels gets uniform random ones)."""
        return self.generator(noise.to(self.device), y if self.num_classes else None)

    def generate(
        self, z: torch.Tensor, y: torch.Tensor | None = None, use_ema: bool = True
    ) -> torch.Tensor:
        """G(z, y) for latents z (B, z_dim) in eval mode, differentiable with respect to z
        (latent optimisation); values as the generator gives them, not clamped."""
        with self.evaluating(), self.ema_weights(use_ema):
            return self.generator(z.to(self.device), None if not self.num_classes else y)
