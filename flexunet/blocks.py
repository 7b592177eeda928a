"""Block specs (frozen dataclasses) and the modules they build.

A spec is cheap data: printable, comparable, JSON-friendly. `spec.make_block`
turns it into an `nn.Module` whose submodules carry SLEAP's Keras layer names:
the Keras layer `{prefix}_{attr}` is the submodule `attr` of the block named
`{prefix}`, e.g. `stack0_enc1_conv0` is `blocks["stack0_enc1"].conv0`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from flexunet.layers import (
    ACTIVATIONS,
    ALIGNMENTS,
    Conv2dSame,
    ConvTranspose2dSame,
    MaxPool2dSame,
    Upsample,
    batch_norm,
    make_activation,
)
from flexunet.validation import check_bool, check_choice, check_int, check_keys, check_optional_int

INTERP_METHODS = ("bilinear", "nearest")


def _check_activation(name: str, value: str) -> str:
    return check_choice(name, value, ACTIVATIONS)


def _conv_params(kernel: int, cin: int, cout: int, bias: bool) -> int:
    return kernel * kernel * cin * cout + (cout if bias else 0)


class _Spec:
    """Shared behaviour of block specs: validation hook and dict round trip."""

    def to_dict(self) -> dict:
        """Plain-dict form with the spec's class name under `"type"`."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class EncoderBlock(_Spec):
    """Base spec of encoder blocks.

    Args:
        pool: If True, the block max-pools (2x2 window, 'same' padding).
        pooling_stride: Stride of the pooling; 1 keeps the resolution.
    """

    pool: bool = True
    pooling_stride: int = 2

    def __post_init__(self):
        check_bool(f"{type(self).__name__}.pool", self.pool)
        check_int(f"{type(self).__name__}.pooling_stride", self.pooling_stride, minimum=1)

    @property
    def stride(self) -> int:
        """Factor by which this block divides the resolution."""
        return self.pooling_stride if self.pool else 1

    def block_name(self, prefix: str) -> str:
        """Keras layer prefix of the block built with `prefix`."""
        return prefix

    def out_channels(self, in_channels: int) -> int:
        """Channels of the block's output for `in_channels` input channels."""
        raise NotImplementedError

    def num_params(self, in_channels: int) -> int:
        """Trainable parameters of the block, computed without building it."""
        raise NotImplementedError

    def layers(self, in_channels: int, prefix: str) -> list["LayerInfo"]:
        """The block's layers in order, for introspection (see `flexunet.summary`)."""
        raise NotImplementedError

    def make_block(self, in_channels: int, prefix: str = "conv_block") -> nn.Module:
        """Build the block's module for an input with `in_channels` channels."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerInfo:
    """One Keras-named layer of a block: its kind, kernel, stride and channels.

    `stride` > 1 divides the resolution, `upsample` > 1 multiplies it.
    """

    name: str
    kind: str
    kernel: int = 1
    stride: int = 1
    upsample: int = 1
    in_channels: int = 0
    out_channels: int = 0
    params: int = 0


@dataclass(frozen=True)
class SimpleConvBlock(EncoderBlock):
    """Convolutions with optional batch norm and max pooling (SLEAP's `SimpleConvBlock`).

    Args:
        pool: If True, max-pool at the end of the block (or first, see below).
        pooling_stride: Stride of the pooling.
        pool_before_convs: Pool before the convolutions instead of after.
        num_convs: Number of convolution + activation layers.
        filters: Output channels of every convolution.
        kernel_size: Convolution kernel size (square).
        use_bias: Whether convolutions have a bias.
        batch_norm: Add a batch normalization after each convolution.
        batch_norm_before_activation: conv -> BN -> act if True, conv -> act -> BN if False.
        activation: Keras activation name ("relu", "linear", ...).
        block_prefix: Appended to the prefix given to `make_block`
            (UNet's middle blocks use "_middle_expand" / "_middle_contract").
    """

    pool_before_convs: bool = False
    num_convs: int = 2
    filters: int = 32
    kernel_size: int = 3
    use_bias: bool = True
    batch_norm: bool = False
    batch_norm_before_activation: bool = True
    activation: str = "relu"
    block_prefix: str = ""

    def __post_init__(self):
        super().__post_init__()
        n = "SimpleConvBlock"
        check_bool(f"{n}.pool_before_convs", self.pool_before_convs)
        check_int(f"{n}.num_convs", self.num_convs, minimum=0, maximum=64)
        check_int(f"{n}.filters", self.filters, minimum=1)
        check_int(f"{n}.kernel_size", self.kernel_size, minimum=1)
        check_bool(f"{n}.use_bias", self.use_bias)
        check_bool(f"{n}.batch_norm", self.batch_norm)
        check_bool(f"{n}.batch_norm_before_activation", self.batch_norm_before_activation)
        _check_activation(f"{n}.activation", self.activation)
        if not isinstance(self.block_prefix, str):
            raise TypeError(f"{n}.block_prefix must be a string, got {self.block_prefix!r}.")

    def block_name(self, prefix: str) -> str:
        return prefix + self.block_prefix

    def out_channels(self, in_channels: int) -> int:
        return self.filters if self.num_convs else in_channels

    def num_params(self, in_channels: int) -> int:
        return sum(layer.params for layer in self.layers(in_channels, ""))

    def layers(self, in_channels: int, prefix: str) -> list[LayerInfo]:
        p = self.block_name(prefix)
        pool = LayerInfo(f"{p}_pool", "MaxPool2D", 2, self.pooling_stride)
        out: list[LayerInfo] = []
        if self.pool and self.pool_before_convs:
            out.append(dataclasses.replace(pool, in_channels=in_channels, out_channels=in_channels))
        c = in_channels
        for i in range(self.num_convs):
            out.append(
                LayerInfo(
                    f"{p}_conv{i}", "Conv2D", self.kernel_size, 1, 1, c, self.filters,
                    _conv_params(self.kernel_size, c, self.filters, self.use_bias),
                )
            )
            c = self.filters
            if self.batch_norm:
                out.append(LayerInfo(f"{p}_bn{i}", "BatchNormalization", 1, 1, 1, c, c, 2 * c))
        if self.pool and not self.pool_before_convs:
            out.append(dataclasses.replace(pool, in_channels=c, out_channels=c))
        return out

    def make_block(self, in_channels: int, prefix: str = "conv_block") -> "ConvBlock":
        check_int("in_channels", in_channels, minimum=1)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        pool = MaxPool2dSame(self.pooling_stride)
        if self.pool and self.pool_before_convs:
            layers["pool"] = pool
        c = in_channels
        for i in range(self.num_convs):
            layers[f"conv{i}"] = Conv2dSame(c, self.filters, self.kernel_size, bias=self.use_bias)
            c = self.filters
            if self.batch_norm and self.batch_norm_before_activation:
                layers[f"bn{i}"] = batch_norm(c)
            layers[f"act{i}"] = make_activation(self.activation)
            if self.batch_norm and not self.batch_norm_before_activation:
                layers[f"bn{i}"] = batch_norm(c)
        if self.pool and not self.pool_before_convs:
            layers["pool"] = pool
        return ConvBlock(self.block_name(prefix), layers)


@dataclass(frozen=True)
class PoolingBlock(EncoderBlock):
    """Max pooling only (SLEAP's `PoolingBlock`), layer `{prefix}_last_pool`.

    UNet's conv blocks pool *before* their convolutions so that skip connections
    come from the convolutions; this block closes the encoder with the last pool.

    Args:
        pool: If False, the block is the identity.
        pooling_stride: Stride of the pooling.
    """

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def num_params(self, in_channels: int) -> int:
        return 0

    def layers(self, in_channels: int, prefix: str) -> list[LayerInfo]:
        if not self.pool:
            return []
        return [LayerInfo(f"{prefix}_last_pool", "MaxPool2D", 2, self.pooling_stride, 1, in_channels, in_channels)]

    def make_block(self, in_channels: int, prefix: str = "conv_block") -> "ConvBlock":
        check_int("in_channels", in_channels, minimum=1)
        layers = OrderedDict(last_pool=MaxPool2dSame(self.pooling_stride)) if self.pool else OrderedDict()
        return ConvBlock(prefix, layers)


class ConvBlock(nn.Sequential):
    """A straight-through encoder block; `name` is its Keras layer prefix."""

    def __init__(self, name: str, layers: "OrderedDict[str, nn.Module]"):
        super().__init__(layers)
        self.name = name


# --------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class DecoderBlock(_Spec):
    """Base spec of decoder blocks.

    Args:
        upsampling_stride: Factor by which the block multiplies the resolution.
    """

    upsampling_stride: int = 2

    def __post_init__(self):
        check_int(f"{type(self).__name__}.upsampling_stride", self.upsampling_stride, minimum=1)

    def block_name(self, prefix: str, current_stride: Optional[int]) -> str:
        """SLEAP's layer prefix: `{prefix}_s{stride}_to_s{stride // upsampling}`."""
        if current_stride is None:
            return prefix
        return f"{prefix}_s{current_stride}_to_s{current_stride // self.upsampling_stride}"

    def out_channels(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        """Channels of the block's output."""
        raise NotImplementedError

    def num_params(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        """Trainable parameters of the block, computed without building it."""
        raise NotImplementedError

    def layers(self, in_channels: int, skip_channels: Optional[int], name: str) -> list[LayerInfo]:
        """The block's layers in order, for introspection."""
        raise NotImplementedError

    def make_block(
        self,
        in_channels: int,
        skip_channels: Optional[int] = None,
        prefix: str = "upsample",
        current_stride: Optional[int] = None,
    ) -> nn.Module:
        """Build the block's module.

        Args:
            in_channels: Channels of the tensor to upsample.
            skip_channels: Channels of the skip source, or None when the block gets none.
            prefix: Keras layer prefix of the block.
            current_stride: Stride of the input; if given, `_s{a}_to_s{b}` is appended
                to the prefix as in SLEAP.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class SimpleUpsamplingBlock(DecoderBlock):
    """Upsampling, optional skip connection and refinement convolutions.

    Args:
        upsampling_stride: Upsampling factor.
        transposed_conv: Upsample with a learned transposed convolution instead of
            interpolation; the `transposed_conv_*` options apply only then.
        transposed_conv_filters: Output channels of the transposed convolution.
        transposed_conv_kernel_size: Its kernel size (any size, also < stride).
        transposed_conv_use_bias: Whether it has a bias.
        transposed_conv_batch_norm: Add batch normalization after it.
        transposed_conv_batch_norm_before_activation: BN before (True) or after the activation.
        transposed_conv_activation: Its Keras activation name.
        alignment: Which side of the full transposed convolution loses the odd pixel
            (kernel > stride, odd difference): "keras" (TensorFlow: bottom/right) or
            "sleap_nn" (PyTorch's padding=(k-1)//2, output_padding=s-1: top/left).
            Weights trained with one are wrong with the other.
        interp_method: "bilinear" (half-pixel centres) or "nearest".
        skip_connection: Join the skip source given at build/run time.
        skip_add: Join by addition (a 1x1 linear conv `skip_conv1x1` first maps the
            source's channels when they differ) instead of channel concatenation
            (skip first, then the upsampled tensor).
        refine_convs: Number of convolutions after upsampling and skip.
        refine_convs_first_filters: Channels of the first refinement conv, if not None.
        refine_convs_filters: Channels of the (other) refinement convs.
        refine_convs_kernel_size: Their kernel size.
        refine_convs_use_bias: Whether they have a bias.
        refine_convs_batch_norm: Add batch normalization after each.
        refine_convs_batch_norm_before_activation: BN before (True) or after the activation.
        refine_convs_activation: Their Keras activation name.
    """

    transposed_conv: bool = False
    transposed_conv_filters: int = 64
    transposed_conv_kernel_size: int = 3
    transposed_conv_use_bias: bool = True
    transposed_conv_batch_norm: bool = True
    transposed_conv_batch_norm_before_activation: bool = True
    transposed_conv_activation: str = "relu"
    alignment: str = "keras"
    interp_method: str = "bilinear"
    skip_connection: bool = False
    skip_add: bool = False
    refine_convs: int = 2
    refine_convs_first_filters: Optional[int] = None
    refine_convs_filters: int = 64
    refine_convs_use_bias: bool = True
    refine_convs_kernel_size: int = 3
    refine_convs_batch_norm: bool = True
    refine_convs_batch_norm_before_activation: bool = True
    refine_convs_activation: str = "relu"

    def __post_init__(self):
        super().__post_init__()
        n = "SimpleUpsamplingBlock"
        for field in (
            "transposed_conv", "transposed_conv_use_bias", "transposed_conv_batch_norm",
            "transposed_conv_batch_norm_before_activation", "skip_connection", "skip_add",
            "refine_convs_use_bias", "refine_convs_batch_norm",
            "refine_convs_batch_norm_before_activation",
        ):
            check_bool(f"{n}.{field}", getattr(self, field))
        check_int(f"{n}.transposed_conv_filters", self.transposed_conv_filters, minimum=1)
        check_int(f"{n}.transposed_conv_kernel_size", self.transposed_conv_kernel_size, minimum=1)
        check_int(f"{n}.refine_convs", self.refine_convs, minimum=0, maximum=64)
        check_optional_int(f"{n}.refine_convs_first_filters", self.refine_convs_first_filters, minimum=1)
        check_int(f"{n}.refine_convs_filters", self.refine_convs_filters, minimum=1)
        check_int(f"{n}.refine_convs_kernel_size", self.refine_convs_kernel_size, minimum=1)
        check_choice(f"{n}.interp_method", self.interp_method, INTERP_METHODS)
        check_choice(f"{n}.alignment", self.alignment, ALIGNMENTS)
        if self.transposed_conv and self.alignment == "sleap_nn" and self.transposed_conv_kernel_size % 2 == 0:
            raise ValueError(f"{n}.alignment='sleap_nn' needs an odd transposed_conv_kernel_size, got "
                             f"{self.transposed_conv_kernel_size}.")
        _check_activation(f"{n}.transposed_conv_activation", self.transposed_conv_activation)
        _check_activation(f"{n}.refine_convs_activation", self.refine_convs_activation)

    def _refine_filters(self, i: int) -> int:
        if i == 0 and self.refine_convs_first_filters is not None:
            return self.refine_convs_first_filters
        return self.refine_convs_filters

    def out_channels(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        return self.layers(in_channels, skip_channels, "")[-1].out_channels

    def num_params(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        return sum(layer.params for layer in self.layers(in_channels, skip_channels, ""))

    def layers(self, in_channels: int, skip_channels: Optional[int], name: str) -> list[LayerInfo]:
        s, c = self.upsampling_stride, in_channels
        out: list[LayerInfo] = []
        if self.transposed_conv:
            k, f = self.transposed_conv_kernel_size, self.transposed_conv_filters
            out.append(
                LayerInfo(f"{name}_trans_conv", "Conv2DTranspose", k, 1, s, c, f,
                          _conv_params(k, c, f, self.transposed_conv_use_bias))
            )
            c = f
            if self.transposed_conv_batch_norm:
                out.append(LayerInfo(f"{name}_trans_conv_bn", "BatchNormalization", 1, 1, 1, c, c, 2 * c))
        else:
            kind = "UpSampling2D"
            out.append(LayerInfo(f"{name}_interp_{self.interp_method}", kind, 1, 1, s, c, c))
        if self.skip_connection and skip_channels is not None:
            if self.skip_add:
                if skip_channels != c:
                    out.append(LayerInfo(f"{name}_skip_conv1x1", "Conv2D", 1, 1, 1, skip_channels, c,
                                         _conv_params(1, skip_channels, c, True)))
                out.append(LayerInfo(f"{name}_skip_add", "Add", 1, 1, 1, c, c))
            else:
                out.append(LayerInfo(f"{name}_skip_concat", "Concatenate", 1, 1, 1, c, c + skip_channels))
                c += skip_channels
        for i in range(self.refine_convs):
            k, f = self.refine_convs_kernel_size, self._refine_filters(i)
            out.append(LayerInfo(f"{name}_refine_conv{i}", "Conv2D", k, 1, 1, c, f,
                                 _conv_params(k, c, f, self.refine_convs_use_bias)))
            c = f
            if self.refine_convs_batch_norm:
                out.append(LayerInfo(f"{name}_refine_conv{i}_bn", "BatchNormalization", 1, 1, 1, c, c, 2 * c))
        return out

    def make_block(
        self,
        in_channels: int,
        skip_channels: Optional[int] = None,
        prefix: str = "upsample",
        current_stride: Optional[int] = None,
    ) -> "UpsamplingBlock":
        check_int("in_channels", in_channels, minimum=1)
        check_optional_int("skip_channels", skip_channels, minimum=1)
        return UpsamplingBlock(self, in_channels, skip_channels, self.block_name(prefix, current_stride))


class UpsamplingBlock(nn.Module):
    """Module built from a `SimpleUpsamplingBlock` spec.

    `forward(x, skip)` upsamples `x`, joins `skip` (if the spec and the build had
    one) and refines. Submodule names are the Keras layer suffixes.
    """

    def __init__(self, spec: SimpleUpsamplingBlock, in_channels: int, skip_channels: Optional[int], name: str):
        super().__init__()
        self.name = name
        self.uses_skip = bool(spec.skip_connection and skip_channels is not None)
        self.skip_add = spec.skip_add
        c = in_channels

        if spec.transposed_conv:
            trans_conv = ConvTranspose2dSame(
                c, spec.transposed_conv_filters, spec.transposed_conv_kernel_size,
                spec.upsampling_stride, bias=spec.transposed_conv_use_bias, alignment=spec.alignment,
            )
            c = spec.transposed_conv_filters
            up: "OrderedDict[str, nn.Module]" = OrderedDict(trans_conv=trans_conv)
            bn_first = spec.transposed_conv_batch_norm_before_activation
            if spec.transposed_conv_batch_norm and bn_first:
                up["trans_conv_bn"] = batch_norm(c)
            up["trans_conv_act"] = make_activation(spec.transposed_conv_activation)
            if spec.transposed_conv_batch_norm and not bn_first:
                up["trans_conv_bn"] = batch_norm(c)
        else:
            up = OrderedDict(interp=Upsample(spec.upsampling_stride, spec.interp_method))
        for key, module in up.items():
            setattr(self, key, module)
        self._up = list(up)

        if self.uses_skip and spec.skip_add and skip_channels != c:
            # Residual-style projection of the source onto the upsampled channels.
            self.skip_conv1x1 = Conv2dSame(skip_channels, c, 1)
        else:
            self.skip_conv1x1 = None
        if self.uses_skip and not spec.skip_add:
            c += skip_channels

        refine: "OrderedDict[str, nn.Module]" = OrderedDict()
        bn_first = spec.refine_convs_batch_norm_before_activation
        for i in range(spec.refine_convs):
            f = spec._refine_filters(i)
            refine[f"refine_conv{i}"] = Conv2dSame(c, f, spec.refine_convs_kernel_size, spec.refine_convs_use_bias)
            c = f
            if spec.refine_convs_batch_norm and bn_first:
                refine[f"refine_conv{i}_bn"] = batch_norm(c)
            refine[f"refine_conv{i}_act"] = make_activation(spec.refine_convs_activation)
            if spec.refine_convs_batch_norm and not bn_first:
                refine[f"refine_conv{i}_bn"] = batch_norm(c)
        for key, module in refine.items():
            setattr(self, key, module)
        self._refine = list(refine)
        self.out_channels = c

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        for key in self._up:
            x = getattr(self, key)(x)  # (N, C, H*s, W*s) after the first
        if self.uses_skip:
            if skip is None:
                raise ValueError(f"decoder block {self.name!r} was built with a skip connection but got none.")
            if self.skip_add:
                if self.skip_conv1x1 is not None:
                    skip = self.skip_conv1x1(skip)
                x = skip + x
            else:
                x = torch.cat([skip, x], dim=1)  # skip first, as in SLEAP
        for key in self._refine:
            x = getattr(self, key)(x)
        return x


SPEC_TYPES = {cls.__name__: cls for cls in (SimpleConvBlock, PoolingBlock, SimpleUpsamplingBlock)}


def spec_from_dict(data: dict) -> _Spec:
    """Rebuild a block spec from `spec.to_dict()` output."""
    if not isinstance(data, dict) or data.get("type") not in SPEC_TYPES:
        raise ValueError(f"block spec must be a dict with 'type' in {sorted(SPEC_TYPES)}, got {data!r}.")
    cls = SPEC_TYPES[data["type"]]
    fields = {k: v for k, v in data.items() if k != "type"}
    check_keys(fields, [f.name for f in dataclasses.fields(cls)], cls.__name__)
    return cls(**fields)
