"""VQ-VAE (van den Oord et al. 2017) as a LightningModule.

The encoder's output z_e is quantised to the nearest codebook vectors (``nets.vq``), the
decoder reconstructs from the codes, and training minimises (Eq. 3)

    loss = -log p(x | z_q) / D + ||sg(z_e) - e||^2 + commitment ||z_e - sg(e)||^2,

with the reconstruction term per dimension (so ``commitment`` keeps the paper's scale; 0.25)
and the codebook term replaced by EMA updates when the quantiser's ``decay`` > 0. Logged:
``train/recon`` (nats per image), ``train/commitment``, ``train/perplexity``,
``train/code_usage`` (fraction of the codebook used by the batch), ``train/codes_restarted``.

Sampling needs a prior over the codes: ``VQPriorModule`` (below; ``model=vqvae_prior``) trains
an autoregressive network on the codes of a finished VQ-VAE run and samples through it. A
VQ-VAE alone is not ``Generative`` (it has no ``sample``), while reconstructions and
``bits_per_dim`` work. The bound uses a uniform prior over codes: with a
deterministic one-hot posterior, KL(q || p) = (code positions) * log K (Sec. 3.1), so
-log P(x) <= -log p(x | z_q(x)) + n log K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genlab.families.autoregressive import sample_categorical
from genlab.families.base import FamilyModule, GenerativeModule, count_parameters
from genlab.families.common import class_marginal_nll
from genlab.families.likelihoods import DecoderLikelihood
from genlab.metrics.likelihood import nats_to_bits_per_dim
from genlab.nets import rng
from genlab.nets.cached import cached_sampler, has_cached_sampler
from genlab.nets.transformer_ar import ImageGPT
from genlab.nets.vq import VectorQuantizer


class VQVAEModule(FamilyModule):
    """Args:
    encoder: ``encoder(x) -> z_e`` (B, D, h, w), e.g. ``VQEncoder``.
    decoder: ``decoder(z_q) -> (B, P*C, H, W)`` likelihood parameters, e.g. ``VQDecoder``; or a
        partial called with ``out_channels`` (the configs do this).
    quantizer: ``VectorQuantizer`` with ``code_dim`` = D.
    image_shape: (C, H, W). likelihood: bernoulli | gaussian | logistic.
    commitment: weight of the commitment loss (beta in the paper).
    optimizer / lr_scheduler: partials; the scheduler is stepped every step.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module | Callable[..., nn.Module],
        quantizer: VectorQuantizer,
        image_shape: Sequence[int] = (1, 28, 28),
        likelihood: str = "logistic",
        commitment: float = 0.25,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        sample_batch_size: int = 256,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.Adam(params, lr=2e-4)),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.image_shape = tuple(int(s) for s in image_shape)
        self.likelihood = DecoderLikelihood(likelihood, self.image_shape[0])
        if not isinstance(decoder, nn.Module):  # a partial: it learns its output width here
            self.decoder = decoder(out_channels=self.likelihood.out_channels)
        self.commitment = float(commitment)
        self.sample_batch_size = sample_batch_size
        self._checked = False

    # ------------------------------------------------------------------ model
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) of images x (B, C, H, W) in [-1, 1]."""
        return self.quantizer.codes(self.encoder(x))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> decoder output (B, P*C, H, W)."""
        return self.decoder(self.quantizer.lookup(codes))

    def terms(self, x: torch.Tensor):
        q = self.quantizer(self.encoder(x))
        recon = self.likelihood.nll(self.decoder(q.z_q), x)  # (B,) nats
        return recon, q

    def latent_shape(self) -> tuple[int, int]:
        h = self.image_shape[1] // 2 ** getattr(self.encoder, "downsample", 0)
        w = self.image_shape[2] // 2 ** getattr(self.encoder, "downsample", 0)
        return h, w

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, _ = batch
        if not self._checked:
            self.likelihood.check(x)
            self._checked = True
        recon, q = self.terms(x)
        dims = x[0].numel()
        loss = recon.mean() / dims + q.codebook + self.commitment * q.commitment
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/recon": recon.mean(),
                "train/commitment": q.commitment,
                "train/perplexity": q.perplexity,
                "train/code_usage": q.usage,
                "train/codes_restarted": float(q.restarted),
            }
        )
        if self.quantizer.decay == 0:
            self.log("train/codebook", q.codebook)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        recon, q = self.terms(x)
        self.log_dict(
            {
                "val/loss": recon.mean() / x[0].numel() + self.commitment * q.commitment,
                "val/recon": recon.mean(),
                "val/perplexity": q.perplexity,
            },
            sync_dist=True,
        )

    # ------------------------------------------------------------------ likelihood
    def bpd_protocol(self) -> dict:
        h, w = self.latent_shape()
        return {
            "estimator": "ELBO with a uniform prior over codes: -log p(x|z_q) + n log K",
            "code_positions": h * w,
            "num_codes": self.quantizer.num_codes,
            "likelihood": self.likelihood.name,
        }

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, y=None, generator=None) -> torch.Tensor:
        """Upper bound on -log2 P(x) / D for 8-bit images x (B, C, H, W) in [-1, 1] (module
        docstring); (B,). Unconditional and deterministic: ``y`` and ``generator`` unused."""
        self.likelihood.check(x)
        with self.evaluating():
            recon, q = self.terms(x)
        n_codes = q.codes[0].numel()
        nll = recon + n_codes * math.log(self.quantizer.num_codes)
        return nats_to_bits_per_dim(nll, x[0].numel())

    # ------------------------------------------------------------------ the family contract
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean from the quantised codes of x, (B, C, H, W) in [-1, 1]."""
        with self.evaluating():
            return self.likelihood.mean(self.decoder(self.quantizer(self.encoder(x)).z_q))


class VQPriorModule(GenerativeModule):
    """A VQ-VAE with a learned prior over its codes: the second stage of van den Oord et al.
    2017 (Sec. 3.1 and 4.2). The VQ-VAE of a finished run (``vqvae_run``) is loaded and frozen;
    each training batch is encoded to its code grid (B, h, w) and an autoregressive network
    (PixelCNN, Gated PixelCNN or PixelRNN over one channel of K values, codes fed through a
    learned embedding) is trained to maximise log p(codes) (``train/loss`` and ``val/loss`` in
    bits per code position). Then

    - ``sample(n, y)`` draws codes from the prior (the cached sampler where the network has
      one) and returns the VQ-VAE decoder's mean image;
    - ``bits_per_dim(x)`` is the bound -log p(x | z_q(x)) - log p_prior(z_q(x)) (the VQ-VAE's
      ELBO with the learned prior in place of the uniform one) in the protocol's convention.

    Args:
        vqvae_run: run directory of a trained ``model=vqvae`` run. ckpt: its checkpoint.
        prior: partial network, called with ``channels=1``, ``in_channels=embed_dim`` and
            ``num_values`` = the codebook size (e.g. ``genlab.nets.GatedPixelCNN``).
        image_shape: (C, H, W) of the data (checked against the VQ-VAE's).
        embed_dim: width of the code embedding fed to the prior.
        num_classes: > 0 for a class-conditional prior.
    """

    def __init__(
        self,
        vqvae_run: str,
        prior: Callable[..., nn.Module],
        image_shape: Sequence[int] = (1, 28, 28),
        ckpt: str = "last",
        embed_dim: int = 32,
        num_classes: int = 0,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        fast_sampling: bool = True,
        sample_batch_size: int = 64,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(
            optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3)),
            lr_scheduler,
            compile=compile,
            channels_last=channels_last,
        )
        from genlab.runs import load_model  # the first stage's run directory

        vqvae = load_model(vqvae_run, ckpt, "cpu").model
        if not isinstance(vqvae, VQVAEModule):
            raise ValueError(f"{vqvae_run} is a {type(vqvae).__name__} run, not model=vqvae")
        self.image_shape = tuple(int(s) for s in image_shape)
        if tuple(vqvae.image_shape) != self.image_shape:
            raise ValueError(
                f"{vqvae_run} was trained on {vqvae.image_shape} images, this data is "
                f"{self.image_shape}: use the VQ-VAE's dataset and image size"
            )
        self.vqvae = vqvae.requires_grad_(False).eval()
        self.num_codes = vqvae.quantizer.num_codes
        self.num_classes = int(num_classes)
        self.embedding = nn.Embedding(self.num_codes, embed_dim)
        self.net = prior(channels=1, in_channels=embed_dim, num_values=self.num_codes)
        self.fast_sampling = fast_sampling
        self.sample_batch_size = int(sample_batch_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqvae.eval()  # frozen: never update its codebook or statistics
        return self

    # ------------------------------------------------------------------ the prior
    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)  # (B, h, w) -> (B, E, h, w)

    def prior_nll(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p_prior(codes | y) per image (B,) in nats, codes (B, h, w)."""
        logits = self.net(self._embed(codes), y if self.num_classes else None)[:, :, 0]
        nll = F.cross_entropy(logits.double(), codes, reduction="none")  # (B, h, w)
        return nll.flatten(1).sum(1).float()

    def _step_loss(self, batch) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            codes = self.vqvae.encode(x)
        return self.prior_nll(codes, y).mean() / (codes[0].numel() * math.log(2))

    def training_step(self, batch, batch_idx):
        loss = self._step_loss(batch)
        self.check_finite("train/loss", loss)
        self.log("train/loss", loss, prog_bar=True)  # bits per code position
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._step_loss(batch), prog_bar=True, sync_dist=True)

    def trainable_parameters(self):
        return [*self.net.parameters(), *self.embedding.parameters()]

    # ------------------------------------------------------------------ likelihood
    def bpd_protocol(self) -> dict:
        return {
            "estimator": "ELBO with the learned prior: -log p(x|z_q) - log p_prior(z_q)",
            "num_codes": self.num_codes,
            "likelihood": self.vqvae.likelihood.name,
        }

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None, generator=None):
        """Upper bound on -log2 P(x) / D (B,) for 8-bit images x in [-1, 1]; a conditional
        prior without labels uses the class-marginal prior mean_y p(z | y). (Deterministic:
        ``generator`` is unused.)"""
        with self.evaluating():
            return self._bits_per_dim(x, y)

    def _bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        recon, q = self.vqvae.terms(x)
        if self.num_classes and y is None:
            prior = class_marginal_nll(
                lambda c: self.prior_nll(q.codes, c), self.num_classes, x.shape[0], x.device
            )
        else:
            prior = self.prior_nll(q.codes, y).double()
        return nats_to_bits_per_dim(recon.double() + prior, x[0].numel()).float()

    # ------------------------------------------------------------------ sampling
    @property
    def parameter_count(self) -> int:
        return count_parameters(self.net) + count_parameters(self.embedding)

    def nfe_module(self) -> nn.Module:
        return self.net

    def sampling_protocol(self) -> dict:
        fast = self.fast_sampling and has_cached_sampler(self.net)
        scheme = "KV cache" if isinstance(self.net, ImageGPT) else "Ramachandran et al. 2017"
        return {
            "name": "prior over codes, raster order, then the VQ-VAE decoder's mean",
            "sampler": f"cached ({scheme})" if fast else "plain",
        }

    def sample_codes(self, m: int, y, generator, fast: bool) -> torch.Tensor:
        """Codes (m, h, w) drawn from the prior, one position at a time."""
        h, w = self.vqvae.latent_shape()
        dtype = self.embedding.weight.dtype
        x = torch.zeros(m, self.embedding.embedding_dim, h, w, device=self.device, dtype=dtype)
        codes = torch.zeros(m, h, w, dtype=torch.long, device=self.device)
        u = rng.rand((m, h, w), generator, device=self.device)
        cache = cached_sampler(self.net) if fast else None
        if cache is not None:
            cache.reset(x, y)
        for i in range(h):
            for j in range(w):
                if cache is not None:
                    logits = cache.step(x, i, j)[:, :, 0]
                else:
                    logits = self.net(x, y)[:, :, 0, i, j]
                codes[:, i, j] = sample_categorical(logits, u[:, i, j])
                x[:, :, i, j] = self.embedding(codes[:, i, j])
            if cache is not None:
                cache.end_row(x, i)
        return codes

    def draw(self, m, y, generator, *, noise, index, n, progress, fast=None):
        """One chunk: codes from the prior (``fast``: the cached sampler, default
        ``fast_sampling``), decoded to the VQ-VAE decoder's mean. A conditional prior given
        no labels gets uniform random ones."""
        fast = self.fast_sampling if fast is None else fast
        codes = self.sample_codes(m, y, generator, fast)
        return self.vqvae.likelihood.mean(self.vqvae.decode_codes(codes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.vqvae.reconstruct(x)
