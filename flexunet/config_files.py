"""Build a model from any config file users have: UNet parameters, a `UNetConfig`,
a SLEAP `training_config.json`, or a flexunet `config.json`."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from flexunet.config import UNetConfig
from flexunet.unet import UNet

_UNET_CONFIG_KEYS = {"stem_stride", "max_stride", "output_stride"}


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file is `FileNotFoundError`, bad JSON a `ValueError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 JSON file: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def model_from_config_file(path: str | os.PathLike, in_channels: int | None = None) -> nn.Module:
    """Build the (untrained) model a config file describes.

    The kind of file is recognised by its keys: a SLEAP training config has
    `model`, a flexunet `config.json` has `format_version`, a `UNetConfig` has
    stride keys (`max_stride`, ...), anything else is read as `UNet` parameters.

    Args:
        path: The JSON file.
        in_channels: Input channels, when the file does not say (default 1).
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(data).__name__}.")
    try:
        if "format_version" in data:
            from flexunet.serialization import model_from_config

            return model_from_config(data)
        if "model" in data:
            from flexunet.sleap import model_from_training_config

            return model_from_training_config(data, in_channels=in_channels, source=os.fspath(path))
        if _UNET_CONFIG_KEYS & set(data):
            return UNet.from_config(UNetConfig.from_dict(data), in_channels=in_channels or 1)
        params = dict(data)
        if in_channels is not None:
            params["in_channels"] = in_channels
        return UNet.from_dict(params)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{os.fspath(path)}: {err}") from None
