"""Build a model from any config file users have: UNet parameters, a `UNetConfig`,
a SLEAP `training_config.json`, a sleap-nn `training_config.yaml`, or a flexunet
`config.json`."""

from __future__ import annotations

import os

from torch import nn

from flexunet.io.config_tree import read_json
from flexunet.io.keras_folder import model_from_training_config
from flexunet.io.serialization import model_from_config
from flexunet.io.sleap_nn import model_from_sleap_nn_config, read_yaml
from flexunet.nn.config import UNetConfig
from flexunet.nn.unet import UNet

_UNET_CONFIG_KEYS = {"stem_stride", "max_stride", "output_stride"}


def model_from_config_file(path: str | os.PathLike, in_channels: int | None = None) -> nn.Module:
    """Build the (untrained) model a config file describes.

    A `.yaml`/`.yml` file is a sleap-nn training config. A JSON file is recognised
    by its keys: a SLEAP training config has `model`, a flexunet `config.json` has
    `format_version`, a `UNetConfig` has stride keys (`max_stride`, ...), anything
    else is read as `UNet` parameters.

    Args:
        path: The JSON or YAML file.
        in_channels: Input channels, when the file does not say (default 1; a
            sleap-nn config says, and this overrides it).
    """
    if os.fspath(path).lower().endswith((".yaml", ".yml")):
        return model_from_sleap_nn_config(read_yaml(path), source=os.fspath(path), in_channels=in_channels)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(data).__name__}.")
    try:
        if "format_version" in data:
            return model_from_config(data)
        if "model" in data:
            return model_from_training_config(data, in_channels=in_channels, source=os.fspath(path))
        if _UNET_CONFIG_KEYS & set(data):
            return UNet.from_config(UNetConfig.from_dict(data), in_channels=in_channels or 1)
        params = dict(data)
        if in_channels is not None:
            params["in_channels"] = in_channels
        return UNet.from_dict(params)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{os.fspath(path)}: {err}") from None
