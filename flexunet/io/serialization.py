"""Native save/load: a directory with `config.json` and `model.safetensors`."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from flexunet.io.config_tree import read_json
from flexunet.io.weights import load_checked
from flexunet.nn.heads import HeadSpec
from flexunet.nn.sleap_model import SleapModel
from flexunet.nn.unet import UNet
from flexunet.nn.validation import check_keys

# 2: the UNet's `alignment` and the SleapModel's `convert_channels` (sleap-nn models).
# 3: `pad_to_stride`.
FORMAT_VERSION = 3
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_KEYS = {"format_version", "architecture", "unet", "heads", "convert_channels", "pad_to_stride"}


def model_config(model: nn.Module) -> dict[str, Any]:
    """The `config.json` content that rebuilds `model` (a `UNet` or `SleapModel`)."""
    if isinstance(model, SleapModel):
        return {"format_version": FORMAT_VERSION, "architecture": "SleapModel",
                "unet": model.backbone.to_dict(), "heads": [h.to_dict() for h in model.head_specs],
                "convert_channels": model.convert_channels, "pad_to_stride": model.pad_to_stride}
    if isinstance(model, UNet):
        return {"format_version": FORMAT_VERSION, "architecture": "UNet", "unet": model.to_dict(),
                "pad_to_stride": model.pad_to_stride}
    raise TypeError(f"flexunet.save supports UNet and SleapModel models, got {type(model).__name__}.")


def model_from_config(config: Any, source: str = CONFIG_FILE) -> nn.Module:
    """Build the (untrained) model a `config.json` describes."""
    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    check_keys(config, _KEYS, source)
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: format_version must be a positive integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} was written in format version {version}, newer than this flexunet reads "
            f"({FORMAT_VERSION}); upgrade flexunet to load it."
        )
    pad = config.get("pad_to_stride", False)
    if not isinstance(pad, bool):
        raise ValueError(f"{source}: pad_to_stride must be true or false, got {pad!r}.")
    model = _build(config, source)
    model.pad_to_stride = pad
    return model


def _build(config: dict, source: str) -> nn.Module:
    arch = config.get("architecture")
    if arch not in ("UNet", "SleapModel"):
        raise ValueError(f"{source}: architecture must be 'UNet' or 'SleapModel', got {arch!r}.")
    backbone = UNet.from_dict(config.get("unet"))
    if arch == "UNet":
        if "heads" in config:
            raise ValueError(f"{source}: a 'UNet' config has no heads; use architecture 'SleapModel'.")
        return backbone
    heads = config.get("heads")
    if not isinstance(heads, list) or not heads:
        raise ValueError(f"{source}: heads must be a non-empty list of head specs, got {heads!r}.")
    convert = config.get("convert_channels", False)
    if not isinstance(convert, bool):
        raise ValueError(f"{source}: convert_channels must be true or false, got {convert!r}.")
    return SleapModel(backbone, [HeadSpec.from_dict(h) for h in heads], convert_channels=convert)


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model` to `directory` as `config.json` + `model.safetensors`.

    Args:
        model: A `UNet` or a `SleapModel` (e.g. from `flexunet.sleap.load_model`).
        directory: Created if needed; existing files of the same names are replaced.
    """
    from safetensors.torch import save_file

    config = model_config(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `flexunet.save`; outputs are bit-identical.

    Returns:
        The model in eval mode (call `.train()` to continue training).

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: the config is invalid or from a newer format version, or the
            weights file is damaged or lacks tensors (all named in the message).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"flexunet model directory not found: {directory}")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"flexunet model directory {directory} has no {WEIGHTS_FILE}.")
    try:
        model = model_from_config(read_json(config_path), config_path)
    except (ValueError, TypeError) as err:  # a file's content is a ValueError, whatever the field's type
        message = str(err)
        raise ValueError(message if config_path in message else f"{config_path}: {message}") from None
    load_checked(model, read_safetensors(weights_path), f"{weights_path} does not match {config_path}:",
                 labels=("missing tensors", "unexpected tensors"))
    return model.eval()


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; damage is a `ValueError` naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
