"""One continuous noise frame for every denoising model (Karras et al. 2022, Sec. 2).

Every solver integrates in the variance-exploding sigma frame

    x = x0 + sigma * eps,     eps ~ N(0, I),   sigma in [0, sigma_max],

with a denoiser ``denoise(x, sigma) -> x0_hat`` (x (B, C, H, W), sigma (B,), x0_hat in the
data range). The probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et
al. 2022, Eq. 3 with s(t) = 1, sigma(t) = t), and the prior at sigma_max is N(0, sigma_max^2 I).

Each family keeps its own parameterisation and maps into the frame exactly; a frame knows
the input scaling (the network's own x) and the family's natural time:

- ``VPFrame`` (discrete DDPM schedules): x_t = sqrt(a) x0 + sqrt(1 - a) eps is the sigma
  frame scaled by sqrt(a), sigma = sqrt((1 - a) / a), i.e. a = 1 / (1 + sigma^2) and
  log-SNR = -2 log sigma. A sigma between two trained timesteps maps to a fractional
  timestep by interpolating log sigma; the trained sigmas map back to integers exactly, so
  existing checkpoints sample with every solver and DDIM (eta = 0) is the Euler step.
- ``EDMFrame``: the sigma frame itself (Karras et al. 2022, Table 1), sigma in
  [sigma_min, sigma_max] = [0.002, 80].
- ``FlowFrame`` (rectified flow / flow matching): x_t = (1 - t) x0 + t eps is the sigma
  frame scaled by (1 - t), sigma = t / (1 - t). t = 1 (pure noise) is sigma = infinity, so
  sampling starts at ``t_max`` (default 1 - 1e-3, sigma 999): the signal the prior leaves
  out, (1 - t_max) x0, is 1e-3 of the data range, an eighth of one 8-bit level.

Step spacings (``sigmas(steps, spacing)`` -> (steps + 1,) decreasing, last entry 0):
``karras`` (rho = 7, Karras et al. 2022, Eq. 5), ``time`` (uniform in the family's own
time; for a discrete schedule the respaced trained timesteps of DDIM, T-1 .. 0), ``trailing``
(uniform in the family's time from the start to where sigma = 0, that end left out: every
evaluation at a level a step above it; for a discrete schedule T-1, T-1-T/N, .., T/N-1 then
alpha-bar 1, Lin et al. 2024, Table 2), ``log_snr`` (uniform in log sigma) and ``auto``, the
frame's ``default_spacing``: ``trailing`` for the VP frame and ``karras`` for EDM's and the
flow frame. With ``karras``, ``log_snr`` and (but in the flow frame) ``time`` the last
evaluation is at sigma_min, where the denoiser changes almost nothing. Measured on MNIST
(docs/results.md, "Fast solvers"): a 20-minute DDPM's DPM-Solver++ at 5 / 10 NFE gave
fd_digits 16.5 / 8.84 with ``time``, 9.82 / 6.68 with ``trailing`` and 161 / 17.0 with Karras
(its DDIM at 50: 5.67); a 15-minute flow model's Heun at 5 / 9 / 19 NFE 281 / 89 /
8.5 with Karras and 100 / 92 / 65 with uniform time (its Euler, which the flow preset runs
with ``spacing=time``, 8.6 / 6.7 / 5.9 at 5 / 10 / 20).
"""

from __future__ import annotations

import math

import torch

from genlab.diffusion.schedules import NoiseSchedule

SPACINGS = ("auto", "karras", "time", "trailing", "log_snr")

