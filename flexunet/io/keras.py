"""Import Keras (SLEAP) `.h5` weights into flexunet modules by layer name.

Naming rule: a Keras layer is an entry of an `nn.ModuleDict`; below that entry,
module paths join with "_". So `blocks["stack0_dec0_s16_to_s8"].refine_conv1`
is the Keras layer `stack0_dec0_s16_to_s8_refine_conv1`, and
`heads["CentroidConfmapsHead_0"]` (a module dict entry holding the conv) is the
layer `CentroidConfmapsHead_0`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from flexunet.io import h5_reader
from flexunet.nn.validation import mismatch_message

# Keras weight name -> (PyTorch attribute, Keras-to-PyTorch array transform), per module type.
_CONV = {"kernel": ("weight", lambda a: a.transpose(3, 2, 0, 1)), "bias": ("bias", None)}
_PARAM_MAPS: list[tuple[type, dict[str, tuple[str, Callable | None]]]] = [
    # Conv2D kernels are (kh, kw, in, out); Conv2DTranspose kernels (kh, kw, out, in). Both
    # become PyTorch's layouts, (out, in, kh, kw) and (in, out, kh, kw), by the same permutation.
    (nn.Conv2d, _CONV),
    (nn.ConvTranspose2d, _CONV),
    (nn.Linear, {"kernel": ("weight", lambda a: a.T), "bias": ("bias", None)}),
    (
        nn.BatchNorm2d,
        {
            "gamma": ("weight", None),
            "beta": ("bias", None),
            "moving_mean": ("running_mean", None),
            "moving_variance": ("running_var", None),
        },
    ),
]


def _param_map(module: nn.Module) -> dict[str, tuple[str, Callable | None]] | None:
    for cls, mapping in _PARAM_MAPS:
        if isinstance(module, cls):
            return mapping
    return None


def keras_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Keras layer name -> weight-bearing module of `model`, by the naming rule above."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, parts: list[str]) -> Iterator[None]:
        for name, child in module.named_children():
            child_parts = [name] if isinstance(module, nn.ModuleDict) else parts + [name]
            has_weights = any(True for _ in child.parameters(recurse=False)) or any(
                b is not None for b in child._buffers.values()
            )
            if has_weights and _param_map(child) is not None:
                found["_".join(child_parts)] = child
            walk(child, child_parts)

    walk(model, [])
    return found


# Seconds a read of one .h5 file may take. Damaged HDF5 metadata can send the HDF5 library
# into an endless loop or a crash, so files are read by a helper interpreter stopped then.
READ_TIMEOUT = 120.0
# The helper: a script that imports only h5py and NumPy (see `flexunet.io.h5_reader`).
HELPER_SCRIPT = Path(h5_reader.__file__)


def read_keras_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read every layer's weights from a Keras 2 `.h5` file.

    Accepts whole-model files (weights under `model_weights/`, as SLEAP saves) and
    `save_weights` files (layers at the root). The file is read by a fresh
    interpreter, so a damaged file cannot hang or crash the caller (see
    `READ_TIMEOUT` and `flexunet.io.h5_reader`).

    Returns:
        `{layer_name: {weight_name: array}}` with weight names like "kernel", "bias",
        "gamma", "moving_mean"; layers without weights are left out.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not HDF5, not laid out as Keras writes weights, or so
            damaged that reading it hangs or crashes the HDF5 library.
        RuntimeError: the helper interpreter failed for a reason other than the file.
    """
    return _read("weights", path)[0]


def read_keras_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
    """The layer weights and the Keras model graph (the `model_config` attribute of a whole-model
    `.h5`, else None) in one guarded read, by a helper interpreter like `read_keras_weights`."""
    return _read("both", path)


