"""Primitive layers with TensorFlow/Keras numerics.

Keras pads 'same' convolutions, pools and transposed convolutions with the
extra pixel at the bottom/right, where PyTorch's usual `padding=` choices put
it at the top/left or on both sides. These layers reproduce Keras exactly, so
weights trained in SLEAP give the same numbers here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from flexunet import fastconv, native
from flexunet.validation import check_choice

# Keras' BatchNormalization defaults (momentum 0.99 is 1 - 0.01 in PyTorch's convention).
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01
# 3x3 convolutions with at least this many input and output channels use Winograd on CPU.
WINOGRAD_MIN_CHANNELS = 256
# Training also needs this many 4x4 output tiles per batch: kernel transforms are recomputed
# every step, and the weight gradient is a product over the tiles.
WINOGRAD_MIN_TRAINING_TILES = 128
# The same for the fused native kernel, which transforms the kernel twice per step (forward
# and input gradient) and takes the weight gradient from PyTorch.
NATIVE_MIN_TRAINING_TILES = 512


class Conv2dSame(nn.Conv2d):
    """Stride-1 convolution with Keras 'same' padding for any kernel size.

    Odd kernels pad symmetrically; even kernels put the extra row/column at the
    bottom/right, as TensorFlow does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        odd = kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2 if odd else 0, bias=bias)
        before = (kernel_size - 1) // 2
        self.asymmetric_pad = None if odd else (before, kernel_size - 1 - before) * 2
        # The fused native kernel wins from 16 input channels on; the PyTorch Winograd path
        # only once both channel counts are large (see benchmarks/).
        self.winograd = kernel_size == 3
        self.large = min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS
        self._winograd_cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and fastconv.use_fast_path(x):
            y = self._winograd(x)
            if y is not None:
                return y
        if self.asymmetric_pad is not None:
            x = F.pad(x, self.asymmetric_pad)
        cast = autocast_params(self, x)
        if cast is not None:  # inference under autocast: weights cast once, not at every call
            weight, bias, dtype = cast
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(x.to(dtype), weight, bias, padding=self.padding)
        return super().forward(x)

    def _winograd(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        dtype = _compute_dtype(x)
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        fused = native.supports_winograd(dtype, self.in_channels, self.out_channels) and native.available()
        if _tracked(self, x):
            # Training: float32 only, and only where there are enough tiles to amortise the
            # kernel transforms that every step recomputes.
            n, _, h, width = x.shape
            tiles = n * h * width / 16
            if not (dtype == x.dtype == w.dtype == torch.float32 and tiles >= WINOGRAD_MIN_TRAINING_TILES):
                return None
            if fused and tiles >= NATIVE_MIN_TRAINING_TILES:
                return native.WinogradConv3x3.apply(x, w, self.bias)
            return fastconv.WinogradConv3x3.apply(x, w, self.bias) if self.large else None
        if not (fused or self.large):
            return None
        if fused:
            make = lambda: native.transform_kernel(w, dtype)  # noqa: E731
        else:
            make = lambda: fastconv.winograd_kernel(w.detach(), fastconv.winograd_tile(dtype)).to(dtype)  # noqa: E731
        kernel = _cached(self, "_winograd_cache", (dtype, fused, *_state_key(w)), make)
        with torch.autocast("cpu", enabled=False):
            if fused:
                return native.winograd_conv3x3(x, kernel, self.bias)
            return fastconv.winograd_conv3x3(x.to(dtype), w, self.bias, kernel=kernel)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution computes in: the CPU autocast dtype under autocast, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _tracked(module: nn.Module, x: torch.Tensor) -> bool:
    """True when autograd records this call (training): the inference caches do not apply."""
    return torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)


def _state_key(*tensors) -> tuple:
    """Identity and in-place version of each tensor (None skipped): a cache stays valid while equal."""
    # Inference tensors have no version counter; they cannot be changed in place outside inference mode.
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors if t is not None)


def _cached(module: nn.Module, name: str, key: tuple, make):
    """`make()`, kept in `module.<name>` as (key, value) and recomputed only when `key` changes."""
    cache = getattr(module, name, None)
    if cache is None or cache[0] != key:
        cache = (key, make())
        setattr(module, name, cache)
    return cache[1]


def autocast_params(module: nn.Module, x: torch.Tensor):
    """(weight, bias, dtype) cast to the CPU autocast dtype and cached, for inference under autocast.

    Returns None outside autocast, when gradients are tracked, or off the fast path;
    the cache is refreshed whenever the weight changes.
    """
    if not (torch.is_autocast_enabled("cpu") and fastconv.use_fast_path(x)) or _tracked(module, x):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    w, b = module.weight, module.bias
    weight, bias = _cached(module, "_autocast_cache", (dtype, *_state_key(w, b)),
                           lambda: (w.detach().to(dtype), None if b is None else b.detach().to(dtype)))
    return weight, bias, dtype


