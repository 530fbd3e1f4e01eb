"""Diffusion math: schedules, the forward process, the bound and samplers. No Lightning."""

from genlab.diffusion.samplers import ddim, ddpm
from genlab.diffusion.schedules import CosineSchedule, LinearSchedule, NoiseSchedule

__all__ = ["NoiseSchedule", "LinearSchedule", "CosineSchedule", "ddpm", "ddim"]
