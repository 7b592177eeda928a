"""Load the peer implementation, sleap-nn's UNet, without importing the sleap_nn package.

sleap-nn's `__init__` pulls in its whole training stack; its architecture modules only need
torch, numpy, omegaconf and loguru. Install it with `pip install --no-deps sleap-nn omegaconf
antlr4-python3-runtime pyyaml loguru`.
"""

import functools
import importlib
import importlib.util
import sys
import types


@functools.lru_cache(maxsize=None)
def sleap_nn_unet_class():
    """sleap-nn's `UNet` class, or None when sleap-nn is not installed."""
    spec = importlib.util.find_spec("sleap_nn")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("sleap_nn", root), ("sleap_nn.architectures", f"{root}/architectures")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return importlib.import_module("sleap_nn.architectures.unet").UNet


def sleap_nn_default_unet():
    """sleap-nn's UNet with SLEAP's default layout (34,512,128 parameters), or None."""
    cls = sleap_nn_unet_class()
    if cls is None:
        return None
    return cls(in_channels=1, output_stride=1, kernel_size=3, filters=64, filters_rate=2, down_blocks=4,
               up_blocks=4, stem_blocks=0, convs_per_block=2, middle_block=True, up_interpolate=False)
