"""A hierarchical VAE, VDVAE-style (Child 2021), as one LightningModule; NVAE (Vahdat & Kautz
2020) is the same top-down hierarchy with depthwise cells, spectral regularisation and
residual-normal posteriors, none of which is here.

The model (``genlab.nets.hvae``): a bottom-up encoder and a top-down decoder of latent groups
z_1 .. z_G, p(z) = prod_i p(z_i | z_<i) and q(z | x) = prod_i q(z_i | x, z_<i), diagonal
Gaussians, and a discrete decoder likelihood on 8-bit pixels (``families.likelihoods``).
Training minimises the negative ELBO in nats per dimension, as VDVAE reports it (Child 2021,
Eq. 2 / Sec. 3),

    loss = ( E_q[-log p(x | z)] + sum_i E_q(z_<i) KL(q(z_i | x, z_<i) || p(z_i | z_<i)) ) / D,

each group's KL analytic given the sampled z_<i. Logged: ``train/loss``, ``train/recon``,
``train/kl`` (all per dim) and ``train/kl_<i>`` per group (i = 0: the top, lowest resolution).

Gradient skipping (Child 2021, Sec. 4 "gradient skipping"): an update whose gradient norm is at
least ``skip_threshold`` (or not finite) is skipped -- the gradients are dropped, the optimizer
leaves every parameter and its state untouched, the EMA is not updated -- and counted
(``train/skipped``); otherwise the gradients are clipped to norm ``grad_clip``. These replace
the trainer's ``gradient_clip_val``, which this family ignores.

``bits_per_dim(x)`` is the importance-weighted bound with ``iw_samples`` posterior samples
(Burda et al. 2016, Eq. 8) on the decoder's discrete likelihood, with the same helpers and
convention as ``families.vae`` (``genlab.metrics.likelihood``), so the numbers compare.
``sample(n, temperature=t)`` draws ancestrally from the prior with every prior std scaled by t
(a float, or one per group, the top group first); t = 0 takes the prior means, so the samples
are deterministic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from genlab.families.base import GenerativeModule
from genlab.families.likelihoods import DecoderLikelihood
from genlab.metrics.likelihood import importance_weighted_bound, nats_to_bits_per_dim
from genlab.nets.ema import EMA
from genlab.nets.hvae import Group

log = logging.getLogger("genlab")


class HierarchicalVAEModule(GenerativeModule):
    """Args:
    net: a ``genlab.nets.hvae.HierarchicalVAE``, or a partial of one called here with
        ``out_channels`` for the likelihood (the configs do this).
    image_shape: (C, H, W). likelihood: bernoulli | gaussian | logistic.
    iw_samples: K of the importance-weighted bound used by ``bits_per_dim``.
    iw_batch: largest number of (sample, image) pairs decoded at once.
    grad_clip: clip gradients to this norm (<= 0: no clipping).
    skip_threshold: skip updates whose gradient norm reaches this (<= 0: never skip).
    ema_decay: decay of the EMA copy of the weights used to sample and evaluate (0: none).
    temperature: default prior temperature of ``sample`` (a float or one per group).
    sample_mean: samples are the decoder's mean image (True) or pixels drawn from p(x | z).
    optimizer / lr_scheduler: partials; the scheduler is stepped every step.
    """

    def __init__(
        self,
        net: nn.Module | Callable[..., nn.Module],
        image_shape: Sequence[int] = (1, 28, 28),
        likelihood: str = "logistic",
        iw_samples: int = 100,
        iw_batch: int = 1024,
        grad_clip: float = 200.0,
        skip_threshold: float = 400.0,
        ema_decay: float = 0.0,
        temperature: float | Sequence[float] = 1.0,
        sample_mean: bool = True,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        sample_batch_size: int = 256,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.9))),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        self.image_shape = tuple(int(s) for s in image_shape)
        self.likelihood = DecoderLikelihood(likelihood, self.image_shape[0])
        if not isinstance(net, nn.Module):  # a partial: it learns its output width here
            net = net(out_channels=self.likelihood.out_channels)
        self.net = net
        self.iw_samples, self.iw_batch = int(iw_samples), int(iw_batch)
        self.grad_clip, self.skip_threshold = float(grad_clip), float(skip_threshold)
        self.ema = EMA(net, ema_decay) if ema_decay > 0 else None
        self.temperature = (
            float(temperature) if isinstance(temperature, (int, float)) else list(temperature)
        )
        self.sample_mean = bool(sample_mean)
        self.sample_batch_size = sample_batch_size
        # updates skipped so far (a buffer: checkpoints keep the count)
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self._skipped_now = False
        self._checked = False
        self._warned_clip = False

    @property
    def num_groups(self) -> int:
        return self.net.decoder.num_groups

    # ------------------------------------------------------------------ the ELBO
    def elbo_terms(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[Group]]:
        """One posterior sample: -log p(x | z) (B,) and the per-group KLs (G, B), in nats per
        image, and the groups (top first)."""
        params, groups = self.net(x, generator=generator)
        recon = self.likelihood.nll(params, x)
        return recon, torch.stack([g.kl for g in groups]), groups

    def training_step(self, batch, batch_idx):
        x, _ = batch
        if not self._checked:
            self.likelihood.check(x)
            self._checked = True
        self._skipped_now = False
        d = x[0].numel()
        recon, kls, _ = self.elbo_terms(x)
        loss = (recon + kls.sum(0)).mean() / d
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        per_group = kls.detach().mean(1) / d
        logs = {f"train/kl_{i}": v for i, v in enumerate(per_group)}
        logs |= {
            "train/recon": recon.detach().mean() / d,
            "train/kl": per_group.sum(),
            "train/skipped": self.skipped.float(),
        }
        self.log_dict(logs)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        g = torch.Generator().manual_seed(batch_idx)  # the same noise at every validation
        d = x[0].numel()
        recon, kls, _ = self.elbo_terms(x, generator=g)
        self.log_dict(
            {
                "val/loss": (recon + kls.sum(0)).mean() / d,
                "val/recon": recon.mean() / d,
                "val/kl": kls.sum(0).mean() / d,
            },
            sync_dist=True,
        )

    # ------------------------------------------------------------------ skipping, clipping
    def skip_or_clip(self) -> tuple[float, bool]:
        """VDVAE's update rule (Child 2021, Sec. 4): the gradient norm; if it reaches
        ``skip_threshold`` or is not finite, drop the gradients (the optimizer then skips every
        parameter) and count the skip; else clip to ``grad_clip``. Returns (norm, skipped).
        Reads the norm on the host: one synchronisation per step."""
        params = [p for p in self.net.parameters() if p.grad is not None]
        if not params:
            return 0.0, False
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skip = not math.isfinite(norm) or (0 < self.skip_threshold <= norm)
        if skip:
            for p in params:
                p.grad = None
            self.skipped += 1
        self._skipped_now = skip
        return norm, skip

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's hook between backward and the optimizer step: ``skip_or_clip``."""
        if gradient_clip_val and not self._warned_clip:
            log.info("hvae: trainer.gradient_clip_val ignored; model.grad_clip applies")
            self._warned_clip = True
        self.skip_or_clip()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._skipped_now:
            self.ema.update(self.net)

    def trainable_parameters(self):
        return self.net.parameters()

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, k: int, generator=None) -> torch.Tensor:
        """log w_k = log p(x | z_k) + sum_i [log p(z_k,i | z_k,<i) - log q(z_k,i | x, z_k,<i)],
        z_k ~ q(z | x): (k, B) in nats. The encoder runs once; the decoder on chunks of
        ``iw_batch`` (sample, image) pairs."""
        b = x.shape[0]
        acts = self.net.encoder(x)
        chunk = max(1, self.iw_batch // b)
        out = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            rep = [a.repeat(m, 1, 1, 1) for a in acts]  # sample-major: row j*b + i
            params, groups = self.net.decoder(rep, generator=generator)
            recon = self.likelihood.nll(params, x.repeat(m, 1, 1, 1))
            lw = -recon + sum(g.log_p - g.log_q for g in groups)
            out.append(lw.view(m, b))
        return torch.cat(out)

    def bpd_protocol(self) -> dict:
        return {
            "estimator": f"importance-weighted bound (Burda et al. 2016), K={self.iw_samples}",
            "iw_samples": self.iw_samples,
            "likelihood": self.likelihood.name,
            "weights": "ema" if self.ema is not None else "raw",
        }

    @torch.no_grad()
    def bits_per_dim(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        k: int | None = None,
    ) -> torch.Tensor:
        """Upper bound on -log2 P(x) / D for 8-bit images x (B, C, H, W) in [-1, 1]: the
        importance-weighted bound with K = ``k`` (default ``iw_samples``), EMA weights if
        kept. ``y`` is accepted for the contract (the model is unconditional)."""
        k = int(k or self.iw_samples)
        self.likelihood.check(x)
        with self.evaluating(), self.ema_weights():
            logw = self.log_weights(x, k, generator)
        log_px = importance_weighted_bound(logw.double())
        return nats_to_bits_per_dim(-log_px, x[0].numel()).float()

    # ------------------------------------------------------------------ the family contract
    def ema_target(self) -> nn.Module:
        return self.net

    def counted_module(self) -> nn.Module:
        return self.net

    def nfe_module(self) -> nn.Module:
        """The top-down decoder's output layer: it runs once per image at the end of each
        top-down pass (the decoder itself is called with no image tensor to count)."""
        return self.net.decoder.out

    def sampling_protocol(self) -> dict:
        output = "decoder mean" if self.sample_mean else "pixels drawn from p(x|z)"
        return {
            "name": "ancestral",
            "prior": f"top-down, {self.num_groups} latent groups",
            "temperature": self.temperature,
            "output": output,
        }

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean with every group at its posterior mean, (B, C, H, W) in [-1, 1]."""
        with self.evaluating():
            params, _ = self.net(x, mean=True)
        return self.likelihood.mean(params)

    def draw(self, m, y, generator, *, noise, index, n, progress, temperature=None, mean=None):
        """m images from the prior at ``temperature`` (default ``self.temperature``): the
        decoder's mean image, or (``mean=False``) pixels drawn from p(x | z)."""
        t = self.temperature if temperature is None else temperature
        params, _ = self.net.decoder(None, m, temperature=t, generator=generator)
        mean = self.sample_mean if mean is None else mean
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
