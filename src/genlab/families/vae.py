"""Variational autoencoders as one LightningModule: VAE (Kingma & Welling 2014), beta-VAE
(Higgins et al. 2017) with KL warm-up (Bowman et al. 2016; Sonderby et al. 2016), and the
conditional VAE (Sohn et al. 2015; labels into encoder and decoder, prior N(0, I)).

Training minimises the negative ELBO per image in nats (Kingma & Welling 2014, Eq. 10),

    loss = E_q[-log p(x | z)] + beta_t KL(q(z | x) || N(0, I)),

with the Gaussian KL in closed form (Appendix B) and beta_t rising linearly from 0 to ``beta``
over ``kl_warmup_steps``. The reconstruction and KL terms are logged separately
(``train/recon``, ``train/kl``), with ``train/elbo`` = -(recon + KL) at beta = 1. Validation
logs the negative ELBO at beta = 1 as ``val/loss`` and the number of active latent units
(Burda et al. 2016, Sec. 5.2: Cov_x E_q[z_d] > 0.01) as ``val/active_units``.

``bits_per_dim(x)`` is the importance-weighted bound with ``iw_samples`` samples (Burda et al.
2016, Eq. 8) on the decoder's discrete likelihood, in the evaluation protocol's convention;
K = 1 is the ELBO. Samples are the decoder's mean image for z ~ N(0, I) (``mean=False`` draws
the pixels too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from genlab.families.base import GenerativeModule
from genlab.families.likelihoods import DecoderLikelihood
from genlab.metrics.likelihood import importance_weighted_bound, nats_to_bits_per_dim
from genlab.nets import rng

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp logvar) || N(0, I)) per latent dimension, in nats
    (Kingma & Welling 2014, Appendix B): -1/2 (1 + logvar - mean^2 - exp logvar)."""
    return -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp logvar), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