def _read(mode: str, path: str | os.PathLike) -> tuple:
    path = os.fspath(path)
    h5_reader.check_path(path)  # in this process: a missing file is no reason to start the helper
    command = _helper_command()
    if command is None:  # no interpreter to start (an embedded or frozen Python): read here
        return h5_reader.read(mode, path)
    with tempfile.TemporaryDirectory(prefix="flexunet-h5-") as tmp:
        out = os.path.join(tmp, "result.npz")
        try:
            done = subprocess.run([*command, mode, os.path.abspath(path), out], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=READ_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ValueError(f"{path}: reading took longer than {READ_TIMEOUT:g} s (flexunet.io.keras.READ_TIMEOUT); "
                             "the HDF5 file is damaged.") from None
        except OSError as err:
            raise RuntimeError(f"flexunet could not start its HDF5 reader ({command[0]}) for {path}: {err}") from None
        if done.returncode < 0:
            raise ValueError(f"{path}: the HDF5 library crashed reading this file ({_signal_name(-done.returncode)}); "
                             "it is damaged.")
        if done.returncode != 0 or not os.path.exists(out):
            detail = done.stderr.decode("utf8", "replace").strip().splitlines()
            raise RuntimeError(f"flexunet's HDF5 reader failed while reading {path} (exit status {done.returncode}): "
                               f"{detail[-1] if detail else 'no message'}. The file itself was not judged.")
        weights, config, error = h5_reader.unpack(out)
    if error is not None:
        message = error.split(": ", 1)[1] if error.startswith(("ValueError: ", "OSError: ")) else error
        raise ValueError(message if path in message else f"{path}: {message}")
    return weights, config


def _helper_command() -> list[str] | None:
    """The command that runs the reader script, or None where no interpreter can be started."""
    if getattr(sys, "frozen", False) or not sys.executable or not os.path.isfile(sys.executable):
        return None
    # -P: the script's folder is not put on sys.path, so nothing beside it can shadow h5py or NumPy.
    return [sys.executable, "-P", str(HELPER_SCRIPT)]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def keras_state_dict(model: nn.Module, layers: dict[str, dict[str, np.ndarray]], source: str) -> dict[str, torch.Tensor]:
    """Convert Keras layer weights into a full state-dict update for `model`.

    Raises:
        ValueError: naming `source` and listing every missing, unexpected and
            mismatched layer.
    """
    targets = keras_layers(model)
    missing = sorted(set(targets) - set(layers))
    unexpected = sorted(set(layers) - set(targets))
    mismatched = []
    module_paths = {m: p for p, m in model.named_modules()}
    update: dict[str, torch.Tensor] = {}
    for name in sorted(set(targets) & set(layers)):
        module, weights = targets[name], layers[name]
        mapping = _param_map(module)
        expected = {k for k, (attr, _) in mapping.items() if getattr(module, attr, None) is not None}
        if set(weights) != expected:
            mismatched.append(f"{name}: weights {sorted(weights)}, expected {sorted(expected)}")
            continue
        for key, array in weights.items():
            attr, transform = mapping[key]
            target = getattr(module, attr)
            if not np.issubdtype(array.dtype, np.floating):
                mismatched.append(f"{name}/{key}: dtype {array.dtype} is not floating point")
                continue
            same_rank = array.ndim == target.dim()
            value = transform(array) if transform is not None and same_rank else array
            if not same_rank or tuple(value.shape) != tuple(target.shape):
                mismatched.append(
                    f"{name}/{key}: file has {tuple(array.shape)}, model needs "
                    f"{_keras_shape(key, module, target)}"
                )
                continue
            prefix = module_paths[module]
            update[f"{prefix}.{attr}" if prefix else attr] = torch.from_numpy(
                np.ascontiguousarray(value)
            ).to(target.dtype)
    report = mismatch_message(f"{source} does not match the model's layers:", [
        ("missing from the file", missing, ", "), ("not in the model", unexpected, ", "),
        ("mismatched", mismatched, "; ")])
    if report:
        raise ValueError(report)
    return update


def _keras_shape(key: str, module: nn.Module, target: torch.Tensor) -> tuple:
    """The Keras-layout shape that would fit `target` (for error messages)."""
    shape = tuple(target.shape)
    if key == "kernel" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if key == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def load_keras_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a Keras `.h5` file's weights into `model`, matching layers by name.

    Strict and all-or-nothing: every weight-bearing layer of the model must be in
    the file with the right shapes, and the file may hold no other weighted
    layers; otherwise nothing is changed.

    Args:
        model: A flexunet model (e.g. `UNet`), named as SLEAP names its layers.
        path: A whole-model `.h5` (SLEAP's `best_model.h5`) or a `save_weights` file.

    Returns:
        `model`, with its weights replaced.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is unreadable, or its layers do not match (the message
            names the file and lists every missing, unexpected and mismatched layer).
    """
    update = keras_state_dict(model, read_keras_weights(path), os.fspath(path))
    model.load_state_dict({**model.state_dict(), **update})  # Keras holds the weights; buffers stay
    return model
