"""flexunet: SLEAP's generalized UNet in PyTorch, exact to the Keras original."""

from flexunet.blocks import (
    DecoderBlock,
    EncoderBlock,
    PoolingBlock,
    SimpleConvBlock,
    SimpleUpsamplingBlock,
)
from flexunet.config import UNetConfig
from flexunet.encoder_decoder import EncoderDecoder, IntermediateFeature
from flexunet.keras import load_keras_weights
from flexunet.unet import UNet

__version__ = "0.1.0"

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "EncoderDecoder",
    "IntermediateFeature",
    "PoolingBlock",
    "SimpleConvBlock",
    "SimpleUpsamplingBlock",
    "UNet",
    "UNetConfig",
    "load_keras_weights",
]