class VAEModule(GenerativeModule):
    """Args:
    encoder: ``encoder(x, y) -> (mean, logvar)`` each (B, latent_dim), e.g. ``ConvEncoder``.
    decoder: ``decoder(z, y) -> (B, P*C, H, W)`` likelihood parameters, e.g. ``ConvDecoder``
        with ``out_channels`` = P*C (P = 1 for bernoulli, 2 otherwise); or a partial that is
        called with ``out_channels`` (the configs do this).
    image_shape: (C, H, W). likelihood: bernoulli | gaussian | logistic (families.likelihoods).
    beta: weight of the KL term (1: VAE; > 1: beta-VAE). kl_warmup_steps: linear warm-up of
        the KL weight from 0 (0: off). num_classes: > 0 conditional (labels from the batch).
    iw_samples: K of the importance-weighted bound used by ``bits_per_dim``.
    iw_batch: largest number of (sample, image) pairs decoded at once.
    optimizer / lr_scheduler: partials; the scheduler is stepped every step.
    sample_mean: ``sample`` returns the decoder's mean image (True) or pixels drawn from
        p(x | z) (False: binary images for a Bernoulli decoder, like binarised data).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module | Callable[..., nn.Module],
        image_shape: Sequence[int] = (1, 28, 28),
        likelihood: str = "logistic",
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        num_classes: int = 0,
        iw_samples: int = 100,
        iw_batch: int = 4096,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        sample_batch_size: int = 256,
        sample_mean: bool = True,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3)),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        self.encoder, self.decoder = encoder, decoder
        self.image_shape = tuple(int(s) for s in image_shape)
        self.likelihood = DecoderLikelihood(likelihood, self.image_shape[0])
        if not isinstance(decoder, nn.Module):  # a partial: it learns its output width here
            self.decoder = decoder(out_channels=self.likelihood.out_channels)
        self.beta, self.kl_warmup_steps = float(beta), int(kl_warmup_steps)
        self.num_classes = int(num_classes)
        self.iw_samples, self.iw_batch = int(iw_samples), int(iw_batch)
        self.sample_batch_size = sample_batch_size
        self.sample_mean = bool(sample_mean)
        self.latent_dim = int(encoder.latent_dim)
        self._checked = False

    # ------------------------------------------------------------------ model
    def _y(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return y if self.num_classes else None

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z | x, y): (mean, logvar), each (B, latent_dim)."""
        return self.encoder(x, self._y(y))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """p(x | z, y): decoder output (B, P*C, H, W) (the likelihood's parameters)."""
        return self.decoder(z, self._y(y))

    def kl_weight(self, step: int | None = None) -> float:
        step = self.global_step if step is None else step
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def elbo_terms(self, x, y=None, generator: torch.Generator | None = None):
        """One-sample reconstruction term -log p(x|z) (B,), analytic KL (B,) in nats, and the
        posterior (mean, logvar); z = mean + std * eps (the reparameterisation trick)."""
        mean, logvar = self.encode(x, y)
        if generator is None:
            eps = torch.randn_like(mean)
        else:
            eps = torch.randn(mean.shape, generator=generator).to(mean)
        z = mean + torch.exp(0.5 * logvar) * eps
        recon = self.likelihood.nll(self.decode(z, y), x)
        return recon, gaussian_kl(mean, logvar).sum(1), (mean, logvar)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = batch
        if not self._checked:
            self.likelihood.check(x)
            self._checked = True
        recon, kl, _ = self.elbo_terms(x, y)
        beta = self.kl_weight()
        loss = (recon + beta * kl).mean()
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/recon": recon.mean(),
                "train/kl": kl.mean(),
                "train/elbo": -(recon + kl).mean(),
                "train/beta": beta,
            }
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_means: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        g = torch.Generator().manual_seed(batch_idx)  # the same noise at every validation
        recon, kl, (mean, _) = self.elbo_terms(x, y, generator=g)
        self._val_means.append(mean.detach())
        self.log_dict(
            {"val/loss": (recon + kl).mean(), "val/recon": recon.mean(), "val/kl": kl.mean()},
            prog_bar=False,
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        means = torch.cat(self._val_means) if self._val_means else None
        if means is not None and len(means) > 1:
            self.log("val/active_units", float((means.var(0) > 0.01).sum()), sync_dist=True)
        self._val_means = []

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def log_weights(
        self, x: torch.Tensor, y: torch.Tensor | None, k: int, generator=None
    ) -> torch.Tensor:
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): (k, B) in nats."""
        b = x.shape[0]
        mean, logvar = self.encode(x, y)
        chunk = max(1, self.iw_batch // b)
        out = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn((m, *mean.shape), generator=generator).to(mean)
            z = mean + torch.exp(0.5 * logvar) * eps  # (m, B, latent)
            flat = z.reshape(m * b, -1)
            yy = None if y is None else y.repeat(m)
            recon = self.likelihood.nll(self.decode(flat, yy), x.repeat(m, 1, 1, 1)).view(m, b)
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            out.append(-recon + log_pz - gaussian_log_prob(z, mean, logvar))
        return torch.cat(out)

    def bpd_protocol(self) -> dict:
        marginal = f", marginalised over {self.num_classes} classes" if self.num_classes else ""
        return {
            "estimator": f"importance-weighted bound (Burda et al. 2016), K={self.iw_samples}"
            + marginal,
            "iw_samples": self.iw_samples,
            "likelihood": self.likelihood.name,
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
        importance-weighted bound with K = ``k`` (default ``iw_samples``). A conditional model
        given no labels bounds the marginal, log p(x) = log (1/C) sum_y p(x | y)."""
        k = int(k or self.iw_samples)
        self.likelihood.check(x)
        with self.evaluating():
            logw = self._log_weights_marginal(x, y, k, generator)
        log_px = importance_weighted_bound(logw.double())
        return nats_to_bits_per_dim(-log_px, x[0].numel()).float()

    def _log_weights_marginal(self, x, y, k: int, generator) -> torch.Tensor:
        """log weights (K', B): one IW estimate per class for a conditional model without
        labels (averaged in p-space by the bound), else ``log_weights``."""
        if self.num_classes and y is None:  # one IW estimate per class, averaged in p-space
            logw = torch.cat(
                [
                    self.log_weights(x, torch.full_like(x[:, 0, 0, 0], c).long(), k, generator)
                    for c in range(self.num_classes)
                ]
            )
        else:
            logw = self.log_weights(x, y, k, generator)
        return logw

    # ------------------------------------------------------------------ the family contract
    def nfe_module(self) -> nn.Module:
        """The network one sample passes through (the decoder): one evaluation per image."""
        return self.decoder

    def sampling_protocol(self) -> dict:
        output = "decoder mean" if self.sample_mean else "pixels drawn from p(x|z)"
        return {"name": "ancestral", "prior": "N(0, I)", "output": output}

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), (n, latent_dim) on the CPU."""
        return rng.randn((n, self.latent_dim), generator)

    @torch.no_grad()
    def latent_kl(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean KL(q(z_d | x) || N(0, 1)) of each latent dimension over the batch, (latent_dim,):
        the dimensions that carry information have large values (traversal order)."""
        mean, logvar = self.encode(x, y)
        return gaussian_kl(mean, logvar).mean(0)

    @torch.no_grad()
    def encode_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior means (B, latent_dim): the latent of an image, for grids."""
        return self.encode(x, y)[0]

    def generate(
        self, z: torch.Tensor, y: torch.Tensor | None = None, use_ema: bool = True
    ) -> torch.Tensor:
        """The decoder's mean for latents z (B, latent_dim) in eval mode, differentiable with
        respect to z (latent optimisation). ``use_ema`` is accepted for the contract (a VAE
        keeps no EMA copy)."""
        with self.evaluating():
            return self.likelihood.mean(self.decode(z.to(self.device), self._y(y)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean at the posterior mean, (B, C, H, W) in [-1, 1]."""
        mean, _ = self.encode(x, y)
        return self.likelihood.mean(self.decode(mean, y))

    def prior_noise(self, n, generator, *, z=None, mean=None) -> torch.Tensor:
        """The latents of the whole request: ``z`` (n, latent_dim) if given, else z ~ N(0, I)."""
        return self.latents(n, generator) if z is None else z

    def draw(self, m, y, generator, *, noise, index, n, progress, z=None, mean=None):
        """The decoder's mean for this chunk's latents (``sample(..., mean=False)`` draws the
        pixels from p(x | z) too; default ``sample_mean``); a conditional model given no
        labels gets uniform random ones."""
        params = self.decode(noise.to(self.device), y if self.num_classes else None)
        mean = self.sample_mean if mean is None else mean
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
