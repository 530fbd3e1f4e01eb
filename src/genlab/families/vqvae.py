"""VQ-VAE (van den Oord et al. 2017) as a LightningModule.

The encoder's output z_e is quantised to the nearest codebook vectors (``nets.vq``), the
decoder reconstructs from the codes, and training minimises (Eq. 3)

    loss = -log p(x | z_q) / D + ||sg(z_e) - e||^2 + commitment ||z_e - sg(e)||^2,

with the reconstruction term per dimension (so ``commitment`` keeps the paper's scale; 0.25)
and the codebook term replaced by EMA updates when the quantiser's ``decay`` > 0. Logged:
``train/recon`` (nats per image), ``train/commitment``, ``train/perplexity``,
``train/code_usage`` (fraction of the codebook used by the batch), ``train/codes_restarted``.

Sampling needs a prior over the codes (an autoregressive model trained on the encoded data);
without one ``can_sample`` is False and ``sample()`` raises ``SamplingUnavailableError``, while
reconstructions and ``bits_per_dim`` work. The bound uses a uniform prior over codes: with a
deterministic one-hot posterior, KL(q || p) = (code positions) * log K (Sec. 3.1), so
-log P(x) <= -log p(x | z_q(x)) + n log K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn

from genlab.families.common import (
    SamplingUnavailableError,
    check_finite,
    count_parameters,
    rng_state,
    set_rng_state,
)
from genlab.families.likelihoods import DecoderLikelihood
from genlab.metrics.likelihood import nats_to_bits_per_dim
from genlab.nets.vq import VectorQuantizer


class VQVAEModule(L.LightningModule):
    """Args:
    encoder: ``encoder(x) -> z_e`` (B, D, h, w), e.g. ``VQEncoder``.
    decoder: ``decoder(z_q) -> (B, P*C, H, W)`` likelihood parameters, e.g. ``VQDecoder``; or a
        partial called with ``out_channels`` (the configs do this).
    quantizer: ``VectorQuantizer`` with ``code_dim`` = D.
    image_shape: (C, H, W). likelihood: bernoulli | gaussian | logistic.
    commitment: weight of the commitment loss (beta in the paper).
    optimizer / lr_scheduler: partials; the scheduler is stepped every step.
    """

    can_sample = False
    num_classes = 0

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
    ):
        super().__init__()
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.image_shape = tuple(int(s) for s in image_shape)
        self.likelihood = DecoderLikelihood(likelihood, self.image_shape[0])
        if not isinstance(decoder, nn.Module):  # a partial: it learns its output width here
            self.decoder = decoder(out_channels=self.likelihood.out_channels)
        self.commitment = float(commitment)
        self.optimizer_fn = optimizer or (lambda params: torch.optim.Adam(params, lr=2e-4))
        self.lr_scheduler_fn = lr_scheduler
        self.sample_batch_size = sample_batch_size
        self._pending_rng: dict | None = None
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
        check_finite("train/loss", loss, self.global_step)
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

    def configure_optimizers(self):
        opt = self.optimizer_fn(self.parameters())
        if self.lr_scheduler_fn is None:
            return opt
        sched = self.lr_scheduler_fn(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_rng = checkpoint.get("rng_state")

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

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
    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Upper bound on -log2 P(x) / D for 8-bit images x (B, C, H, W) in [-1, 1] (module
        docstring); (B,)."""
        self.likelihood.check(x)
        was_training = self.training
        self.eval()
        recon, q = self.terms(x)
        self.train(was_training)
        n_codes = q.codes[0].numel()
        nll = recon + n_codes * math.log(self.quantizer.num_codes)
        return nats_to_bits_per_dim(nll, x[0].numel())

    # ------------------------------------------------------------------ the family contract
    @property
    def parameter_count(self) -> int:
        return count_parameters(self)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean from the quantised codes of x, (B, C, H, W) in [-1, 1]."""
        was_training = self.training
        self.eval()
        out = self.likelihood.mean(self.decoder(self.quantizer(self.encoder(x)).z_q))
        self.train(was_training)
        return out

    def sample(self, n: int, y=None, generator=None, **kwargs) -> torch.Tensor:
        raise SamplingUnavailableError(
            "a VQ-VAE samples through a prior over its codes, and this one has none: use its "
            "reconstructions (samples/recon_*.png) or train an autoregressive prior on its codes"
        )