class MaxPool2dSame(nn.Module):
    """Max pooling with a 2x2 window and Keras 'same' padding.

    The output has `ceil(size / stride)` pixels; missing window positions at the
    bottom/right are ignored (padded with -inf), as in TensorFlow.
    """

    def __init__(self, stride: int = 2, pool_size: int = 2):
        super().__init__()
        self.stride = stride
        self.pool_size = pool_size

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, stride={self.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.pool_size, self.stride
        if k == s:
            # Windows tile the input; ceil_mode keeps the clipped last window like TF.
            return F.max_pool2d(x, k, s, ceil_mode=True)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), k, s)


# How a 'same' transposed convolution (output = input * stride) is cut from the full one:
# "keras" as TensorFlow, "sleap_nn" as PyTorch's padding=(k-1)//2, output_padding=s-1,
# which sleap-nn uses. Models must run with the alignment they were trained with.
ALIGNMENTS = ("keras", "sleap_nn")


class ConvTranspose2dSame(nn.ConvTranspose2d):
    """Transposed convolution with 'same' output size: output = input * stride.

    The full transposed convolution has `(H - 1) * s + k` rows. TensorFlow
    (`alignment="keras"`) crops `max(k - s, 0) // 2` of them at the top/left and
    the rest at the bottom/right (for kernels smaller than the stride it pads the
    bottom/right instead). sleap-nn (`alignment="sleap_nn"`) uses PyTorch's
    `padding=(k - 1) // 2, output_padding=s - 1`: for k=3, s=2 it crops the
    first row and column where TensorFlow crops the last, so the outputs are
    one pixel apart.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool = True,
                 alignment: str = "keras"):
        check_choice("alignment", alignment, ALIGNMENTS)
        if alignment == "sleap_nn" and kernel_size % 2 == 0:
            raise ValueError(f"alignment='sleap_nn' needs an odd kernel size (PyTorch's padding=(k-1)//2 gives "
                             f"input * stride rows only then), got kernel_size={kernel_size}.")
        total = max(kernel_size - stride, 0)
        if alignment == "keras":
            # PyTorch crops `padding` on both sides; the odd pixel TF drops at the end is cropped after.
            padding, output_padding, self.crop_start = total // 2, max(stride - kernel_size, 0), total // 2
        else:
            padding, output_padding = (kernel_size - 1) // 2, stride - 1
            self.crop_start = padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, bias=bias)
        self.alignment = alignment
        self.crop_end = total % 2 if alignment == "keras" else 0
        self._native_cache: tuple | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.alignment == "keras" else f", alignment={self.alignment!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fastconv.use_fast_path(x) and not _tracked(self, x):  # training: oneDNN's own backward is faster
            dtype = _compute_dtype(x)
            k, s = self.kernel_size[0], self.stride[0]
            if (self.alignment == "keras" and native.supports_transposed(dtype, self.in_channels, self.out_channels, k, s)
                    and native.available()):
                packed = _cached(self, "_native_cache", (dtype, *_state_key(self.weight)),
                                 lambda: native.pack_transposed(self.weight, dtype))
                return native.transposed_conv_k3s2(x, packed, self.bias)
            cast = autocast_params(self, x)
            if cast is None:
                return fastconv.transposed_conv(x, self.weight, self.bias, s, self.crop_start)
            weight, bias, dtype = cast
            with torch.autocast("cpu", enabled=False):
                return fastconv.transposed_conv(x.to(dtype), weight, bias, s, self.crop_start)
        y = F.conv_transpose2d(
            x, self.weight, self.bias, self.stride, self.padding, self.output_padding
        )
        if self.crop_end:
            y = y[:, :, : y.shape[2] - self.crop_end, : y.shape[3] - self.crop_end]
        return y


class Upsample(nn.Module):
    """Keras `UpSampling2D`: integer-factor nearest or bilinear (half-pixel centres)."""

    def __init__(self, scale: int, mode: str = "bilinear"):
        super().__init__()
        self.scale = scale
        self.mode = mode

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class KerasHardSigmoid(nn.Module):
    """Keras 2 `hard_sigmoid`: clip(0.2 * x + 0.5, 0, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


class ChannelSoftmax(nn.Softmax):
    """Keras `softmax` activation: over the channel axis (dim 1 in NCHW, last in (N, C))."""

    def __init__(self):
        super().__init__(dim=1)


class Exponential(nn.Module):
    """Keras `exponential` activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


# Keras activation name -> module factory. Names follow `tf.keras.activations`.
ACTIVATIONS = {
    "linear": nn.Identity,
    "relu": functools.partial(nn.ReLU, inplace=True),  # always after a conv or BN: saves a copy
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": ChannelSoftmax,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "exponential": Exponential,
    "hard_sigmoid": KerasHardSigmoid,
}


def make_activation(name: str) -> nn.Module:
    """Return the module for a Keras activation name (see `ACTIVATIONS`)."""
    return ACTIVATIONS[name]()


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with Keras' epsilon and momentum."""
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)
