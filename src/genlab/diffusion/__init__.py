"""Diffusion math: schedules, the forward process, the bound, the shared sigma frame and its
samplers and solvers. No Lightning."""

from genlab.diffusion.frame import EDMFrame, FlowFrame, NoiseFrame, VPFrame
from genlab.diffusion.samplers import ddim, ddpm, dpmpp_2m, euler, heun, midpoint, unipc
from genlab.diffusion.schedules import CosineSchedule, LinearSchedule, NoiseSchedule

__all__ = [
    "NoiseSchedule", "LinearSchedule", "CosineSchedule", "NoiseFrame", "VPFrame", "EDMFrame",
    "FlowFrame", "ddpm", "ddim", "euler", "heun", "midpoint", "dpmpp_2m", "unipc",
]  # fmt: skip
