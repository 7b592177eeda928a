"""Read the tensors of a PyTorch or Lightning checkpoint without running code from it.

A `.ckpt` (`torch.save` / Lightning) is a pickle, and a pickle can call any
function it names. `read_checkpoint` unpickles with a closed list of what may be
built: tensors and storages, plain containers and values. Training state that
names classes of the libraries that wrote it (sleap-nn configs, OmegaConf nodes,
Lightning callbacks and loops, NumPy scalars) is read as inert placeholders and
dropped, so none of those libraries is needed or imported. Anything else a file
names (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) stops the read
with a `ValueError` before it can be called.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import os
import pickle
import types
import zipfile
from typing import Any

import torch

# What a checkpoint may build for real: (module, name) -> object.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "device"): torch.device,
    **{("builtins", name): getattr(builtins, name)
       for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str", "bytes",
                    "bytearray", "complex", "slice")},
}
_ALLOWED.update({("torch", name): getattr(torch, name) for name in dir(torch)
                 if isinstance(getattr(torch, name, None), torch.dtype)})

# Packages whose objects appear in training state only; they are read as placeholders.
_SKIPPED_PACKAGES = ("sleap_nn", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric",
                     "lightning_utilities", "torchmetrics", "typing", "numpy", "pathlib", "enum", "datetime")
# Single names with the same role: they build values of the placeholders above.
_SKIPPED_NAMES = {("_operator", "getitem"), ("operator", "getitem"), ("collections", "defaultdict"),
                  ("_codecs", "encode"), ("codecs", "encode"), ("functools", "partial"),
                  ("torch.torch_version", "TorchVersion")}


class Skipped:
    """Stand-in for an object of training state: accepts whatever the pickle does to it."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Skipped()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def __getitem__(self, key):
        return Skipped()

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return "<skipped>"


def _reconstructor(cls, base, state):
    """`copyreg._reconstructor` limited to placeholders and the allowed classes."""
    if isinstance(cls, type) and issubclass(cls, Skipped):
        return Skipped()
    return copyreg._reconstructor(cls, base, state)


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names something that is neither a tensor, a plain value nor training state."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only what `_ALLOWED` lists and skips training state."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 pickles say `__builtin__.long`), renamed as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if (module, name) in _SKIPPED_NAMES or module.split(".")[0] in _SKIPPED_PACKAGES:
            return Skipped
        raise ForbiddenGlobal(f"{module}.{name}")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# A module object, as `torch.load(pickle_module=...)` expects one.
restricted_pickle = types.ModuleType("flexunet_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.UnpicklingError = pickle.UnpicklingError


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The top-level dict of a checkpoint, tensors on the CPU, training state as `Skipped`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: naming the file: it is not a PyTorch checkpoint, it is damaged,
            or its pickle names a function or class outside the allowed list (the
            message names it; nothing from the file has been called).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except ForbiddenGlobal as err:
        raise ValueError(f"{path} asks to call {err}, which a checkpoint of weights never needs; refusing to "
                         "load it (flexunet only builds tensors, containers and plain values from a pickle).") from None
    except MemoryError:
        raise ValueError(f"{path} is damaged: it describes more data than fits in memory.") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError,
            TypeError, AttributeError, IndexError, UnicodeDecodeError, OverflowError, ImportError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict with a 'state_dict'.")
    return data


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint (or a bare state dict saved with `torch.save`).

    Raises:
        FileNotFoundError, ValueError: see `read_checkpoint`; also when there is no
            state dict of tensors.
    """
    path = os.fspath(path)
    data = read_checkpoint(path)
    state = data.get("state_dict", data)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} has no 'state_dict' of tensors.")
    bad = sorted(str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if bad:
        raise ValueError(f"{path}: the state_dict holds entries that are not named tensors: {', '.join(bad[:5])}.")
    return dict(state)
