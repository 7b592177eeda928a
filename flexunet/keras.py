"""Import Keras (SLEAP) `.h5` weights into flexunet modules by layer name.

Naming rule: a Keras layer is an entry of an `nn.ModuleDict`; below that entry,
module paths join with "_". So `blocks["stack0_dec0_s16_to_s8"].refine_conv1`
is the Keras layer `stack0_dec0_s16_to_s8_refine_conv1`, and
`heads["CentroidConfmapsHead_0"]` (a module dict entry holding the conv) is the
layer `CentroidConfmapsHead_0`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from flexunet.validation import mismatch_message

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


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _open_h5(path: str | os.PathLike):
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"Keras weights path is a directory, expected an .h5 file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 (Keras .h5) file: {err}") from None


def _read_keras_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read every layer's weights from a Keras 2 `.h5` file (in this process).

    Accepts whole-model files (weights under `model_weights/`, as SLEAP saves) and
    `save_weights` files (layers at the root).

    Returns:
        `{layer_name: {weight_name: array}}` with weight names like "kernel", "bias",
        "gamma", "moving_mean"; layers without weights are left out.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not HDF5 or not laid out as Keras writes weights.
    """
    with _open_h5(path) as f:
        try:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise ValueError("no 'layer_names' attribute: not a Keras 2 weights layout")
            layers: dict[str, dict[str, np.ndarray]] = {}
            for raw in root.attrs["layer_names"]:
                name = _text(raw)
                group = root[name]
                weights = {}
                for wraw in group.attrs.get("weight_names", []):
                    wname = _text(wraw)
                    key = wname.split("/")[-1].split(":")[0]
                    data = group[wname]
                    if not hasattr(data, "shape"):
                        raise ValueError(f"weight {wname!r} is not a dataset")
                    weights[key] = np.asarray(data[()])
                if weights:
                    layers[name] = weights
            return layers
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: cannot read Keras weights: {err}") from None
        except Exception as err:  # h5py surfaces damage as KeyError, OSError, TypeError, ...
            raise ValueError(
                f"{os.fspath(path)}: damaged or unexpected Keras weights layout ({type(err).__name__}: {err})"
            ) from None


def _read_keras_model_config(path: str | os.PathLike) -> dict | None:
    """The Keras model graph (`model_config` attribute) of a whole-model `.h5`, or None (in this process)."""
    with _open_h5(path) as f:
        try:
            raw = f.attrs.get("model_config")
            if raw is None:
                return None
            config = json.loads(_text(raw))
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: model_config attribute is not valid JSON: {err}") from None
        except Exception as err:
            raise ValueError(f"{os.fspath(path)}: unreadable model_config attribute ({type(err).__name__}: {err})") from None
        return config if isinstance(config, dict) else None


# Seconds a read of one .h5 file may take. Damaged HDF5 metadata can send the HDF5 library
# into an endless loop or a crash, so files are read in a child process that is stopped then.
READ_TIMEOUT = 120.0


def read_keras_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read every layer's weights from a Keras 2 `.h5` file.

    Accepts whole-model files (weights under `model_weights/`, as SLEAP saves) and
    `save_weights` files (layers at the root). The file is read in a child process,
    so a damaged file cannot hang or crash the caller (see `READ_TIMEOUT`).

    Returns:
        `{layer_name: {weight_name: array}}` with weight names like "kernel", "bias",
        "gamma", "moving_mean"; layers without weights are left out.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not HDF5, not laid out as Keras writes weights, or so
            damaged that reading it hangs or crashes.
    """
    _check_path(path)
    return _guarded(_read_keras_weights, path)


def read_keras_model_config(path: str | os.PathLike) -> dict | None:
    """The Keras model graph (`model_config` attribute) of a whole-model `.h5`, or None.

    Read in a child process like `read_keras_weights`.
    """
    _check_path(path)
    return _guarded(_read_keras_model_config, path)


def read_keras_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
    """`(read_keras_weights(path), read_keras_model_config(path))` in one guarded read."""
    _check_path(path)
    return _guarded(_read_both, path)


def _read_both(path):
    return _read_keras_weights(path), _read_keras_model_config(path)


def _check_path(path) -> None:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"Keras weights path is a directory, expected an .h5 file: {path}")


def _child(read, path, conn) -> None:
    try:
        conn.send(("ok", read(path)))
    except (ValueError, OSError) as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
    except BaseException as err:  # pragma: no cover - reported to the parent as damage
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def _guarded(read, path):
    """Run `read(path)` in a child process with a time limit; errors come back as ValueError."""
    import multiprocessing

    path = os.fspath(path)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(read, path, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(READ_TIMEOUT):
            raise ValueError(f"{path}: reading took longer than {READ_TIMEOUT:g} s; the HDF5 file is damaged.")
        try:
            status, payload = receiver.recv()
        except (EOFError, OSError):
            raise ValueError(f"{path}: the HDF5 library crashed reading this file; it is damaged.") from None
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        process.join()
    if status == "ok":
        return payload
    message = payload.split(": ", 1)[1] if payload.startswith(("ValueError: ", "OSError: ")) else payload
    raise ValueError(message if path in message else f"{path}: {message}")


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
    state = model.state_dict()
    with torch.no_grad():
        for key, value in update.items():
            state[key].copy_(value)
    return model
