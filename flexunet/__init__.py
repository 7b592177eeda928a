"""flexunet: SLEAP's generalized UNet in PyTorch, exact to the Keras original.

    >>> import flexunet
    >>> model = flexunet.UNet()                      # SLEAP's default, 34,512,128 parameters
    >>> flexunet.load_keras_weights(model, "model.h5")
    >>> sleap_model = flexunet.sleap.load_model("models/centroid")
"""

from flexunet import sleap
from flexunet.blocks import (
    DecoderBlock,
    EncoderBlock,
    PoolingBlock,
    SimpleConvBlock,
    SimpleUpsamplingBlock,
)
from flexunet.config import UNetConfig
from flexunet.encoder_decoder import EncoderDecoder, IntermediateFeature
from flexunet.export import export_onnx, export_program
from flexunet.inference import optimize_for_inference
from flexunet.keras import load_keras_weights
from flexunet.serialization import load, save
from flexunet.summary import receptive_field, summarize
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
    "export_onnx",
    "export_program",
    "load",
    "load_keras_weights",
    "optimize_for_inference",
    "receptive_field",
    "save",
    "sleap",
    "summarize",
]
