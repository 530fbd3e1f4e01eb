"""Plain nn.Modules shared by the families. Never imports Lightning."""

from genlab.nets.ema import EMA
from genlab.nets.gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
)
from genlab.nets.pixelcnn import GatedPixelCNN, PixelCNN, PixelCNNPlusPlus
from genlab.nets.pixelrnn import PixelRNN
from genlab.nets.unet import UNet
from genlab.nets.vae import ConvDecoder, ConvEncoder, VQDecoder, VQEncoder
from genlab.nets.vq import VectorQuantizer

__all__ = [
    "UNet",
    "EMA",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "ResNetGenerator",
    "ResNetDiscriminator",
    "ConvEncoder",
    "ConvDecoder",
    "VQEncoder",
    "VQDecoder",
    "VectorQuantizer",
    "PixelCNN",
    "GatedPixelCNN",
    "PixelCNNPlusPlus",
    "PixelRNN",
]
