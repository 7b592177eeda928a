"""Primitive layers with TensorFlow/Keras numerics.

Keras pads 'same' convolutions, pools and transposed convolutions with the
extra pixel at the bottom/right, where PyTorch's usual `padding=` choices put
it at the top/left or on both sides. These layers reproduce Keras exactly, so
weights trained in SLEAP give the same numbers here.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flexunet import kernels
from flexunet.nn.validation import check_choice

# Keras' BatchNormalization defaults (momentum 0.99 is 1 - 0.01 in PyTorch's convention).
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """Stride-1 convolution with Keras 'same' padding for any kernel size, and its activation.

    Odd kernels pad symmetrically; even kernels put the extra row/column at the
    bottom/right, as TensorFlow does. `activation` is applied to the output, as
    Keras' `Conv2D(activation=...)` does (a ReLU is fused into the fast kernels).

    `forward(x, skip, upsample)` convolves `cat([skip, upsample(x)])`: `x`
    upsampled by 2 (Keras `UpSampling2D`, "bilinear" or "nearest") and joined
    after `skip`, the input of the first convolution of SLEAP's decoder blocks,
    which the fast kernels form while reading instead of storing it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear"):
        odd = kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2 if odd else 0, bias=bias)
        before = (kernel_size - 1) // 2
        self.asymmetric_pad = None if odd else (before, kernel_size - 1 - before) * 2
        check_choice("activation", activation, ACTIVATIONS)
        self.activation = activation
        self.act = None if activation in ("linear", "relu") else make_activation(activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.activation == "linear" else f", activation={self.activation!r}")

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                upsample: Optional[str] = None) -> torch.Tensor:
        relu = self.activation == "relu"
        if self.kernel_size == (3, 3):
            fast = kernels.conv3x3(x, self.weight, self.bias, relu, skip, upsample)  # None: the plain path below
            if fast is not None:  # ReLU is fused; any other activation follows
                return fast if relu or self.act is None else self.act(fast)
        if upsample is not None:
            x = upsampled(x, 2, upsample)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)  # (N, C_skip + C, H, W), as SLEAP concatenates
        if self.asymmetric_pad is not None:
            x = F.pad(x, self.asymmetric_pad)  # (N, C, H + k - 1, W + k - 1), the extra at the bottom/right
        y = super().forward(x)
        if relu:
            return torch.relu_(y)
        return y if self.act is None else self.act(y)


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
        if k == s == 2:
            fast = kernels.max_pool2x2(x)  # None: the plain pooling below
            if fast is not None:
                return fast
        if k == s == 2 and not (torch.is_grad_enabled() and x.requires_grad):
            # The maximum of the four pixels of each window (-inf beyond an odd edge, as TF clips):
            # exact, and 1.4-8x faster than max_pool2d on CPU (AMD EPYC Zen 3, 1-16 channels).
            h, w = x.shape[-2:]
            if h % 2 or w % 2:
                x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
            return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., ::2, 1::2]),
                                 torch.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2]))
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
            padding, output_padding, self.crop_end = total // 2, max(stride - kernel_size, 0), total % 2
        else:
            padding, output_padding, self.crop_end = (kernel_size - 1) // 2, stride - 1, 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, bias=bias)
        self.alignment = alignment
        self.crop_start = padding  # rows of the full output before the kept ones

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.alignment == "keras" else f", alignment={self.alignment!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = kernels.conv_transpose(x, self.weight, self.bias, self.stride[0], self.crop_start)
        if fast is not None:
            return fast
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
        return upsampled(x, self.scale, self.mode)


def upsampled(x: torch.Tensor, scale: int, mode: str) -> torch.Tensor:
    """Keras `UpSampling2D` of `x` by `scale`: "nearest", or "bilinear" with half-pixel centres."""
    if mode == "bilinear":
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.interpolate(x, scale_factor=scale, mode="nearest")


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
