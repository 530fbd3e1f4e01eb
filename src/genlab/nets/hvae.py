"""A very deep VAE in a CPU size: the networks of VDVAE (Child 2021, Sec. 3-4, Fig. 3).

- ``Bottleneck``: VDVAE's residual block, GELU -> 1x1 -> GELU -> 3x3 -> GELU -> 3x3 -> GELU ->
  1x1 (width -> width/4 -> width), added to its input when ``residual``.
- ``BottomUpEncoder``: x (B, C, H, W) -> activations at each resolution H, H/2, ..., one
  stack of ``blocks_per_res`` bottleneck blocks per resolution, average pooling between them.
- ``TopDownBlock``: one latent group z_i (``latent_channels`` x h x w). From the top-down state
  it computes the prior p(z_i | z_<i) = N(m_p, s_p^2) and, with the bottom-up activation at its
  resolution, the posterior q(z_i | x, z_<i) = N(m_q, s_q^2) (diagonal Gaussians, log-std
  parameterisation); z_i is projected back into the state by a 1x1 convolution and a residual
  block follows (Child 2021, Fig. 3).
- ``TopDownDecoder``: a learned constant at the lowest resolution, the top-down blocks from
  the lowest resolution to the highest (nearest upsampling between), then a 1x1 convolution to
  the decoder likelihood's parameters (B, out_channels, H, W).
- ``HierarchicalVAE``: both, so one module holds the weights (EMA, compile).

Initialisation as VDVAE (Sec. 4): the last convolution of every residual branch and the
z projection are scaled by 1/sqrt(number of blocks); the prior head's last convolution is
zero, so p(z_i | z_<i) = N(0, I) at init. Two choices of ours: the posterior head's last
convolution is zero too (q = p at init, every KL term exactly 0), and so is the output layer
(an untrained model predicts the same likelihood parameters for every z); both learn from the
first step on. Resolutions halve ``num_resolutions - 1`` times: 28 -> 14 -> 7, 32 -> 16 -> 8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets import rng

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_log_std(
    mq: torch.Tensor, log_sq: torch.Tensor, mp: torch.Tensor, log_sp: torch.Tensor
) -> torch.Tensor:
    """KL(N(mq, sq^2) || N(mp, sp^2)) per element in nats, from log-stds:
    log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2 (Child 2021, Eq. 2's KL terms)."""
    return (
        log_sp
        - log_sq
        + 0.5 * (torch.exp(2 * log_sq) + (mq - mp).pow(2)) * torch.exp(-2 * log_sp)
        - 0.5
    )


def gaussian_log_prob_log_std(
    z: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor
) -> torch.Tensor:
    """log N(z; m, s^2) summed over all but the batch dimension: (B,)."""
    lp = -0.5 * (LOG_2PI + 2 * log_s + (z - m).pow(2) * torch.exp(-2 * log_s))
    return lp.flatten(1).sum(1)


class Bottleneck(nn.Module):
    """VDVAE's block (Child 2021, Fig. 3): (B, in, h, w) -> (B, out, h, w); residual when
    ``residual`` (then in == out). ``last_scale`` scales the last convolution's initial weights
    (0: zero-initialised output)."""

    def __init__(
        self, in_ch: int, mid: int, out_ch: int, residual: bool = True, last_scale: float = 1.0
    ):
        super().__init__()
        if residual and in_ch != out_ch:
            raise ValueError(f"a residual block keeps its width, got {in_ch} -> {out_ch}")
        self.residual = residual
        self.c1 = nn.Conv2d(in_ch, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c3 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c4 = nn.Conv2d(mid, out_ch, 1)
        with torch.no_grad():
            self.c4.weight.mul_(last_scale)
            if last_scale == 0:
                self.c4.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        return x + h if self.residual else h


def resolutions(image_size: int, num_resolutions: int) -> list[int]:
    """[H, H/2, ...]: the ``num_resolutions`` map sizes, highest first."""
    if num_resolutions < 1 or image_size % 2 ** (num_resolutions - 1):
        raise ValueError(
            f"image_size {image_size} does not halve {num_resolutions - 1} times exactly"
        )
    return [image_size // 2**i for i in range(num_resolutions)]


class BottomUpEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> activations, a list (B, width, H/2^i, W/2^i) for
    i = 0 .. num_resolutions - 1 (highest resolution first)."""

    def __init__(
        self, channels: int, image_size: int, width: int, blocks_per_res: int, num_res: int
    ):
        super().__init__()
        self.sizes = resolutions(image_size, num_res)
        n = blocks_per_res * num_res
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(
                *[
                    Bottleneck(width, max(1, width // 4), width, last_scale=1 / math.sqrt(n))
                    for _ in range(blocks_per_res)
                ]
            )
            for _ in self.sizes
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, acts = self.stem(x), []
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = stage(h)
            acts.append(h)
        return acts


@dataclass
class Group:
    """One latent group's draw: z (B, zc, h, w), and per image (B,) the analytic KL and the
    log densities log q(z | x, z_<i), log p(z | z_<i) of the drawn z (None when drawn from the
    prior); the Gaussians' parameters (B, zc, h, w) for tests and diagnostics."""

    z: torch.Tensor
    p_mean: torch.Tensor
    p_std: torch.Tensor
    q_mean: torch.Tensor | None = None
    q_std: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    log_p: torch.Tensor | None = None


class TopDownBlock(nn.Module):
    """One latent group of the top-down path (Child 2021, Fig. 3; VDVAE's DecBlock).

    ``forward(x, act)``: x (B, width, h, w) the top-down state, act the bottom-up activation at
    this resolution (None: draw from the prior at ``temperature``, which scales s_p; 0 gives
    the prior mean). Returns the new state and the ``Group``."""

    def __init__(self, width: int, latent_channels: int, num_blocks: int):
        super().__init__()
        mid, zc, scale = max(1, width // 4), latent_channels, 1 / math.sqrt(num_blocks)
        self.zc, self.width = zc, width
        self.posterior = Bottleneck(2 * width, mid, 2 * zc, residual=False, last_scale=0.0)
        self.prior = Bottleneck(width, mid, 2 * zc + width, residual=False, last_scale=0.0)
        self.z_proj = nn.Conv2d(zc, width, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.res = Bottleneck(width, mid, width, last_scale=scale)

    def forward(
        self,
        x: torch.Tensor,
        act: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        mean: bool = False,
        generator: rng.Generator = None,
    ) -> tuple[torch.Tensor, Group]:
        pm, log_sp, xpp = self.prior(x).split([self.zc, self.zc, self.width], dim=1)
        shape = (x.shape[0], self.zc, *x.shape[2:])
        if act is None:  # ancestral sampling from the prior at a temperature
            z = pm
            if temperature and not mean:
                eps = rng.randn(shape, generator, dtype=x.dtype, device=x.device)
                z = pm + temperature * torch.exp(log_sp) * eps
            group = Group(z, pm, log_sp.exp())
        else:
            qm, log_sq = self.posterior(torch.cat([x, act], dim=1)).chunk(2, dim=1)
            z = qm
            if not mean:
                eps = rng.randn(shape, generator, dtype=x.dtype, device=x.device)
                z = qm + torch.exp(log_sq) * eps  # the reparameterisation trick
            kl = gaussian_kl_log_std(qm, log_sq, pm, log_sp).flatten(1).sum(1)
            log_q = gaussian_log_prob_log_std(z, qm, log_sq)
            log_p = gaussian_log_prob_log_std(z, pm, log_sp)
            group = Group(z, pm, log_sp.exp(), qm, log_sq.exp(), kl, log_q, log_p)
        x = self.res(x + xpp + self.z_proj(z))
        return x, group


class TopDownDecoder(nn.Module):
    """Top-down path: ``forward(acts, n)`` with ``acts`` the encoder's list (posterior) or None
    (prior, n images) -> (likelihood parameters (B, out_channels, H, W), [Group] from the lowest
    resolution's first group to the highest's last). ``temperature``: a float or one per
    group."""

    def __init__(
        self,
        out_channels: int,
        image_size: int,
        width: int,
        latent_channels: int,
        blocks_per_res: int,
        num_res: int,
    ):
        super().__init__()
        self.sizes = resolutions(image_size, num_res)[::-1]  # lowest first
        n = blocks_per_res * num_res
        self.const = nn.Parameter(torch.zeros(1, width, self.sizes[0], self.sizes[0]))
        self.stages = nn.ModuleList(
            nn.ModuleList(TopDownBlock(width, latent_channels, n) for _ in range(blocks_per_res))
            for _ in self.sizes
        )
        self.out = nn.Conv2d(width, out_channels, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    @property
    def num_groups(self) -> int:
        return sum(len(s) for s in self.stages)

    def forward(
        self,
        acts: Sequence[torch.Tensor] | None = None,
        n: int | None = None,
        *,
        temperature: float | Sequence[float] = 1.0,
        mean: bool = False,
        generator: rng.Generator = None,
    ) -> tuple[torch.Tensor, list[Group]]:
        b = acts[0].shape[0] if acts is not None else int(n)
        temps = (
            [float(temperature)] * self.num_groups
            if isinstance(temperature, (int, float))
            else [float(t) for t in temperature]
        )
        if len(temps) != self.num_groups:
            raise ValueError(f"{len(temps)} temperatures for {self.num_groups} latent groups")
        x, groups = self.const.expand(b, -1, -1, -1), []
        for r, stage in enumerate(self.stages):
            if r > 0:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            act = None if acts is None else acts[len(self.stages) - 1 - r]
            for block in stage:
                x, g = block(x, act, temperature=temps[len(groups)], mean=mean, generator=generator)
                groups.append(g)
        return self.out(F.gelu(x)), groups


class HierarchicalVAE(nn.Module):
    """The bottom-up encoder and the top-down decoder of one VDVAE (Child 2021, Fig. 2).

    Args: channels, image_size (H = W), out_channels (the likelihood's parameter planes),
    width, latent_channels per group, blocks_per_res (= latent groups per resolution),
    num_resolutions (H, H/2, ...)."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        out_channels: int,
        width: int = 32,
        latent_channels: int = 8,
        blocks_per_res: int = 2,
        num_resolutions: int = 2,
    ):
        super().__init__()
        self.encoder = BottomUpEncoder(channels, image_size, width, blocks_per_res, num_resolutions)
        self.decoder = TopDownDecoder(
            out_channels, image_size, width, latent_channels, blocks_per_res, num_resolutions
        )

    def forward(
        self, x: torch.Tensor, *, mean: bool = False, generator: rng.Generator = None
    ) -> tuple[torch.Tensor, list[Group]]:
        """x (B, C, H, W) -> (likelihood parameters, groups) with z drawn from the posterior
        (``mean``: the posterior means)."""
        return self.decoder(self.encoder(x), mean=mean, generator=generator)
