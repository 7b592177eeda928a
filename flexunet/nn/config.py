"""`UNetConfig`: SLEAP's stride-based description of a UNet (`model.backbone.unet`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from flexunet.nn.validation import (
    check_bool,
    check_int,
    check_keys,
    check_positive_number,
    check_power_of_two,
)


@dataclass(frozen=True)
class UNetConfig:
    """A UNet described by strides, as in SLEAP's training configs.

    `UNet.from_config` maps it to block counts: kernel 3, stem kernel 7, two
    convolutions per block, `stem_blocks = log2(stem_stride)`,
    `down_blocks = log2(max_stride) - stem_blocks`,
    `up_blocks = log2(max_stride / output_stride)`.

    Args:
        stem_stride: Stride reached by the stem (a power of two below `max_stride`),
            or None for no stem.
        max_stride: Stride at the bottom of the encoder (power of two); inputs must be
            multiples of it.
        output_stride: Stride of the output (power of two, <= max_stride).
        filters: Channels of the first block.
        filters_rate: Channel multiplier per block.
        middle_block: Add the expand/contract block at the bottom.
        up_interpolate: Bilinear upsampling instead of transposed convolutions.
        stacks: Number of stacked encoder-decoders.
    """

    stem_stride: Optional[int] = None
    max_stride: int = 16
    output_stride: int = 1
    filters: int = 64
    filters_rate: float = 2
    middle_block: bool = True
    up_interpolate: bool = False
    stacks: int = 1

    def __post_init__(self):
        if self.stem_stride is not None:
            check_power_of_two("UNetConfig.stem_stride", self.stem_stride)
        check_power_of_two("UNetConfig.max_stride", self.max_stride)
        if self.max_stride > 2**16:
            raise ValueError(f"UNetConfig.max_stride must be <= 65536, got {self.max_stride}.")
        check_power_of_two("UNetConfig.output_stride", self.output_stride)
        if self.output_stride > self.max_stride:
            raise ValueError(
                f"UNetConfig.output_stride ({self.output_stride}) must be <= max_stride ({self.max_stride})."
            )
        if self.stem_stride is not None and self.stem_stride >= self.max_stride:
            raise ValueError(
                f"UNetConfig.stem_stride ({self.stem_stride}) must be smaller than max_stride ({self.max_stride})."
            )
        check_int("UNetConfig.filters", self.filters, minimum=1)
        check_positive_number("UNetConfig.filters_rate", self.filters_rate)
        check_bool("UNetConfig.middle_block", self.middle_block)
        check_bool("UNetConfig.up_interpolate", self.up_interpolate)
        check_int("UNetConfig.stacks", self.stacks, minimum=1, maximum=64)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (SLEAP's `model.backbone.unet` keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Build from a dict; unknown keys are rejected with a suggestion."""
        if not isinstance(data, dict):
            raise TypeError(f"UNetConfig data must be a dict, got {type(data).__name__}.")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "UNetConfig")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))
