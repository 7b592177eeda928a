"""Block specs (frozen dataclasses) and the modules they build.

A spec is cheap data: printable, comparable, JSON-friendly. `spec.layers`
describes the block's Keras layers (`LayerInfo`: kind, channels, kernel,
activation, parameters); `spec.make_block` builds the `nn.Module` from that
same description, so introspection and the module cannot disagree. Submodules
carry SLEAP's Keras layer names: the Keras layer `{name}_{attr}` is the
submodule `attr` of the block named `{name}`, e.g. `stack0_enc1_conv0` is
`blocks["stack0_enc1"].conv0`.

Encoder and decoder specs share one signature: `make_block(in_channels, name,
skip_channels=None)`, with `name` from `spec.block_name(prefix, current_stride)`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from flexunet.nn.layers import (
    ACTIVATIONS,
    ALIGNMENTS,
    Conv2dSame,
    ConvTranspose2dSame,
    MaxPool2dSame,
    Upsample,
    batch_norm,
    make_activation,
)
from flexunet.nn.validation import check_bool, check_choice, check_int, check_keys, check_optional_int

INTERP_METHODS = ("bilinear", "nearest")
JOINS = ("Concatenate", "Add")


def _check_activation(name: str, value: str) -> str:
    return check_choice(name, value, ACTIVATIONS)


def _conv_params(kernel: int, cin: int, cout: int, bias: bool) -> int:
    return kernel * kernel * cin * cout + (cout if bias else 0)


@dataclass(frozen=True)
class LayerInfo:
    """One Keras-named layer of a block: enough to build it and to reason about it.

    `stride` > 1 divides the resolution, `upsample` > 1 multiplies it.
    `activation` is applied after the layer (Keras folds it into convolutions;
    with batch norm before the activation it follows the batch norm).
    """

    name: str
    kind: str
    kernel: int = 1
    stride: int = 1
    upsample: int = 1
    in_channels: int = 0
    out_channels: int = 0
    params: int = 0
    activation: str = "linear"
    bias: bool = True
    mode: str = ""  # UpSampling2D: "bilinear" or "nearest"
    alignment: str = "keras"  # Conv2DTranspose: see `layers.ConvTranspose2dSame`


def _conv(name: str, kind: str, kernel: int, cin: int, cout: int, bias: bool, activation: str,
          upsample: int = 1, alignment: str = "keras") -> LayerInfo:
    return LayerInfo(name, kind, kernel, 1, upsample, cin, cout, _conv_params(kernel, cin, cout, bias),
                     activation, bias, alignment=alignment)


def _conv_with_bn(conv: LayerInfo, batch_norm: bool, bn_first: bool, activation: str,
                  bn_name: Optional[str] = None) -> list[LayerInfo]:
    """A convolution and its optional batch norm (Keras name `bn_name`, default `{conv}_bn`),
    the activation after whichever comes second in Keras."""
    if not batch_norm:
        return [dataclasses.replace(conv, activation=activation)]
    c = conv.out_channels
    bn = LayerInfo(bn_name or f"{conv.name}_bn", "BatchNormalization", 1, 1, 1, c, c, 2 * c)
    if bn_first:
        return [dataclasses.replace(conv, activation="linear"), dataclasses.replace(bn, activation=activation)]
    return [dataclasses.replace(conv, activation=activation), bn]


def _module(info: LayerInfo) -> Optional[nn.Module]:
    """The module a layer description stands for (None for the joins, which live in `forward`)."""
    if info.kind == "Conv2D":
        return Conv2dSame(info.in_channels, info.out_channels, info.kernel, bias=info.bias,
                          activation=info.activation)
    if info.kind == "Conv2DTranspose":
        return ConvTranspose2dSame(info.in_channels, info.out_channels, info.kernel, info.upsample,
                                   bias=info.bias, alignment=info.alignment)
    if info.kind == "MaxPool2D":
        return MaxPool2dSame(info.stride, info.kernel)
    if info.kind == "BatchNormalization":
        return batch_norm(info.out_channels)
    if info.kind == "UpSampling2D":
        return Upsample(info.upsample, info.mode)
    if info.kind in JOINS:
        return None
    raise ValueError(f"no module for layer kind {info.kind!r}")


def _modules(layers: list[LayerInfo], name: str) -> "OrderedDict[str, nn.Module]":
    """Modules for `layers`, keyed by their Keras name without the block's `name_`; activations as
    `{attr}_act`, except a convolution's own (Keras' `Conv2D(activation=...)`), which it applies."""
    modules: "OrderedDict[str, nn.Module]" = OrderedDict()
    for info in layers:
        attr = info.name[len(name) + 1:]
        module = _module(info)
        if module is not None:
            modules[attr] = module
        if info.activation != "linear" and info.kind != "Conv2D":
            modules[f"{attr}_act"] = make_activation(info.activation)
    return modules


class _Spec:
    """What every block spec shares: dict round trip, and channels and parameters from `layers`."""

    def to_dict(self) -> dict:
        """Plain-dict form with the spec's class name under `"type"`."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    def layers(self, in_channels: int, name: str, skip_channels: Optional[int] = None) -> list[LayerInfo]:
        """The block's Keras layers in order, for a block called `name` (see `block_name`)."""
        raise NotImplementedError

    def out_channels(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        """Channels of the block's output."""
        layers = self.layers(in_channels, "", skip_channels)
        return layers[-1].out_channels if layers else in_channels

    def num_params(self, in_channels: int, skip_channels: Optional[int] = None) -> int:
        """Trainable parameters of the block, computed without building it."""
        return sum(layer.params for layer in self.layers(in_channels, "", skip_channels))

    def make_block(self, in_channels: int, name: str = "block", skip_channels: Optional[int] = None) -> nn.Module:
        """Build the block's module, from `layers` (see the module docstring)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class EncoderBlock(_Spec):
    """Base spec of encoder blocks (straight-through: no skip input).

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

    def block_name(self, prefix: str, current_stride: Optional[int] = None) -> str:
        """Keras layer prefix of the block placed as `prefix` (the stride does not enter it)."""
        return prefix

    def make_block(self, in_channels: int, name: str = "block", skip_channels: Optional[int] = None) -> "ConvBlock":
        check_int("in_channels", in_channels, minimum=1)
        return ConvBlock(name, _modules(self.layers(in_channels, name), name))


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

    def block_name(self, prefix: str, current_stride: Optional[int] = None) -> str:
        return prefix + self.block_prefix

    def layers(self, in_channels: int, name: str, skip_channels: Optional[int] = None) -> list[LayerInfo]:
        def pool(c):
            return LayerInfo(f"{name}_pool", "MaxPool2D", 2, self.pooling_stride, 1, c, c)

        out: list[LayerInfo] = []
        if self.pool and self.pool_before_convs:
            out.append(pool(in_channels))
        c = in_channels
        for i in range(self.num_convs):
            conv = _conv(f"{name}_conv{i}", "Conv2D", self.kernel_size, c, self.filters, self.use_bias, "linear")
            out += _conv_with_bn(conv, self.batch_norm, self.batch_norm_before_activation, self.activation,
                                 bn_name=f"{name}_bn{i}")
            c = self.filters
        if self.pool and not self.pool_before_convs:
            out.append(pool(c))
        return out


@dataclass(frozen=True)
class PoolingBlock(EncoderBlock):
    """Max pooling only (SLEAP's `PoolingBlock`), layer `{name}_last_pool`.

    UNet's conv blocks pool *before* their convolutions so that skip connections
    come from the convolutions; this block closes the encoder with the last pool.

    Args:
        pool: If False, the block is the identity.
        pooling_stride: Stride of the pooling.
    """

    def layers(self, in_channels: int, name: str, skip_channels: Optional[int] = None) -> list[LayerInfo]:
        if not self.pool:
            return []
        return [LayerInfo(f"{name}_last_pool", "MaxPool2D", 2, self.pooling_stride, 1, in_channels, in_channels)]


class ConvBlock(nn.Sequential):
    """A straight-through encoder block; `name` is its Keras layer prefix."""

    def __init__(self, name: str, layers: "OrderedDict[str, nn.Module]"):
        super().__init__(layers)
        self.name = name


# --------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class DecoderBlock(_Spec):
    """Base spec of decoder blocks: upsample, optionally join a skip source, refine.

    Args:
        upsampling_stride: Factor by which the block multiplies the resolution.
    """

    upsampling_stride: int = 2

    def __post_init__(self):
        check_int(f"{type(self).__name__}.upsampling_stride", self.upsampling_stride, minimum=1)

    def block_name(self, prefix: str, current_stride: Optional[int] = None) -> str:
        """SLEAP's layer prefix: `{prefix}_s{stride}_to_s{stride // upsampling}` (just `prefix` without a stride)."""
        if current_stride is None:
            return prefix
        return f"{prefix}_s{current_stride}_to_s{current_stride // self.upsampling_stride}"

    def make_block(self, in_channels: int, name: str = "block",
                   skip_channels: Optional[int] = None) -> "UpsamplingBlock":
        check_int("in_channels", in_channels, minimum=1)
        check_optional_int("skip_channels", skip_channels, minimum=1)
        return UpsamplingBlock(name, self.layers(in_channels, name, skip_channels))


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
        alignment: How the 'same' output is cut from the full transposed convolution:
            "keras" (TensorFlow) or "sleap_nn" (PyTorch's padding=(k-1)//2,
            output_padding=s-1; odd kernels only). For SLEAP's k=3, s=2 the two are
            one pixel apart: weights trained with one are wrong with the other.
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

    def layers(self, in_channels: int, name: str, skip_channels: Optional[int] = None) -> list[LayerInfo]:
        s, c = self.upsampling_stride, in_channels
        out: list[LayerInfo] = []
        if self.transposed_conv:
            k, f = self.transposed_conv_kernel_size, self.transposed_conv_filters
            conv = _conv(f"{name}_trans_conv", "Conv2DTranspose", k, c, f, self.transposed_conv_use_bias, "linear",
                         upsample=s, alignment=self.alignment)
            out += _conv_with_bn(conv, self.transposed_conv_batch_norm,
                                 self.transposed_conv_batch_norm_before_activation, self.transposed_conv_activation)
            c = f
        else:
            out.append(LayerInfo(f"{name}_interp_{self.interp_method}", "UpSampling2D", 1, 1, s, c, c,
                                 mode=self.interp_method))
        if self.skip_connection and skip_channels is not None:
            if self.skip_add:
                if skip_channels != c:  # a linear 1x1 projection of the source onto the upsampled channels
                    out.append(_conv(f"{name}_skip_conv1x1", "Conv2D", 1, skip_channels, c, True, "linear"))
                out.append(LayerInfo(f"{name}_skip_add", "Add", 1, 1, 1, c, c))
            else:  # the skip first, then the upsampled tensor, as SLEAP concatenates
                out.append(LayerInfo(f"{name}_skip_concat", "Concatenate", 1, 1, 1, c, c + skip_channels))
                c += skip_channels
        for i in range(self.refine_convs):
            k, f = self.refine_convs_kernel_size, self._refine_filters(i)
            conv = _conv(f"{name}_refine_conv{i}", "Conv2D", k, c, f, self.refine_convs_use_bias, "linear")
            out += _conv_with_bn(conv, self.refine_convs_batch_norm, self.refine_convs_batch_norm_before_activation,
                                 self.refine_convs_activation)
            c = f
        return out


class UpsamplingBlock(nn.Module):
    """A decoder block built from its layer description (`SimpleUpsamplingBlock.layers`).

    `forward(x, skip)` runs the layers before the join on `x`, joins `skip` (a
    concatenation, skip first, or an addition after the optional linear 1x1
    projection `skip_conv1x1`), then runs the layers after it. When the block is
    interpolation -> concatenation -> convolution, the three are one call of the
    convolution (`Conv2dSame.forward(x, skip, upsample)`), which the fast
    kernels run without storing the upsampled or concatenated tensors. Submodule
    names are the Keras layer suffixes.
    """

    def __init__(self, name: str, layers: list[LayerInfo]):
        super().__init__()
        self.name = name
        joins = [i for i, info in enumerate(layers) if info.kind in JOINS]
        cut = joins[0] if joins else len(layers)
        self.join = layers[cut].kind if joins else None
        self.uses_skip, self.skip_add = self.join is not None, self.join == "Add"
        projection = [info for info in layers[:cut] if info.name.endswith("_skip_conv1x1")]
        before = [info for info in layers[:cut] if info not in projection]
        self._up = self._add(_modules(before, name))
        self.skip_conv1x1 = _module(projection[0]) if projection else None
        self._refine = self._add(_modules(layers[cut + 1:], name))
        self.out_channels = layers[-1].out_channels
        # Interpolation by 2, concatenation, convolution: one call (see the class docstring).
        fusable = (len(before) == 1 and before[0].kind == "UpSampling2D" and before[0].upsample == 2
                   and self.join == "Concatenate" and len(layers) > cut + 1 and layers[cut + 1].kind == "Conv2D")
        self.fused_mode = before[0].mode if fusable else None

    def _add(self, modules: "OrderedDict[str, nn.Module]") -> list[str]:
        for key, module in modules.items():
            self.add_module(key, module)
        return list(modules)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.join is not None and skip is None:
            raise ValueError(f"decoder block {self.name!r} was built with a skip connection but got none.")
        refine = self._refine
        if self.fused_mode is not None:
            x = getattr(self, refine[0])(x, skip=skip, upsample=self.fused_mode)  # conv(cat([skip, up(x)]))
            refine = refine[1:]
        else:
            for key in self._up:
                x = getattr(self, key)(x)  # (N, C, H*s, W*s) after the first
            if self.skip_add:
                x = (skip if self.skip_conv1x1 is None else self.skip_conv1x1(skip)) + x
            elif self.join is not None:
                x = torch.cat([skip, x], dim=1)  # (N, C_skip + C, H*s, W*s)
        for key in refine:
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
