"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1, App. G:
the "KL-f4" / "KL-f8" first stages) as a LightningModule: the first stage that latent
diffusion and flow families train in.

The encoder gives a diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) over a
(latent_channels, H / f, W / f) latent, the decoder maps z back to an image. Training samples
z ~ q(z | x) (reparameterised) and minimises, per batch,

    loss = L_rec + kl_weight * L_KL + disc_weight * lambda * L_adv + feature_weight * L_feat

- L_rec = (1/B) sum_b sum_{c,h,w} |x - D(z)| (``recon=l1``, LDM's pixel term) or (x - D(z))^2
  (``l2``): **summed over the pixels of an image and averaged over the batch**, as LDM's
  ``LPIPSWithDiscriminator`` does (its learned output log-variance and LPIPS term are left out);
- L_KL = (1/B) sum_b 0.5 sum_{c,h,w} (mean^2 + exp(logvar) - 1 - logvar): the closed-form
  KL(q(z | x) || N(0, I)) (Kingma & Welling 2014, App. B), **summed over the latent dimensions
  and averaged over the batch**; with the pixel sum above, ``kl_weight`` = 1e-6 has the meaning
  it has in LDM's KL-f8 config;
- L_adv = -mean D_patch(D(z)) (hinge generator loss), on only from global step ``disc_start``
  and only with ``disc_weight`` > 0. lambda is VQGAN's adaptive weight (Esser et al. 2021,
  Eq. 7): ||grad_GL L_rec|| / (||grad_GL L_adv|| + 1e-4) at the decoder's last layer GL,
  clamped to [0, 1e4] (``adaptive_disc_weight=false``: lambda = 1);
