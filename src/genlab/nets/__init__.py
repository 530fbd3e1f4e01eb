"""Plain nn.Modules shared by the families. Never imports Lightning."""

from genlab.nets.ema import EMA
from genlab.nets.gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
)
from genlab.nets.unet import UNet

__all__ = [
    "UNet",
    "EMA",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "ResNetGenerator",
    "ResNetDiscriminator",
]
