"""The one check every loader runs before it touches a model: all weights present, none extra, every
shape and dtype right, reported together in one `ValueError`; then an all-or-nothing load."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from flexunet.nn.validation import mismatch_message


def load_checked(model: nn.Module, weights: dict[str, torch.Tensor], header: str,
                 labels: tuple[str, str] = ("missing", "unexpected"), unexpected: Iterable[str] = (),
                 mismatched: Iterable[str] = ()) -> nn.Module:
    """Load `weights` (state-dict keys of `model`) into `model` if they fit it exactly.

    Args:
        model: The model to fill.
        weights: Its complete state dict, as read from a file.
        header: The report's first line, naming the file(s).
        labels: How the report calls missing and unexpected keys.
        unexpected, mismatched: Problems the caller found while mapping the file's
            names to the model's (reported with the rest).

    Raises:
        ValueError: listing every missing, unexpected and mismatched weight; `model`
            is then unchanged.
    """
    targets = model.state_dict()
    unexpected = sorted([*unexpected, *(k for k in weights if k not in targets)])
    mismatched = list(mismatched)
    for key, value in weights.items():
        target = targets.get(key)
        if target is not None and (not value.is_floating_point() or tuple(value.shape) != tuple(target.shape)):
            mismatched.append(f"{key}: file has {value.dtype} {tuple(value.shape)}, model needs {tuple(target.shape)}")
    missing = sorted(set(targets) - set(weights))
    report = mismatch_message(header, [(f"{labels[0]}", missing, ", "), (labels[1], unexpected, ", "),
                                       ("mismatched", mismatched, "; ")])
    if report:
        raise ValueError(report)
    model.load_state_dict({k: v.to(targets[k].dtype) for k, v in weights.items()})
    return model


__all__ = ["load_checked"]
