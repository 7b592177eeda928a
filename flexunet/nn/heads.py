"""Output heads of SLEAP models: specs and the modules they build.

Every confidence-map-like head is a 1x1 convolution with an activation,
attached to the backbone output or to the decoder feature at the head's
stride. The class-vectors head pools globally and runs fully connected layers.
Module names follow Keras: a head's layers are entries of a `ModuleDict`
named exactly like the Keras layers (see `flexunet.io.keras`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from flexunet.nn.layers import ACTIVATIONS, Conv2dSame, make_activation
from flexunet.nn.validation import check_bool, check_choice, check_int, check_keys

# SLEAP head class -> default activation of its output layer.
HEAD_KINDS = {
    "SingleInstanceConfmapsHead": "linear",
    "CentroidConfmapsHead": "linear",
    "CenteredInstanceConfmapsHead": "linear",
    "MultiInstanceConfmapsHead": "linear",
    "PartAffinityFieldsHead": "linear",
    "ClassMapsHead": "sigmoid",
    "OffsetRefinementHead": "linear",
    "ClassVectorsHead": "softmax",
}


@dataclass(frozen=True)
class HeadSpec:
    """One output head.

    Args:
        kind: SLEAP head class name (a key of `HEAD_KINDS`).
        name: Keras name of the output layer (e.g. "CentroidConfmapsHead_0").
        channels: Output channels (or classes).
        output_stride: Stride of the feature the head is attached to.
        activation: Keras activation of the output layer.
        stack: Backbone stack whose features feed the head.
        num_fc_layers: Class vectors only: hidden fully connected layers.
        num_fc_units: Class vectors only: units per hidden layer.
        global_pool: Class vectors only: global max pooling before the layers
            (else the NHWC feature map is flattened, as Keras does).
        in_features: Class vectors without global pooling: flattened input size.
        flatten_order: Class vectors without global pooling: "nhwc" (Keras flattens
            channels-last) or "nchw" (sleap-nn flattens channels-first).
    """

    kind: str
    name: str
    channels: int
    output_stride: int
    activation: str = "linear"
    stack: int = 0
    num_fc_layers: int = 1
    num_fc_units: int = 64
    global_pool: bool = True
    in_features: Optional[int] = None
    flatten_order: str = "nhwc"

    def __post_init__(self):
        check_choice("HeadSpec.kind", self.kind, HEAD_KINDS)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"HeadSpec.name must be a non-empty string, got {self.name!r}.")
        check_int("HeadSpec.channels", self.channels, minimum=1, maximum=2**20)
        check_int("HeadSpec.output_stride", self.output_stride, minimum=1)
        check_choice("HeadSpec.activation", self.activation, ACTIVATIONS)
        check_int("HeadSpec.stack", self.stack, minimum=0)
        check_int("HeadSpec.num_fc_layers", self.num_fc_layers, minimum=0, maximum=64)
        check_int("HeadSpec.num_fc_units", self.num_fc_units, minimum=1, maximum=2**20)
        check_bool("HeadSpec.global_pool", self.global_pool)
        if self.in_features is not None:
            check_int("HeadSpec.in_features", self.in_features, minimum=1)
        check_choice("HeadSpec.flatten_order", self.flatten_order, ("nhwc", "nchw"))

    @property
    def is_vector(self) -> bool:
        """True for heads that output (N, channels) vectors instead of maps."""
        return self.kind == "ClassVectorsHead"

    def num_params(self, in_channels: int) -> int:
        """Trainable parameters for an input feature with `in_channels` channels."""
        if not self.is_vector:
            return in_channels * self.channels + self.channels
        n, width = 0, self._fc_in(in_channels)
        for _ in range(self.num_fc_layers):
            n += width * self.num_fc_units + self.num_fc_units
            width = self.num_fc_units
        return n + width * self.channels + self.channels

    def _fc_in(self, in_channels: int) -> int:
        if self.global_pool:
            return in_channels
        if self.in_features is None:
            raise ValueError(f"head {self.name!r} flattens without pooling and needs in_features.")
        return self.in_features

    def make_head(self, in_channels: int) -> nn.Module:
        """Build the head for an input feature with `in_channels` channels."""
        if self.is_vector:
            return ClassVectorsHead(self, in_channels)
        return ConvHead(in_channels, self.channels, make_activation(self.activation))

    def to_dict(self) -> dict:
        """Plain-dict form (round-trips through `HeadSpec.from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSpec":
        """Inverse of `to_dict`; unknown keys are rejected with a suggestion."""
        if not isinstance(data, dict):
            raise TypeError(f"head spec must be a dict, got {type(data).__name__}.")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "head spec")
        return cls(**data)


class ConvHead(Conv2dSame):
    """1x1 convolution followed by the head's activation (Keras `Conv2D(activation=...)`)."""

    def __init__(self, in_channels: int, channels: int, activation: nn.Module):
        super().__init__(in_channels, channels, 1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(super().forward(x))


class ClassVectorsHead(nn.Module):
    """Global max pool (or flatten), fully connected + ReLU layers, final dense."""

    def __init__(self, spec: HeadSpec, in_channels: int):
        super().__init__()
        self.global_pool = spec.global_pool
        self.channels_last_flatten = spec.flatten_order == "nhwc"
        layers = {}
        width = spec._fc_in(in_channels)
        for i in range(spec.num_fc_layers):
            layers[f"pre_classification{i}_fc"] = nn.Linear(width, spec.num_fc_units)
            width = spec.num_fc_units
        layers[spec.name] = nn.Linear(width, spec.channels)
        self.layers = nn.ModuleDict(layers)
        self.hidden = [f"pre_classification{i}_fc" for i in range(spec.num_fc_layers)]
        self.output_name = spec.name
        self.activation = make_activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool:
            x = torch.amax(x, dim=(2, 3))  # (N, C)
        elif self.channels_last_flatten:
            x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens channels-last
        else:
            x = x.flatten(1)
        for name in self.hidden:
            x = torch.relu(self.layers[name](x))
        return self.activation(self.layers[self.output_name](x))
