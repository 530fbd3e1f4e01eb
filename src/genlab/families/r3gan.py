"""R3GAN (Huang et al. 2024, "The GAN is dead; long live the GAN! A Modern GAN Baseline"):
the relativistic pairing loss with R1 and R2 zero-centred gradient penalties.

Objective ("R3" = RpGAN + R1 + R2; Huang et al. 2024, their RpGAN loss with f = softplus(-t),
the RpGAN of Jolicoeur-Martineau 2019, penalties of Mescheder et al. 2018 / Roth et al. 2017),
on a real batch x paired element-wise with a fake batch G(z) (same labels when conditional):

    L_D = E[softplus(D(G(z)) - D(x))] + r1_gamma / 2 E||grad_x D(x)||^2
                                      + r2_gamma / 2 E||grad_x D(G(z))||^2
    L_G = E[softplus(D(x) - D(G(z)))]

As in the authors' training loop, one global step is one discriminator step on one data batch
and one generator step on the next (``batches_per_step`` = 2), each with fresh z; fakes take
the real batch's labels. ``schedule_steps`` > 0 turns on the authors' cosine schedules over that
many generator steps: lr (optimizer lr -> ``lr_final``), Adam beta2 (optimizer beta2 ->
``beta2_final``), both gammas (x1 -> x``gamma_final_scale``) and the EMA half-life (0 ->
``ema_half_life`` steps); every value is a closed form of the global step, so a resumed run
continues the schedules exactly. Without a schedule the values stay at their starts and
``ema_decay`` is the GAN family's EMA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.families.gan import GANModule
from genlab.nets.ema import EMA


def rpgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[softplus(D(G(z)) - D(x))] over paired logits (B,) (Huang et al. 2024, RpGAN)."""
    return F.softplus(d_fake - d_real).mean()


def rpgan_g_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[softplus(D(x) - D(G(z)))] over paired logits (B,): the generator's side of RpGAN."""
    return F.softplus(d_real - d_fake).mean()


