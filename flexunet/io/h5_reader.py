"""Read the weights and graph of a Keras 2 `.h5` file with h5py and NumPy only.

The functions here run in the caller's process or, as a script, in a fresh
interpreter (`python -P h5_reader.py MODE FILE OUT`): `flexunet.io.keras` starts
one per read so that a damaged file that hangs or crashes the HDF5 library
cannot take the caller with it. The script imports neither flexunet nor torch
(it starts in a fraction of a second), never runs the caller's `__main__`, and
works the same under every `multiprocessing` start method and platform.

Script protocol: the result is written to OUT (an `.npz` readable without
pickle); a problem with the file becomes `{"error": message}` in OUT with exit
status 0. Any other exit means the helper itself failed, not the file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

MODES = ("weights", "both")  # the layer weights, or the weights and the Keras model graph


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def check_path(path: str) -> None:
    """`FileNotFoundError` / `IsADirectoryError` naming `path` unless it is a file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"Keras weights path is a directory, expected an .h5 file: {path}")


def _open(path: str):
    import h5py

    check_path(path)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 (Keras .h5) file: {err}") from None


def read_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Every layer's weights: `{layer: {"kernel" | "bias" | "gamma" | ...: array}}`.

    Accepts whole-model files (weights under `model_weights/`) and `save_weights`
    files (layers at the root); layers without weights are left out.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not HDF5 or not laid out as Keras writes weights.
    """
    with _open(path) as f:
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
                    data = group[wname]
                    if not hasattr(data, "shape"):
                        raise ValueError(f"weight {wname!r} is not a dataset")
                    weights[wname.split("/")[-1].split(":")[0]] = np.asarray(data[()])
                if weights:
                    layers[name] = weights
            return layers
        except ValueError as err:
            raise ValueError(f"{path}: cannot read Keras weights: {err}") from None
        except Exception as err:  # h5py surfaces damage as KeyError, OSError, TypeError, ...
            raise ValueError(f"{path}: damaged or unexpected Keras weights layout ({type(err).__name__}: {err})") from None


def read_model_config(path: str) -> dict | None:
    """The Keras model graph (the `model_config` attribute) of a whole-model file, or None."""
    with _open(path) as f:
        try:
            raw = f.attrs.get("model_config")
            if raw is None:
                return None
            config = json.loads(_text(raw))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: model_config attribute is not valid JSON: {err}") from None
        except Exception as err:
            raise ValueError(f"{path}: unreadable model_config attribute ({type(err).__name__}: {err})") from None
        return config if isinstance(config, dict) else None


def read(mode: str, path: str) -> tuple[dict | None, dict | None]:
    """(weights, model config) as `mode` asks; the config is None unless asked for."""
    return read_weights(path), read_model_config(path) if mode == "both" else None


# ------------------------------------------------------------------ transport


def pack(weights: dict | None, config: dict | None, error: str | None = None) -> dict[str, np.ndarray]:
    """Arrays for `np.savez`: one per weight, plus a JSON index (no pickled objects)."""
    arrays, index = {}, []
    for layer, entries in (weights or {}).items():
        for key, array in entries.items():
            arrays[f"a{len(index)}"] = array
            index.append([layer, key])
    meta = {"index": index if weights is not None else None, "config": config, "error": error}
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def unpack(path: str) -> tuple[dict | None, dict | None, str | None]:
    """Inverse of `pack` after `np.savez`: (weights, config, error)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        weights = None
        if meta["index"] is not None:
            weights = {}
            for i, (layer, key) in enumerate(meta["index"]):
                weights.setdefault(layer, {})[key] = data[f"a{i}"]
    return weights, meta["config"], meta["error"]


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in MODES:
        print(f"usage: h5_reader.py {{{','.join(MODES)}}} FILE OUT", file=sys.stderr)
        return 2
    mode, path, out = argv
    try:
        result = pack(*read(mode, path))
    except (ValueError, OSError) as err:
        result = pack(None, None, f"{type(err).__name__}: {err}")
    with open(out, "wb") as f:
        np.savez(f, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
