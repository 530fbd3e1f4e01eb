"""Vector quantisation for VQ-VAE (van den Oord et al. 2017), plain torch.

``VectorQuantizer`` maps each vector of z_e (B, D, h, w) to its nearest code of a K x D
codebook and passes gradients straight through (Eq. 3: z_q = z_e + sg(e_k - z_e)).

- Codebook updates (``decay`` > 0) are exponential moving averages of the assigned encodings
  (Appendix A.1, Eq. 6-8): N_k <- g N_k + (1-g) n_k, m_k <- g m_k + (1-g) sum z_e, e_k = m_k / N_k
  with Laplace smoothing of N_k. With ``decay`` = 0 the codebook is a parameter trained by the
  codebook loss ||sg(z_e) - e||^2 (Eq. 3, second term).
- The commitment loss ||z_e - sg(e)||^2 (Eq. 3, third term) is returned for the family to weigh.
- Dead codes (EMA count below ``restart_threshold``) are restarted on random encoder outputs
  of the current batch (Dhariwal et al. 2020, Sec. 2.1; Williams et al. 2020), so the whole
  codebook stays in use.
- The codebook is initialised from the first training batch's encodings (``init_from_data``).

Under DDP the counts and sums are all-reduced, and restart candidates come from rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    z_q: torch.Tensor  # (B, D, h, w) quantised, with straight-through gradients to z_e
    codes: torch.Tensor  # (B, h, w) long code indices
    commitment: torch.Tensor  # mean ||z_e - sg(e)||^2 per element
    codebook: torch.Tensor  # mean ||sg(z_e) - e||^2 per element (0 with EMA updates)
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram)
    usage: torch.Tensor  # fraction of the codebook used in the batch
    restarted: int  # codes restarted by this call


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int = 512,
        code_dim: int = 32,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 1.0,
        init_from_data: bool = True,
    ):
        super().__init__()
        self.num_codes, self.code_dim = int(num_codes), int(code_dim)
        self.decay, self.eps = float(decay), float(eps)
        self.restart_threshold = float(restart_threshold)
        self.init_from_data = init_from_data
        init = torch.randn(num_codes, code_dim)
        if self.decay > 0:
            self.register_buffer("embedding", init)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.embedding = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not init_from_data))

    # ------------------------------------------------------------------ lookup
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest codes to vectors ``flat`` (N, D) in squared L2."""
        e = self.embedding
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    @torch.no_grad()
    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices (B, h, w) of z_e (B, D, h, w); never updates the codebook."""
        b, d, h, w = z_e.shape
        return self.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d).float()).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> quantised vectors (B, D, h, w)."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ training updates
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx].clone()
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def _init(self, flat: torch.Tensor) -> None:
        rows = self._random_rows(flat, self.num_codes)
        self.embedding.data.copy_(rows)
        if self.decay > 0:
            self.embed_sum.copy_(rows)
            self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, one_hot: torch.Tensor) -> None:
        counts, sums = one_hot.sum(0), one_hot.t() @ flat  # (K,), (K, D)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> int:
        if self.restart_threshold <= 0:
            return 0
        usage = self.cluster_size if self.decay > 0 else counts
        dead = usage < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        rows = self._random_rows(flat, n_dead)
        self.embedding.data[dead] = rows
        if self.decay > 0:  # a restarted code starts as if it had threshold assignments
            self.cluster_size[dead] = self.restart_threshold
            self.embed_sum[dead] = rows * self.restart_threshold
        return n_dead

    # ------------------------------------------------------------------ forward
    def forward(self, z_e: torch.Tensor) -> Quantized:
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.initialized):
            self._init(flat.detach().float())
        codes = self.nearest(flat.detach().float())
        one_hot = F.one_hot(codes, self.num_codes).to(flat.dtype)
        counts = one_hot.sum(0).detach()
        # quantise with the codebook the codes were chosen from, then update it
        e = F.embedding(codes, self.embedding).view(b, h, w, d).permute(0, 3, 1, 2)
        if self.decay > 0:
            e = e.clone()  # the EMA update below rewrites the codebook in place
        restarted = 0
        if self.training:
            if self.decay > 0:
                self._ema_update(flat.detach().float(), one_hot.float())
            restarted = self._restart_dead(flat.detach().float(), counts)
        commitment = F.mse_loss(z_e, e.detach())
        codebook = F.mse_loss(e, z_e.detach()) if self.decay == 0 else z_e.new_zeros(())
        z_q = z_e + (e - z_e).detach()  # straight-through estimator
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        usage = (counts > 0).float().mean()
        return Quantized(
            z_q, codes.view(b, h, w), commitment, codebook, perplexity, usage, restarted
        )
