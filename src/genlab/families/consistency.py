"""Consistency models (Song et al. 2023; Song & Dhariwal 2023, iCT; Geng et al. 2024, ECT): a
network trained so that one evaluation maps noise to data, sampled in 1-4 steps.

The consistency function is exposed as the family's denoiser in the shared sigma frame
(``genlab.diffusion.frame.EDMFrame``, sigma in [sigma_min, sigma_max] = [0.002, 80]), so the
model is a ``Denoising`` family: guidance wraps it and any solver runs on it, and
``genlab.diffusion.consistency.consistency_sampler`` is its own sampler (Algorithm 1):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)        (Song et al. 2023,
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)    App. C)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2),   c_noise = ln(sigma) / 4   (EDM's, Table 1)

f(x, sigma_min) = x exactly. c_in and c_noise are EDM's, so an EDM run's network initialises
F (``init_run``: ECT's start from a pretrained diffusion model; Song et al. also initialise
consistency distillation from the teacher).

Training, on the Karras grid sigma_1 = sigma_min < ... < sigma_N = sigma_max, a pair
(sigma_n, sigma_{n+1}) per image and one z ~ N(0, I):

    loss = lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_n, sigma_n)),
    x_{n+1} = x0 + sigma_{n+1} z,

- ``mode=training`` (consistency training; iCT): x_n = x0 + sigma_n z (the same z), N from
  iCT's doubling curriculum N(k) over ``curriculum_steps`` iterations (0: N = ``num_scales``),
  n from iCT's discretised log-normal (``sigma_sampling=lognormal``), pseudo-Huber distance and
  lambda = 1 / (sigma_{n+1} - sigma_n) by default;
- ``mode=distillation`` (consistency distillation; Song et al. 2023, Algorithm 2): x_n is one
  Heun (or Euler) step of the teacher's probability-flow ODE from x_{n+1} (``teacher_run``:
  any finished diffusion / EDM / flow run, its EMA denoiser in the same frame, frozen), N =
  ``num_scales`` fixed (18), n uniform.

The target theta- is the stop-gradient of the online network, theta- = sg(theta) (iCT, Sec.
3.2, and ECT; Song et al. 2023 use an EMA of theta with mu = 0.95 for CD, which iCT shows
biases CT): the target pass runs the same network under no_grad, replaying the online pass's
random state so that both see the same dropout mask and differ only in (x, sigma). The EMA
copy (``ema_decay``) is for sampling and evaluation only, as in iCT.

No likelihood: f is the ODE's end point, not E[x0 | x], so the probability-flow ODE of the
denoising families does not apply (``bits_per_dim`` is absent from the contract).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from genlab.diffusion import consistency as cm
from genlab.diffusion.frame import EDMFrame
from genlab.families.contract import Denoiser, Denoising
from genlab.families.denoising import DenoisingModule, bcast, per_sample_mse
from genlab.nets import rng
from genlab.utils import UsageError

MODES = ("training", "distillation")
DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("inverse_gap", "uniform")
SIGMA_SAMPLING = ("lognormal", "uniform")


def _choice(name: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class ConsistencyModule(DenoisingModule):
    """A consistency model on any ``net(x, c_noise, y)`` (the genlab UNet).

    Args (beyond ``DenoisingModule``'s):
        mode: ``training`` (CT, no teacher) or ``distillation`` (CD from ``teacher_run``).
        teacher_run / teacher_ckpt: the finished denoising run distilled (distillation).
        teacher_solver: ``heun`` or ``euler``, the teacher's ODE step.
        init_run: an EDM (or consistency) run whose EMA network initialises F (null: random).
        num_scales: N when no curriculum runs (CD: Song et al.'s 18).
        curriculum_steps: K of iCT's curriculum N(k) (0: N = num_scales throughout).
        s0, s1: the curriculum's first and largest N - 1.
        distance: ``pseudo_huber`` (c = ``huber_c``, default 0.00054 sqrt(d)) or ``l2`` (the
            mean squared error per dimension).
        weighting: ``inverse_gap`` lambda = 1 / (sigma_{n+1} - sigma_n) or ``uniform`` (1).
        sigma_sampling: ``lognormal`` (iCT, p_mean, p_std) or ``uniform`` n.
        sigma_data, sigma_min, sigma_max, rho: the parameterisation and the grid.
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
        mode: str = "training",
        teacher_run: str | None = None,
        teacher_ckpt: str = "last",
        teacher_solver: str = "heun",
        init_run: str | None = None,
        num_scales: int = 18,
        curriculum_steps: int = 0,
        s0: int = 10,
        s1: int = 1280,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        weighting: str = "inverse_gap",
        sigma_sampling: str = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        sampler = sampler or partial(cm.consistency_sampler, steps=1)
        super().__init__(net, image_shape, optimizer, lr_scheduler, ema_decay, num_classes,
                         cond_drop_prob, sampler, sample_batch_size, compile=compile,
                         channels_last=channels_last)  # fmt: skip
        self.mode = _choice("mode", mode, MODES)
        if self.mode == "distillation" and not teacher_run:
            raise ValueError("mode=distillation needs teacher_run (a finished denoising run)")
        self.teacher_run, self.teacher_ckpt = teacher_run, teacher_ckpt
        self.teacher_solver = _choice("teacher_solver", teacher_solver, cm.TEACHER_SOLVERS)
        self.init_run = init_run
        self.num_scales, self.curriculum_steps = int(num_scales), int(curriculum_steps)
        self.s0, self.s1 = int(s0), int(s1)
        self.distance = _choice("distance", distance, DISTANCES)
        self.huber_c = huber_c
        self.weighting = _choice("weighting", weighting, WEIGHTINGS)
        self.sigma_sampling = _choice("sigma_sampling", sigma_sampling, SIGMA_SAMPLING)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_data, self.rho = float(sigma_data), float(rho)
        self.frame = EDMFrame(sigma_min, sigma_max)
        self._teacher: list = []  # a list keeps the teacher out of the module tree and state
        self._initialised = False

    # ------------------------------------------------------------------ the parameterisation
    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise), each (B,) float64, for noise levels sigma (B,)."""
        sigma = sigma.double()
        c_skip, c_out = cm.boundary_coefficients(sigma, self.frame.sigma_min, self.sigma_data)
        c_in = (sigma**2 + self.sigma_data**2).rsqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def consistency(self, x: torch.Tensor, sigma: torch.Tensor, y=None) -> torch.Tensor:
        """f_theta(x, sigma) (B, C, H, W) with the weights the network holds now."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        out = self.net(bcast(c_in, x) * x, c_noise.to(x.dtype), y)
        return bcast(c_skip, x) * x + bcast(c_out, x) * out

    def denoiser(self, y: torch.Tensor | None = None, use_ema: bool = True) -> Denoiser:
        """``denoise(x, sigma) -> f(x, sigma)``: the consistency function in the sigma frame."""

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            labels = None if y is None else y[: x.shape[0]]
            with self.ema_weights(use_ema):
                return self.consistency(x, sigma, labels)

        return denoise

    # ------------------------------------------------------------------ the discretisation
    def num_levels(self, step: int | None = None) -> int:
        """N at training iteration ``step`` (default: the global step)."""
        if self.mode == "training" and self.curriculum_steps > 0:
            k = self.global_step if step is None else step
            return cm.curriculum(k, self.curriculum_steps, self.s0, self.s1)
        return self.num_scales

    def sample_pairs(self, b: int, generator, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_n, sigma_{n+1}), each (B,) float64: a pair of neighbouring levels per image."""
        grid = cm.discretisation(self.num_levels(), self.frame.sigma_min, self.frame.sigma_max,
                                 self.rho)  # fmt: skip
        if self.sigma_sampling == "uniform":
            n = rng.randint(0, len(grid) - 1, (b,), generator)
        else:
            cdf = cm.lognormal_pair_probs(grid, self.p_mean, self.p_std).cumsum(0)
            u = rng.rand((b,), generator, dtype=torch.float64)
            n = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=len(grid) - 2)
        n = n.cpu()
        return grid[n].to(device), grid[n + 1].to(device)

    # ------------------------------------------------------------------ training
    def teacher(self) -> DenoisingModule:
        """The frozen teacher of ``teacher_run`` on this module's device, loaded once."""
        if not self._teacher:
            from genlab.runs import load_model

            model = load_model(self.teacher_run, self.teacher_ckpt, "cpu").model
            where = f"model.teacher_run: {self.teacher_run}"
            if not isinstance(model, Denoising) or isinstance(model, ConsistencyModule):
                raise UsageError(f"{where} is a {type(model).__name__}; distillation needs a "
                                 "denoising run (model=diffusion, edm or flow)")  # fmt: skip
            if (
                tuple(model.space_shape) != self.space_shape
                or model.num_classes != self.num_classes
            ):
                raise UsageError(f"{where} models {model.space_shape} with {model.num_classes} "
                                 f"classes, this model {self.space_shape} with "
                                 f"{self.num_classes}")  # fmt: skip
            self._teacher.append(model.eval().requires_grad_(False))
        teacher = self._teacher[0]
        if teacher.device != self.device:
            teacher.to(self.device)
        return teacher

    def setup(self, stage: str) -> None:
        """Before fitting (and before a resumed checkpoint is restored over it): F and its EMA
        copy from ``init_run``'s EMA network (ECT)."""
        if stage != "fit" or not self.init_run or self._initialised:
            return
        from genlab.families.edm import EDMModule
        from genlab.runs import load_model

        source = load_model(self.init_run, "last", "cpu").model
        if not isinstance(source, EDMModule | ConsistencyModule):
            raise UsageError(f"model.init_run: {self.init_run} is a {type(source).__name__}; "
                             "F initialises from an EDM or consistency run (same net)")  # fmt: skip
        net = source.ema.module if source.ema is not None else source.net
        self.net.load_state_dict(net.state_dict())
        if self.ema is not None:
            self.ema.module.load_state_dict(net.state_dict())
        self._initialised = True

    def distance_fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B,) d(a, b): pseudo-Huber (iCT, Sec. 3.3) or the mean squared error."""
        if self.distance == "l2":
            return per_sample_mse(a, b)
        return cm.pseudo_huber(a, b, self.huber_c)

    def loss(self, x0, y, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), sg f_theta(x_n, sigma_n))."""
        s, s_next = self.sample_pairs(x0.shape[0], generator, x0.device)
        z = rng.randn(x0.shape, generator, device=x0.device)
        x_next = x0 + bcast(s_next, x0) * z
        if self.mode == "training":
            x_n = x0 + bcast(s, x0) * z  # the same z: an unbiased estimate of the ODE step
        else:
            denoise = self.teacher().denoiser(y, use_ema=True)
            x_n = cm.ode_step(denoise, x_next, s_next, s, self.teacher_solver)
        state = _rng_state(x0.device)
        online = self.consistency(x_next, s_next, y)
        _set_rng_state(x0.device, state)  # the target sees the online pass's dropout mask
        with torch.no_grad():
            target = self.consistency(x_n, s, y)
        weight = 1 / (s_next - s) if self.weighting == "inverse_gap" else torch.ones_like(s)
        return weight.to(online.dtype) * self.distance_fn(online, target)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/num_levels", float(self.num_levels()))
        return loss

    # ------------------------------------------------------------------ the family contract
    def describe(self, use_ema: bool = True) -> dict:
        info = super().describe(use_ema)
        if self.mode == "training" and self.curriculum_steps > 0:
            levels = f"iCT curriculum N(k), s0={self.s0}, s1={self.s1}, K={self.curriculum_steps}"
        else:
            levels = f"N={self.num_scales}"
        info["training"] = {
            "mode": self.mode,
            "parameterisation": "c_skip, c_out with sigma - sigma_min (Song et al. 2023)",
            "sigma_data": self.sigma_data,
            "levels": levels,
            "sigma_sampling": self.sigma_sampling,
            "distance": self.distance,
            "weighting": self.weighting,
            "target": "sg(theta), same dropout mask",
            "teacher_run": self.teacher_run,
            "teacher_solver": self.teacher_solver if self.mode == "distillation" else None,
            "init_run": self.init_run,
        }
        return info

    # no likelihood: f is the ODE's end point, not a denoiser (genlab.families.contract)
    bits_per_dim = None
    bpd_protocol = None
    ode_bits_per_dim = None
    ode_protocol = None


__all__ = ["ConsistencyModule"]
