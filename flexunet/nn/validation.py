"""Checks for user-facing values: each failure is one sentence naming the field.

Every public config runs its fields through these at construction, so a bad
value is reported where it was written, not deep inside a convolution.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Mapping


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Require an integer (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        # Accept integral numpy scalars, which SLEAP's own config code produces.
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value.__index__())
        else:
            raise TypeError(f"{name} must be an integer, got {_got(value)}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")
    return value


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    """Like `check_int`, but None is allowed."""
    return None if value is None else check_int(name, value, minimum)


def check_positive_number(name: str, value: Any) -> float:
    """Require a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {_got(value)}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Require a real bool (1/0 and strings are rejected to catch typos in configs)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Require one of a fixed set of strings."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_power_of_two(name: str, value: Any) -> int:
    """Require a positive integer power of two (1, 2, 4, ...)."""
    value = check_int(name, value, minimum=1)
    if value & (value - 1):
        lower = 1 << (value.bit_length() - 1)
        raise ValueError(f"{name} must be a power of two, got {value} (nearest: {lower} or {lower * 2}).")
    return value


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    """Sentence for an unknown key, suggesting the closest valid one."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" did you mean {close[0]!r}?" if close else f" valid keys: {', '.join(valid)}."
    return f"unknown key {key!r} in {where};{hint}"


def check_keys(mapping: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Reject keys not in `valid` with a did-you-mean suggestion."""
    valid = set(valid)
    for key in mapping:
        if key not in valid:
            raise ValueError(unknown_key_message(str(key), valid, where))


def nearest_multiples(size: int, stride: int) -> tuple[int, int]:
    """The multiples of `stride` just below and above `size` (below is >= stride)."""
    below = max(size // stride * stride, stride)
    above = -(-size // stride) * stride
    if above == below:
        above += stride
    return below, above


def mismatch_message(header: str, groups: list[tuple[str, list[str], str]]) -> str | None:
    """Multi-line report of what does not match (groups of (label, items, separator)), or None."""
    lines = [f"  {label} ({len(items)}): {sep.join(items)}" for label, items, sep in groups if items]
    return "\n".join([header, *lines]) if lines else None