__all__ = ["SPACINGS", "EDMFrame", "FlowFrame", "NoiseFrame", "VPFrame", "karras_sigmas"]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0):
    """(steps,) sigmas from sigma_max to sigma_min, (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho)
    - sigma_max^(1/rho)))^rho (Karras et al. 2022, Eq. 5), float64."""
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class NoiseFrame:
    """A family's noise process seen in the sigma frame. Subclasses give ``sigma_min``,
    ``sigma_max``, ``time_sigmas(steps)`` (uniform in their own time) and ``input_scale``."""

    sigma_min: float
    sigma_max: float
    name = "sigma"
    default_spacing = "karras"  # what spacing="auto" means in this frame

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """The factor s(sigma) with x_model = s * x (the family's own noisy image)."""
        raise NotImplementedError

    def time_sigmas(self, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, steps: int, spacing: str = "karras", rho: float = 7.0) -> torch.Tensor:
        """(steps + 1,) float64 noise levels from sigma_max down (to sigma_min, or with
        ``trailing`` to a step above 0), then 0."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        spacing = self.resolve(spacing)
        if spacing == "karras":
            grid = karras_sigmas(self.sigma_min, self.sigma_max, steps, rho)
        elif spacing == "log_snr":
            grid = torch.linspace(
                math.log(self.sigma_max), math.log(self.sigma_min), steps, dtype=torch.float64
            ).exp()
        elif spacing == "time":
            grid = self.time_sigmas(steps)
        elif spacing == "trailing":
            grid = self.trailing_sigmas(steps)
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        return torch.cat([grid, grid.new_zeros(1)])

    def resolve(self, spacing: str) -> str:
        """``auto`` -> this frame's ``default_spacing``; any other spacing as it is."""
        return self.default_spacing if spacing == "auto" else spacing

    def to_model(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The family's own noisy image for x in the sigma frame."""
        return x * _bcast(self.input_scale(sigma), x)

    def prior(self, noise: torch.Tensor) -> torch.Tensor:
        """x at sigma_max from unit Gaussian noise."""
        return noise * self.sigma_max

    def describe(self) -> dict:
        return {"frame": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPFrame(NoiseFrame):
    """A discrete variance-preserving schedule (``NoiseSchedule``) in the sigma frame."""

    name = "vp"
    default_spacing = "trailing"

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        ab = schedule.alphas_cumprod
        self.table = ((1 - ab) / ab).sqrt()  # (T,) increasing sigma of each trained timestep
        self.log_table = self.table.log()
        self.sigma_min = float(self.table[0])
        self.sigma_max = float(self.table[-1])

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return (1 + sigma.double() ** 2).rsqrt()

    def alpha_bar(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma.double() ** 2)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps (float64) for sigma (any shape): log sigma interpolated
        linearly between trained timesteps, clamped to [0, T-1]; a trained sigma gives its
        integer index."""
        log_s = sigma.double().log().cpu()
        table = self.log_table
        hi = torch.searchsorted(table, log_s).clamp(1, len(table) - 1)
        lo = hi - 1
        w = ((log_s - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
        return (lo + w).to(sigma.device)

    def prior(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T = noise in the VP frame, as DDPM and DDIM start (x = noise / sqrt(a_T), i.e.
        N(0, (1 + sigma_max^2) I): unit-variance data's exact marginal at sigma_max)."""
        return noise * math.sqrt(1 + self.sigma_max**2)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of integer timesteps t."""
        return self.table.to(t.device)[t.long()]

    def _respaced(self, steps: int, spacing: str) -> int:
        """T, once steps is checked to be a respacing of the T trained timesteps."""
        T = self.schedule.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"spacing={spacing} needs steps in [1, {T}], got {steps}")
        return T

    def time_sigmas(self, steps: int) -> torch.Tensor:
        """The trained timesteps DDIM respaces to: T-1 to 0, evenly, rounded (Nichol &
        Dhariwal 2021, Sec. 4); steps == T is the full chain."""
        T = self._respaced(steps, "time")
        if steps == 1:
            return self.table[-1:].clone()
        grid = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
        return self.table[grid]

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """Trained timesteps T-1 - round(i T / N), i < N: uniform in time from T-1 to -1
        (alpha-bar 1) without that end, so the last evaluation is at T/N - 1, not 0 (Lin et
        al. 2024's "trailing"; diffusers' ``timestep_spacing="trailing"``). N == T is the
        full chain, as with ``time``."""
        T = self._respaced(steps, "trailing")
        i = torch.arange(steps, dtype=torch.float64)
        return self.table[(T - 1 - (i * T / steps).round()).long()]

    def describe(self) -> dict:
        return {**super().describe(), "schedule": repr(self.schedule)}


class EDMFrame(NoiseFrame):
    """The sigma frame itself (Karras et al. 2022): the network sees x / sqrt(sigma^2 +
    sigma_data^2) through its preconditioning, the solver sees x."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma, dtype=torch.float64)

    def time_sigmas(self, steps: int) -> torch.Tensor:
        """EDM's time is sigma (sigma(t) = t): uniform in sigma."""
        return torch.linspace(self.sigma_max, self.sigma_min, steps, dtype=torch.float64)

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """Uniform in sigma from sigma_max to 0, without 0: sigma_max (1 - i / N)."""
        return self.sigma_max * (1 - torch.arange(steps, dtype=torch.float64) / steps)


class FlowFrame(NoiseFrame):
    """The linear path x_t = (1 - t) x0 + t eps of flow matching / rectified flow in the
    sigma frame: sigma = t / (1 - t), input scale 1 - t = 1 / (1 + sigma)."""

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sigma_min = self.t_min / (1 - self.t_min)
        self.sigma_max = self.t_max / (1 - self.t_max)

    @staticmethod
    def time(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.double() / (1 + sigma.double())

    @staticmethod
    def sigma_of(t: torch.Tensor) -> torch.Tensor:
        return t.double() / (1 - t.double())

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma.double())

    def time_sigmas(self, steps: int) -> torch.Tensor:
        """Uniform in t from t_max towards 0: t_max (1 - i / steps), i < steps (the flow
        Euler sampler's grid; its last step, to t = 0, returns the denoiser's x0_hat)."""
        t = self.t_max * (1 - torch.arange(steps, dtype=torch.float64) / steps)
        return self.sigma_of(t)

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """The flow's uniform time already leaves t = 0 out: the same grid as ``time``."""
        return self.time_sigmas(steps)

    def describe(self) -> dict:
        return {**super().describe(), "t_min": self.t_min, "t_max": self.t_max}
