"""flexunet: SLEAP's generalized UNet in PyTorch, exact to the Keras original.

    >>> import flexunet
    >>> model = flexunet.UNet()                      # SLEAP's default, 34,512,128 parameters
    >>> flexunet.load_keras_weights(model, "model.h5")
    >>> model = flexunet.load_model("models/centroid")   # any SLEAP, sleap-nn or flexunet model
    >>> predictor = flexunet.sleap.load_predictor("models/bottomup")

The package is in three layers, each a folder importing only from those below
it: `flexunet.kernels` (fast CPU operators), `flexunet.nn` (the model, with
TensorFlow's numerics), `flexunet.io` (files); on top, `sleap`, `predict`,
`export`, `inference`, `summary` and the command line (`docs/architecture.md`).
"""

from flexunet import sleap
from flexunet.export import export_onnx, export_program
from flexunet.inference import optimize_for_inference
from flexunet.io.folders import load_any as load_model
from flexunet.kernels import clear_weight_cache, weight_cache_bytes
from flexunet.io.keras import load_keras_weights
from flexunet.io.serialization import load, save
from flexunet.nn.blocks import DecoderBlock, EncoderBlock, PoolingBlock, SimpleConvBlock, SimpleUpsamplingBlock
from flexunet.nn.config import UNetConfig
from flexunet.nn.encoder_decoder import EncoderDecoder, IntermediateFeature
from flexunet.nn.heads import HeadSpec
from flexunet.nn.sleap_model import SleapModel
from flexunet.nn.unet import UNet
from flexunet.summary import receptive_field, summarize

__version__ = "0.1.0"

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "EncoderDecoder",
    "HeadSpec",
    "IntermediateFeature",
    "PoolingBlock",
    "SimpleConvBlock",
    "SimpleUpsamplingBlock",
    "SleapModel",
    "UNet",
    "UNetConfig",
    "clear_weight_cache",
    "export_onnx",
    "export_program",
    "load",
    "load_keras_weights",
    "load_model",
    "optimize_for_inference",
    "receptive_field",
    "save",
    "weight_cache_bytes",
    "sleap",
    "summarize",
]
