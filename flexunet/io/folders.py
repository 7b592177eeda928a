"""SLEAP model folders of both eras: telling them apart and loading either.

* SLEAP <= 1.4: `training_config.json` + `best_model.h5` (`flexunet.io.keras_folder`);
* SLEAP >= 1.5: `training_config.yaml` + `best.ckpt`, trained by sleap-nn (`flexunet.io.sleap_nn`).
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from flexunet.io import serialization, sleap_nn
from flexunet.io.keras_folder import KERAS_FILES, load_keras_folder
from flexunet.nn.sleap_model import SleapModel

SLEAP_NN_FILES = (sleap_nn.CONFIG_FILE, sleap_nn.CHECKPOINT_FILE)


def folder_kind(model_dir: str | os.PathLike) -> Optional[str]:
    """"keras" (SLEAP <= 1.4), "sleap_nn" (SLEAP >= 1.5) or None, told apart by the weights file.

    Raises:
        ValueError: the folder holds both `best_model.h5` and `best.ckpt`.
    """
    model_dir = os.fspath(model_dir)
    keras = os.path.isfile(os.path.join(model_dir, KERAS_FILES[1]))
    torch_ckpt = os.path.isfile(os.path.join(model_dir, SLEAP_NN_FILES[1]))
    if keras and torch_ckpt:
        raise ValueError(f"{model_dir} holds both a Keras model ({KERAS_FILES[1]}) and a sleap-nn checkpoint "
                         f"({SLEAP_NN_FILES[1]}); put them in separate folders.")
    if keras or torch_ckpt:
        return "keras" if keras else "sleap_nn"
    # No weights: the config names the kind, so the error can name the missing weights file.
    if os.path.isfile(os.path.join(model_dir, SLEAP_NN_FILES[0])):
        return "sleap_nn"
    if os.path.isfile(os.path.join(model_dir, KERAS_FILES[0])):
        return "keras"
    return None


def require_kind(model_dir: str | os.PathLike) -> str:
    """`folder_kind` of an existing model folder; FileNotFoundError naming it otherwise."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"SLEAP model folder not found: {model_dir}")
    kind = folder_kind(model_dir)
    if kind is None:
        raise FileNotFoundError(f"{model_dir} is not a SLEAP model folder: it has neither "
                                f"{' + '.join(KERAS_FILES)} (SLEAP <= 1.4) nor {' + '.join(SLEAP_NN_FILES)} (sleap-nn).")
    return kind


def load_model(model_dir: str | os.PathLike) -> SleapModel:
    """Load a trained SLEAP model folder, from SLEAP's Keras era or from sleap-nn.

    * SLEAP <= 1.4 (`training_config.json` + `best_model.h5`): the backbone comes
      from `model.backbone.unet` with the output stride SLEAP derives from the
      heads, the heads from `model.heads`; input channels, head names and any
      sizes the config leaves open from the weights. Keras numerics; outputs keyed
      by the Keras output layer names.
    * SLEAP >= 1.5 (`training_config.yaml` + `best.ckpt`, trained by sleap-nn):
      see `flexunet.io.sleap_nn.load_sleap_nn_model`. sleap-nn numerics; outputs
      keyed by sleap-nn's head names.

    The kind is told apart by the weights file; each runs with its own numerics.

    Args:
        model_dir: The model folder.

    Returns:
        A `SleapModel` in eval mode with the trained weights.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the config is malformed or not a UNet, the weights file is
            damaged or unsafe, or the weights disagree with the config (the message
            names the file and lists the layers).
    """
    model_dir = os.fspath(model_dir)
    kind = require_kind(model_dir)
    try:
        return load_keras_folder(model_dir) if kind == "keras" else sleap_nn.load_sleap_nn_model(model_dir)
    except (ValueError, TypeError) as err:
        message = str(err)
        if model_dir not in message:
            message = f"{model_dir}: {message}"
        raise ValueError(message) from None


NATIVE_FILES = (serialization.CONFIG_FILE, serialization.WEIGHTS_FILE)


def load_any(path: str | os.PathLike) -> nn.Module:
    """Any model flexunet reads, from its folder or a file in it (see `flexunet.load_model`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    folder = path
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name not in (*KERAS_FILES, *SLEAP_NN_FILES, *NATIVE_FILES):
            raise ValueError(f"{path} is not a model file flexunet reads: pass a model folder, or one of its "
                             f"{', '.join((*KERAS_FILES, *SLEAP_NN_FILES, *NATIVE_FILES))}.")
        folder = os.path.dirname(path) or "."
    if folder_kind(folder) is not None:
        return load_model(folder)
    if os.path.isfile(os.path.join(folder, NATIVE_FILES[0])) or os.path.isfile(os.path.join(folder, NATIVE_FILES[1])):
        return serialization.load(folder)
    raise FileNotFoundError(
        f"{folder} holds no model flexunet reads: a SLEAP folder ({' + '.join(KERAS_FILES)}), a sleap-nn folder "
        f"({' + '.join(SLEAP_NN_FILES)}) or a flexunet one ({' + '.join(NATIVE_FILES)}).")


__all__ = ["KERAS_FILES", "NATIVE_FILES", "SLEAP_NN_FILES", "folder_kind", "load_any", "load_model", "require_kind"]
