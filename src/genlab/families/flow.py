"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) as a LightningModule:
the linear path between data and noise, velocity prediction, uniform or logit-normal time
sampling (Esser et al. 2024, Sec. 3.1), optional minibatch optimal-transport coupling (Tong et
al. 2024) and reflow on noise-sample pairs (Liu et al. 2023, Sec. 2.3).

    x_t = (1 - t) x0 + t eps,   t in [0, 1],   v = dx_t/dt = eps - x0,
    loss = |v_theta(x_t, t) - (eps - x0)|^2          (conditional flow matching, Eq. 23 of Lipman)

In the shared sigma frame (``genlab.diffusion.frame.FlowFrame``): sigma = t / (1 - t), the
solver's x is x_t / (1 - t), and the denoiser is x0_hat = x_t - t v_theta, so every solver
of ``genlab.diffusion.samplers`` samples a flow model; Euler on the ``time`` spacing is the
usual flow Euler sampler, and ``midpoint`` and ``heun`` are second order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from genlab.diffusion.frame import FlowFrame
from genlab.families.contract import Denoiser
from genlab.families.denoising import DenoisingModule, bcast, per_sample_mse
from genlab.nets import rng

TIME_SAMPLING = ("uniform", "logit_normal")
COUPLINGS = ("independent", "ot")


def ot_pairing(x0: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Indices that reorder ``noise`` to the exact optimal-transport plan between the minibatch
    of data and of noise under the squared Euclidean cost (uniform weights: an assignment
    problem, solved by SciPy's ``linear_sum_assignment``); with labels, within each class so
    that conditioning stays valid (Tong et al. 2024, Sec. 3.2 and 5)."""
    from scipy.optimize import linear_sum_assignment

    order = torch.arange(x0.shape[0])
    groups = [order] if y is None else [order[y.cpu() == c] for c in y.unique().cpu()]
    out = order.clone()
    for idx in groups:
        cost = torch.cdist(x0[idx].flatten(1).float(), noise[idx].flatten(1).float()) ** 2
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        out[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return out


class FlowModule(DenoisingModule):
    """A velocity field ``net(x_t, time_scale * t, y)`` trained by conditional flow matching.

    Args (beyond ``DenoisingModule``'s):
        time_sampling: ``uniform`` t ~ U(0, 1) or ``logit_normal`` (t = sigmoid(m + s n)).
        logit_mean, logit_std: m and s of the logit-normal (0 and 1: Esser et al.'s choice).
        coupling: ``independent`` (noise drawn independently of the data) or ``ot``
            (minibatch optimal transport). Batches of three tensors (x, y, noise), as reflow's
            noise-sample pairs, use the noise they bring.
        time_scale: the network's time input is time_scale * t (1000 puts t on the timestep
            scale of the UNet's sinusoidal embedding, as for DDPM).
        t_min, t_max: the time range sampling integrates over (t = 1 is sigma = infinity).
    """

    def __init__(
        self,
        net: nn.Module,
        image_shape: Sequence[int] = (1, 28, 28),
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        ema_decay: float = 0.999,
        num_classes: int = 0,
        cond_drop_prob: float = 0.1,
        sampler: Callable | None = None,
        sample_batch_size: int = 256,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        coupling: str = "independent",
        time_scale: float = 1000.0,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        ode_steps: int = 64,
        ode_divergence: str = "hutchinson",
        ode_probes: int = 1,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__(net, image_shape, optimizer, lr_scheduler, ema_decay, num_classes,
                         cond_drop_prob, sampler, sample_batch_size, ode_steps, ode_divergence,
                         ode_probes, compile=compile, channels_last=channels_last)  # fmt: skip
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.time_sampling, self.coupling = time_sampling, coupling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.time_scale = float(time_scale)
        self.frame = FlowFrame(t_min, t_max)

    # ------------------------------------------------------------------ training
    def sample_time(self, b: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
        """(B,) training times in (0, 1)."""
        if self.time_sampling == "uniform":
            return rng.rand((b,), generator, device=device)
        draw = rng.randn((b,), generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * draw)

    def velocity(self, x_t, t, y) -> torch.Tensor:
        return self.net(x_t, (self.time_scale * t).to(x_t.dtype), y)

    def loss(self, x0, y, generator=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """|v_theta(x_t, t) - (eps - x0)|^2 per sample on the linear path."""
        t = self.sample_time(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = rng.randn(x0.shape, generator, device=x0.device)
            if self.coupling == "ot":
                noise = noise[ot_pairing(x0, noise, y).to(noise.device)]
        x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * noise
        return per_sample_mse(self.velocity(x_t, t, y), noise - x0)

    def training_step(self, batch, batch_idx):
        if len(batch) == 3:  # (x, y, noise): coupled pairs (reflow)
            x, y, noise = batch
            loss = self.loss(x, self._labels(y, drop=True), noise=noise).mean()
            self.check_finite("train/loss", loss)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(tuple(batch[:2]), batch_idx)

    # ------------------------------------------------------------------ the family contract
    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser:
        """``denoise(x, sigma) -> x0_hat``: t = sigma / (1 + sigma), x_t = x / (1 + sigma),
        x0_hat = x_t - t v_theta(x_t, t)."""

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            labels = None if y is None else y[: x.shape[0]]
            t = self.frame.time(sigma)
            x_t = self.frame.to_model(x, sigma)
            with self.ema_weights(use_ema):
                v = self.velocity(x_t, t, labels)
            return x_t - bcast(t, x_t) * v

        return denoise

    def describe(self, use_ema: bool = True) -> dict:
        info = super().describe(use_ema)
        info["training"] = {
            "path": "linear",
            "target": "velocity eps - x0",
            "time_sampling": self.time_sampling,
            "coupling": self.coupling,
        }
        return info


__all__ = ["FlowModule", "ot_pairing"]
