"""Read nested config documents with errors that name the file and the dotted path."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import yaml


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file is `FileNotFoundError`, bad JSON a `ValueError` naming it."""
    return _parse(path, "JSON", json.load, json.JSONDecodeError)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file with `yaml.safe_load` (no tags, nothing executed); errors as `read_json`."""
    return _parse(path, "YAML", yaml.safe_load, yaml.YAMLError)


def _parse(path: str | os.PathLike, kind: str, load, error: type) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf8") as f:
            return load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 {kind} file: {err}") from None
    except error as err:
        raise ValueError(f"{path} is not valid {kind}: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config file.") from None


class ConfigNode:
    """A value inside a parsed JSON or YAML document, remembering its dotted path.

    Errors name the file and the path (`model.backbone.unet.max_stride is
    missing`); unknown keys in a section are warned about, not refused, so files
    written by newer versions still load.
    """

    def __init__(self, value: Any, path: str, source: str):
        self.value, self.path, self.source = value, path, source

    @property
    def _object(self) -> str:
        return "a mapping" if self.source.endswith((".yaml", ".yml")) else "a JSON object"

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {self.path} {message}")

    def section(self, key: str, known: Optional[set] = None, required: bool = True) -> Optional["ConfigNode"]:
        """A sub-object; warn about keys outside `known`."""
        if not isinstance(self.value, dict):
            raise self.error(f"must be {self._object}, got {type(self.value).__name__}.")
        child = ConfigNode(self.value.get(key), self._join(key), self.source)
        if child.value is None:
            if required:
                raise child.error("is missing.")
            return None
        if not isinstance(child.value, dict):
            raise child.error(f"must be {self._object}, got {type(child.value).__name__}.")
        if known is not None:
            # A null says nothing: newer versions list sections they leave unset.
            for extra in sorted(k for k in set(child.value) - known if child.value[k] is not None):
                warnings.warn(f"{self.source}: unknown key {child.path}.{extra} ignored.", stacklevel=4)
        return child

    def get(self, key: str, kind, default: Any = ..., check=None) -> Any:
        """A leaf value of Python type(s) `kind`; `default` if absent (else it is required)."""
        value = self.value.get(key) if isinstance(self.value, dict) else None
        path = self._join(key)
        if value is None:
            if default is ...:
                raise ValueError(f"{self.source}: {path} is missing.")
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _tuple(kind))
        if not ok:
            names = " or ".join(k.__name__ for k in _tuple(kind))
            raise ValueError(f"{self.source}: {path} must be {names}, got {value!r}.")
        if check is not None:
            problem = check(value)
            if problem:
                raise ValueError(f"{self.source}: {path} {problem}, got {value!r}.")
        return value


def require_unet(backbone: ConfigNode, names: tuple[str, ...]) -> ConfigNode:
    """The `unet` section of a backbone section that may set one of `names`; any other is refused by name."""
    chosen = [k for k in names if isinstance(backbone.value, dict) and backbone.value.get(k) is not None]
    if chosen != ["unet"]:
        if not chosen:
            raise backbone.error(f"names no backbone; flexunet supports only 'unet' backbones "
                                 f"(one of {', '.join(names)} must be set, and it must be 'unet').")
        other = [k for k in chosen if k != "unet"]
        raise backbone.error(f"uses the {other[0]!r} backbone; flexunet supports only 'unet' backbones.")
    return backbone


def power_of_two(value) -> Optional[str]:
    """A `check` for `ConfigNode.get`: strides must be 1, 2, 4, ..."""
    return None if value >= 1 and not value & (value - 1) else "must be a power of two"


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)