- L_feat = (1/B) sum_b mean_k (phi_k(x) - phi_k(D(z)))^2: feature matching on a frozen genlab
  extractor phi (``feature_extractor``: ``digits``, the bundled digit network's 128-d
  features, or ``faces``, the face network's 256-d embedding; off by default).

From ``disc_start`` on, each batch also takes one discriminator step with LDM's hinge loss
0.5 (mean relu(1 - D_patch(x)) + mean relu(1 + D_patch(D(z)))), on the reconstructions of the
autoencoder step (before its update; LDM recomputes them after it). The discriminator's
optimizer is stepped directly, so ``global_step`` counts autoencoder steps (one per batch).

``latent_scale`` (a buffer, 1 at init) is 1 / std of the **posterior means** of the validation
set, over all their elements, recomputed at the end of every validation epoch and logged as
``val/latent_std``: latent models train on ``latent_scale * encode(x)`` so their latents have
unit variance (Rombach et al. Sec. 4.3.2 and App. G, the "scale factor"). LDM instead takes
the std of posterior *samples* of the first training batch, once. ``latent_scale_step`` (a
buffer) is the global step it was measured at, -1 while it never was (a run shorter than
``trainer.val_check_interval``); ``measure_latent_scale(batches)`` measures it on any images.

Validation reconstructs from the posterior mean (deterministic) and logs ``val/loss``
(L_rec + kl_weight L_KL), ``val/recon``, ``val/kl``, ``val/psnr`` (dB) and ``val/ssim``, both
on images mapped to [0, 1]. Not ``Generative`` (no prior to sample): ``Reconstructing``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.families.base import FamilyModule, count_parameters, fused_on_cuda
from genlab.metrics.reconstruction import psnr, ssim
from genlab.nets import rng
from genlab.utils import ConfigError

RECON = ("l1", "l2")
EXTRACTORS = ("digits", "faces")


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image (B,), summed over the other dimensions."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def load_feature_net(name: str, path: str | None = None) -> nn.Module:
    """The frozen extractor for feature matching: ``digits`` or ``faces``, eval mode."""
    if name == "digits":
        from genlab.metrics.digits import load_digit_classifier

        net = load_digit_classifier(path)
    elif name == "faces":
        from genlab.metrics.faces import load_face_net

        net = load_face_net(path)
    else:
        raise ConfigError(f"feature_extractor must be one of {EXTRACTORS} or null, got {name!r}")
    return net.requires_grad_(False).eval()


class AutoencoderModule(FamilyModule):
    """Args:
    encoder: ``encoder(x) -> (mean, logvar)`` each (B, latent_channels, h, w), with attributes
        ``latent_channels`` and ``downsample``, e.g. ``genlab.nets.autoencoder.KLEncoder``.
    decoder: ``decoder(z) -> (B, C, H, W)`` (unbounded), e.g. ``KLDecoder``; ``last_layer``
        (a weight) is needed for the adaptive discriminator weight.
    discriminator: ``D(x) -> logits`` (any shape), e.g. ``PatchDiscriminator``; None: no GAN.
    image_shape: (C, H, W). recon: l1 | l2. kl_weight: weight of L_KL (module docstring).
    disc_weight: weight of L_adv (0: off). disc_start: the global step it switches on at.
    adaptive_disc_weight: VQGAN's adaptive lambda (else 1).
    feature_weight: weight of L_feat (0: off). feature_extractor: digits | faces | None.
    feature_weights: the extractor's weights file (None: the bundled one).
    optimizer / disc_optimizer: partial optimizers (default Adam 1e-3, betas (0.5, 0.9)).
    gradient_clip_val: clip each network's gradient norm to this before its step (None: off,
    as in LDM; Lightning cannot clip under manual optimisation, so the family does).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        discriminator: nn.Module | None = None,
        image_shape: Sequence[int] = (1, 28, 28),
        recon: str = "l1",
        kl_weight: float = 1e-6,
        disc_weight: float = 0.0,
        disc_start: int = 2000,
        adaptive_disc_weight: bool = True,
        feature_weight: float = 0.0,
        feature_extractor: str | None = None,
        feature_weights: str | None = None,
        optimizer: Callable | None = None,
        disc_optimizer: Callable | None = None,
        gradient_clip_val: float | None = None,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(compile=compile, channels_last=channels_last)
        if recon not in RECON:
            raise ConfigError(f"recon must be one of {RECON}, got {recon!r}")
        if encoder.latent_channels != decoder.latent_channels:
            raise ConfigError(
                f"the encoder gives {encoder.latent_channels} latent channels, the decoder "
                f"takes {decoder.latent_channels}"
            )
        if disc_weight > 0 and discriminator is None:
            raise ConfigError("disc_weight > 0 needs a discriminator")
        if feature_weight > 0 and not feature_extractor:
            raise ConfigError("feature_weight > 0 needs a feature_extractor (digits or faces)")
        self.automatic_optimization = False
        self.encoder, self.decoder, self.discriminator = encoder, decoder, discriminator
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_channels = int(encoder.latent_channels)
        self.recon, self.kl_weight = recon, float(kl_weight)
        self.disc_weight, self.disc_start = float(disc_weight), int(disc_start)
        self.adaptive_disc_weight = bool(adaptive_disc_weight)
        self.feature_weight = float(feature_weight)
        self.feature_extractor = feature_extractor if feature_weight > 0 else None
        # a plain attribute, not a submodule: frozen, never in checkpoints, never in train mode
        self._features = (
            [load_feature_net(feature_extractor, feature_weights)] if self.feature_extractor else []
        )
        adam = lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9))  # noqa: E731
        self.optimizer_fn = optimizer or adam
        self.disc_optimizer_fn = disc_optimizer or adam
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("latent_scale_step", torch.full((), -1, dtype=torch.long))
        self._stats: list[torch.Tensor] | None = None  # validation sum, sum of squares, count

    # ------------------------------------------------------------------ the interface
    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | x), each (B, latent_channels, h, w), for x (B, C, H, W) in
        [-1, 1]; logvar in [-30, 20]. In the current mode, with gradients."""
        return self.encoder(x)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) of x (B, C, H, W) in [-1, 1], not multiplied by
        ``latent_scale``: the posterior mean, or with ``sample`` a draw mean + std * eps
        (eps from ``generator``)."""
        mean, logvar = self.encoder(x)
        if not sample:
            return mean
        eps = rng.randn(mean.shape, generator, dtype=mean.dtype, device=mean.device)
        return mean + (0.5 * logvar).exp() * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] (clamped) from latents (B, latent_channels, h, w),
        differentiable with respect to z (zero gradient where a pixel is clamped)."""
        return self.decoder(z).clamp(-1, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_channels, h, w): h = H / f rounded up at every stride-2 level (28 -> 7)."""
        h, w = self.image_shape[1:]
        for _ in range(self.encoder.downsample):
            h, w = -(-h // 2), -(-w // 2)
        return self.latent_channels, h, w

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """decode(posterior mean of x), (B, C, H, W) in [-1, 1], in eval mode; ``y`` unused."""
        with self.evaluating():
            return self.decode(self.encode(x))

    # ------------------------------------------------------------------ losses
    def recon_loss(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """L_rec per image (B,): |x - out| or (x - out)^2 summed over C, H, W."""
        diff = out - x
        return (diff.abs() if self.recon == "l1" else diff.pow(2)).flatten(1).sum(1)

    def feature_loss(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """L_feat: mean over the batch of the mean squared difference between the extractor's
        features of x and of out (clamped to [-1, 1]); 0 without an extractor."""
        if not self._features:
            return x.new_zeros(())
        net = self._features[0].to(x.device)
        with torch.no_grad():
            target = net.features(x)
        return (net.features(out.clamp(-1, 1)) - target).pow(2).mean(1).mean()

    def disc_active(self, step: int | None = None) -> bool:
        """Whether the adversarial term and the discriminator step are on at ``step``
        (default: the current global step)."""
        step = self.global_step if step is None else step
        return self.disc_weight > 0 and step >= self.disc_start

    def adaptive_weight(self, rec: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
        """VQGAN's lambda (Esser et al. 2021, Eq. 7), detached; 1 when not adaptive."""
        if not self.adaptive_disc_weight:
            return g_adv.new_ones(())
        last = self.decoder.last_layer
        (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
        (g_gan,) = torch.autograd.grad(g_adv, last, retain_graph=True)
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def disc_loss(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """LDM's hinge loss 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(out)))."""
        real, fake = self.discriminator(x), self.discriminator(out.detach())
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, _ = batch
        opts = self.optimizers()
        opt_ae, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        disc_on = self.disc_active()
        mean, logvar = self.encoder(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # reparameterised sample
        out = self.decoder(z)
        rec, kl = self.recon_loss(x, out).mean(), gaussian_kl(mean, logvar).mean()
        loss = rec + self.kl_weight * kl
        logs = {"train/recon": rec.detach(), "train/kl": kl.detach()}
        if self.feature_weight > 0:
            feat = self.feature_loss(x, out)
            loss = loss + self.feature_weight * feat
            logs["train/feature"] = feat.detach()
        if disc_on:
            self.discriminator.requires_grad_(False)
            g_adv = -self.discriminator(out).mean()
            weight = self.adaptive_weight(rec, g_adv)
            loss = loss + self.disc_weight * weight * g_adv
            self.discriminator.requires_grad_(True)
            logs |= {"train/g_adv": g_adv.detach(), "train/disc_lambda": weight}
        self.check_finite("train/loss", loss)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_ae)
        opt_ae.step()  # counts the global step
        if disc_on:
            loss_d = self.disc_loss(x, out)
            self.check_finite("train/disc", loss_d)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip(opt_d)
            opt_d.optimizer.step()  # the raw optimizer: global_step counts autoencoder steps
            logs["train/disc"] = loss_d.detach()
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log_dict(logs)
        return {"loss": loss.detach(), **logs}  # on_train_batch_end's outputs

    def _clip(self, opt) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(opt, self.gradient_clip_val, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        opt = fused_on_cuda(self.optimizer_fn, self.device)
        ae = opt([*self.encoder.parameters(), *self.decoder.parameters()])
        if self.discriminator is None:
            return ae
        disc = fused_on_cuda(self.disc_optimizer_fn, self.device)
        return [ae, disc(self.discriminator.parameters())]

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise ConfigError(
                "AutoencoderModule steps the discriminator's optimizer directly, which fp16 "
                "loss scaling does not support: use trainer.precision=bf16-mixed or 32-true"
            )

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _accumulate(stats: list[torch.Tensor] | None, mean: torch.Tensor) -> list[torch.Tensor]:
        """[sum, sum of squares, count] of the elements of mean, added to stats (float64)."""
        m = mean.detach().double()
        new = [m.sum(), m.pow(2).sum(), torch.tensor(m.numel(), dtype=torch.float64)]
        new = [t.to(m.device) for t in new]
        return new if stats is None else [a + b for a, b in zip(stats, new, strict=True)]

    def _set_latent_scale(self, stats: list[torch.Tensor]) -> torch.Tensor | None:
        """latent_scale = 1 / std (n - 1 in the denominator) from [sum, squares, count];
        returns the std (None for fewer than two elements)."""
        total, squares, n = stats
        if n < 2:
            return None
        std = ((squares - total**2 / n) / (n - 1)).clamp_min(1e-24).sqrt()
        self.latent_scale.fill_(float(1.0 / std))
        self.latent_scale_step.fill_(int(self.global_step))
        return std

    @torch.no_grad()
    def measure_latent_scale(self, batches: Iterable) -> float:
        """Sets ``latent_scale`` to 1 / std of the posterior means of the images in
        ``batches`` (tensors (B, C, H, W) in [-1, 1], or (images, labels) pairs), in eval
        mode; returns it."""
        stats = None
        with self.evaluating():
            for batch in batches:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                stats = self._accumulate(stats, self.encode(x.to(self.device)))
        if stats is None or self._set_latent_scale(stats) is None:
            raise ValueError("measure_latent_scale needs at least two latent elements")
        return float(self.latent_scale)

    def on_validation_epoch_start(self) -> None:
        self._stats = None

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        mean, logvar = self.encoder(x)
        out = self.decoder(mean)
        rec, kl = self.recon_loss(x, out).mean(), gaussian_kl(mean, logvar).mean()
        x_hat = out.clamp(-1, 1)
        self.log_dict(
            {
                "val/loss": rec + self.kl_weight * kl,
                "val/recon": rec,
                "val/kl": kl,
                "val/psnr": psnr(x, x_hat),
                "val/ssim": ssim(x, x_hat),
            },
            sync_dist=True,
        )
        self._stats = self._accumulate(self._stats, mean)

    def on_validation_epoch_end(self) -> None:
        """latent_scale = 1 / std of the validation posterior means (all elements, n - 1);
        not from Lightning's sanity check (a few batches before training)."""
        if self._stats is None or self.trainer.sanity_checking:
            self._stats = None
            return
        stats = [self.trainer.strategy.reduce(t, reduce_op="sum") for t in self._stats]
        self._stats = None
        std = self._set_latent_scale(stats)
        if std is not None:
            self.log("val/latent_std", std.float(), sync_dist=False)

    # ------------------------------------------------------------------ description
    @property
    def parameter_count(self) -> int:
        """Encoder and decoder (what latent models use), not the discriminator."""
        return count_parameters(self.encoder) + count_parameters(self.decoder)

    def describe(self, use_ema: bool = True) -> dict:
        return {
            **super().describe(use_ema),
            "autoencoder": {
                "latent_shape": list(self.latent_shape),
                "downsample_factor": 2**self.encoder.downsample,
                "latent_scale": float(self.latent_scale),
                "latent_scale_step": int(self.latent_scale_step),
                "recon": self.recon,
                "kl_weight": self.kl_weight,
                "disc_weight": self.disc_weight,
                "disc_start": self.disc_start,
                "feature_extractor": self.feature_extractor,
                "feature_weight": self.feature_weight,
            },
        }
