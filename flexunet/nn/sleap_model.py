"""A UNet backbone with SLEAP's output heads, as SLEAP and sleap-nn run them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from flexunet.nn.encoder_decoder import crop_to_input
from flexunet.nn.heads import HeadSpec
from flexunet.nn.unet import UNet


class HeadRoute(NamedTuple):
    """Where a head reads: the backbone output of `stack`, or its decoder input number `feature`."""

    name: str
    stack: int
    feature: Optional[int]


# ITU-R 601 luma weights, as torchvision's `rgb_to_grayscale` (which sleap-nn calls) uses them.
RGB_TO_GRAY = (0.2989, 0.587, 0.114)


class SleapModel(nn.Module):
    """A UNet backbone with SLEAP output heads.

    `forward(x)` takes (N, C, H, W) float images exactly as the Keras model takes
    them (after SLEAP's preprocessing) and returns a dict from each Keras output
    layer name to its tensor, in the Keras model's output order; maps are NCHW,
    class vectors (N, classes).

    Args:
        backbone: The UNet.
        heads: Head specs in output order.
        convert_channels: Accept grayscale images for an RGB model and RGB images for
            a grayscale one, converted as sleap-nn converts them: grayscale repeated
            into three channels, RGB to luma `0.2989 R + 0.587 G + 0.114 B` (the
            weights of `torchvision`'s `rgb_to_grayscale`). sleap-nn models set it;
            Keras models, which had no such conversion, refuse other channel counts.
    """

    def __init__(self, backbone: UNet, heads: list[HeadSpec], convert_channels: bool = False):
        super().__init__()
        if not heads:
            raise ValueError("a SleapModel needs at least one head.")
        if not isinstance(convert_channels, bool):
            raise TypeError(f"convert_channels must be True or False, got {convert_channels!r}.")
        self.convert_channels = convert_channels
        self.backbone = backbone
        self.head_specs = list(heads)
        plan = backbone.plan()
        modules, self._routes = {}, []
        for spec in self.head_specs:
            if spec.stack >= backbone.stacks:
                raise ValueError(f"head {spec.name!r} reads stack {spec.stack}, but the backbone has {backbone.stacks}.")
            stack_blocks = [p for p in plan if p.stack == spec.stack and p.section != "stem"]
            decoder = [p for p in stack_blocks if p.section == "decoder"]
            if spec.output_stride == backbone.output_stride:
                route, channels = None, stack_blocks[-1].out_channels
            else:
                # As SLEAP: the first decoder input at the head's stride.
                index = next((i for i, p in enumerate(decoder) if p.in_stride == spec.output_stride), None)
                if index is None:
                    strides = sorted({backbone.output_stride, *(p.in_stride for p in decoder)})
                    raise ValueError(
                        f"head {spec.name!r} has output_stride {spec.output_stride}, but the backbone only "
                        f"provides features at strides {strides}."
                    )
                route, channels = index, decoder[index].in_channels
            if spec.name in modules:
                raise ValueError(f"head names must be unique, {spec.name!r} appears twice.")
            modules[spec.name] = spec.make_head(channels)
            self._routes.append(HeadRoute(spec.name, spec.stack, route))
        self.heads = nn.ModuleDict(modules)
        self._needs_features = any(r.feature is not None for r in self._routes)

    @property
    def in_channels(self) -> int:
        """Channels of the input images."""
        return self.backbone.in_channels

    @property
    def maximum_stride(self) -> int:
        """Input height and width must be multiples of this."""
        return self.backbone.maximum_stride

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a `ValueError`/`TypeError` naming what is wrong with an input batch."""
        self.backbone.check_input(self._convert(x))

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        """Grayscale <-> RGB as sleap-nn converts them, when `convert_channels` is set."""
        if not (self.convert_channels and isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()):
            return x
        if x.shape[1] == 1 and self.in_channels == 3:
            return x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        if x.shape[1] == 3 and self.in_channels == 1:
            luma = x.new_tensor(RGB_TO_GRAY).view(1, 3, 1, 1)
            return (x * luma).sum(dim=1, keepdim=True)  # (N, 1, H, W)
        return x

    @property
    def pad_to_stride(self) -> bool:
        """Accept any input size: pad to the maximum stride and crop the maps back (see UNet)."""
        return self.backbone.pad_to_stride

    @pad_to_stride.setter
    def pad_to_stride(self, value: bool) -> None:
        self.backbone.pad_to_stride = bool(value)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run backbone and heads; returns `{output layer name: tensor}` in output order."""
        x = self._convert(x)
        # Heads see the padded features (as SLEAP runs them on padded images); maps are cropped after.
        outputs, features, size, _ = self.backbone.run(x, keep_features=self._needs_features)
        result = {}
        for spec, route in zip(self.head_specs, self._routes):
            source = outputs[route.stack] if route.feature is None else features[route.stack][route.feature].tensor
            out = self.heads[route.name](source)
            if size is not None and not spec.is_vector:
                out = crop_to_input(out, spec.output_stride, size)  # maps only, not class vectors
            result[route.name] = out
        return result

    @property
    def output_names(self) -> list[str]:
        """The keys of `forward`'s dict, in order."""
        return [route.name for route in self._routes]