def zero_centered_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """E_i ||grad_{x_i} D(x_i)||^2 for logits (B,) of inputs (B, C, H, W) that require grad:
    R1 on reals, R2 on fakes, without the gamma / 2 (Mescheder et al. 2018, Eq. 9; R3GAN
    applies both). Differentiable with respect to D's parameters (create_graph)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """start -> end along half a cosine over ``total`` steps, ``end`` after it, ``start``
    throughout when ``total`` <= 0 (the authors' cosine_decay_with_warmup without warm-up)."""
    if total <= 0:
        return float(start)
    progress = min(step, total) / total
    return float(start + (end - start) * 0.5 * (1 - math.cos(math.pi * progress)))


def paper_adam(params) -> torch.optim.Optimizer:
    """Adam(2e-4, betas (0, 0.99)): the authors' end-of-schedule beta2, beta1 = 0."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.0, 0.99))


class R3GANModule(GANModule):
    """Args (besides the ``GANModule`` ones it passes on: image_shape, g_optimizer /
    d_optimizer, ema_decay, num_classes, diffaugment, truncation, sample_batch_size,
    gradient_clip_val, compile, channels_last):
    generator: ``G(z, y) -> (B, C, H, W)`` with ``z_dim``; discriminator: ``D(x, y) -> (B,)``.
    r1_gamma / r2_gamma: weights of the R1 (reals) and R2 (fakes) penalties (0: off).
    schedule_steps: length of the cosine schedules in generator steps (0: no schedule).
    lr_final / beta2_final: lr and Adam beta2 at the schedule's end (None: not scheduled).
    gamma_final_scale: both gammas at the schedule's end, as a fraction of their start.
    ema_half_life: EMA half-life in generator steps, ramped from 0 over the schedule (None:
    ``ema_decay``, the GAN family's EMA with warm-up).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        r1_gamma: float = 0.05,
        r2_gamma: float = 0.05,
        schedule_steps: int = 0,
        lr_final: float | None = None,
        beta2_final: float | None = None,
        gamma_final_scale: float = 1.0,
        ema_half_life: float | None = None,
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
        super().__init__(
            generator, discriminator, image_shape,
            loss="bce",  # unused: this family's d_step and g_step compute the R3 objective
            n_critic=1, r1_gamma=r1_gamma,
            g_optimizer=g_optimizer or paper_adam, d_optimizer=d_optimizer or paper_adam,
            ema_decay=0.0 if ema_half_life is not None else ema_decay,
            num_classes=num_classes, diffaugment=diffaugment, truncation=truncation,
            sample_batch_size=sample_batch_size, gradient_clip_val=gradient_clip_val,
            compile=compile, channels_last=channels_last,
        )  # fmt: skip
        self.loss = "r3gan"
        self.r2_gamma = float(r2_gamma)
        self.schedule_steps = int(schedule_steps)
        self.lr_final, self.beta2_final = lr_final, beta2_final
        self.gamma_final_scale = float(gamma_final_scale)
        self.ema_half_life = None if ema_half_life is None else float(ema_half_life)
        if self.ema_half_life is not None:  # the decay is set before every update
            self.ema = EMA(generator, 0.0, warmup=False)  # its decay is set before every update
        self.batches_per_step = 2  # a discriminator batch, then a generator batch

    # ------------------------------------------------------------------ schedules
    def _ramp(self, step: int, start: float, end: float) -> float:
        return cosine_ramp(step, self.schedule_steps, start, end)

    def gammas(self, step: int) -> tuple[float, float]:
        """(R1 gamma, R2 gamma) at generator step ``step``."""
        scale = self._ramp(step, 1.0, self.gamma_final_scale)
        return self.r1_gamma * scale, self.r2_gamma * scale

    def ema_decay_at(self, step: int) -> float:
        """0.5 ** (1 / half-life): the half-life ramps from 0 (decay 0: a copy) over the
        schedule, as the authors' ema_scheduler does in images."""
        half_life = self._ramp(step, 0.0, self.ema_half_life)
        return 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0

    def _schedule_optimizer(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The scheduled lr and beta2 from the optimizer's configured values (its defaults)."""
        lr0, (beta1, beta2_0) = optimizer.defaults["lr"], optimizer.defaults["betas"]
        for group in optimizer.param_groups:
            if self.lr_final is not None:
                group["lr"] = self._ramp(step, lr0, self.lr_final)
            if self.beta2_final is not None:
                group["betas"] = (beta1, self._ramp(step, beta2_0, self.beta2_final))

    # ------------------------------------------------------------------ losses
    def r3_d_loss(
        self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None, step: int = 0
    ) -> tuple[torch.Tensor, dict]:
        """L_D on a paired batch: reals (B, C, H, W), fakes of the same shape and labels y."""
        gamma1, gamma2 = self.gammas(step)
        real = real.detach().requires_grad_(gamma1 > 0)
        fake = fake.detach().requires_grad_(gamma2 > 0)
        d_real, d_fake = self._d(real, y), self._d(fake, y)
        loss = rpgan_d_loss(d_real, d_fake)
        stats = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        if gamma1 > 0:
            r1 = zero_centered_penalty(d_real, real)
            loss, stats["r1"] = loss + 0.5 * gamma1 * r1, r1.detach()
        if gamma2 > 0:
            r2 = zero_centered_penalty(d_fake, fake)
            loss, stats["r2"] = loss + 0.5 * gamma2 * r2, r2.detach()
        return loss, stats

    def r3_g_loss(
        self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """L_G: fakes (B, C, H, W) against a real batch of the same labels y."""
        return rpgan_g_loss(self._d(real.detach(), y), self._d(fake, y))

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        real, labels = batch
        y = labels if self.num_classes else None
        opt_g, opt_d = self.optimizers()
        step = self.global_step
        z = torch.randn(real.shape[0], self.z_dim, device=self.device)
        if int(self.d_steps) == step:  # the step's first batch: the discriminator's
            self._schedule_optimizer(opt_d.optimizer, step)
            with torch.no_grad():
                fake = self.generator(z, y)
            loss_d, stats = self.r3_d_loss(real, fake, y, step)
            self.check_finite("train/loss_d", loss_d)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip(opt_d)
            opt_d.optimizer.step()  # the raw optimizer: global_step counts generator steps
            self.d_steps += 1
            self.log("train/loss_d", loss_d, prog_bar=True)
            self.log_dict({f"train/{k}": v for k, v in stats.items()})
            return
        # the second batch: the generator's, with its own reals (as the authors' loop)
        self._schedule_optimizer(opt_g.optimizer, step)
        self.discriminator.requires_grad_(False)
        loss_g = self.r3_g_loss(real, self.generator(z, y), y)
        self.check_finite("train/loss_g", loss_g)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip(opt_g)
        opt_g.step()
        self.discriminator.requires_grad_(True)
        if self.ema is not None:
            if self.ema_half_life is not None:
                self.ema.decay = self.ema_decay_at(step)
            self.ema.update(self.generator)
        self.log("train/loss_g", loss_g, prog_bar=True)
        self.log("train/loss", loss_g)
        self.log("train/lr", opt_g.optimizer.param_groups[0]["lr"])
        self.log("train/gamma", self.gammas(step)[0])
