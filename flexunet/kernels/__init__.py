"""The kernel layer: fast CPU implementations of the model's convolutions, behind PyTorch operators.

The model layer (`flexunet.nn.layers`) states TensorFlow's semantics and asks
this package for a fast result in one call:

    fast = kernels.conv3x3(x, weight, bias, relu, skip, upsample)  # a Tensor, or None: the plain path
    fast = kernels.conv_transpose(x, weight, bias, stride, crop)
    fast = kernels.max_pool2x2(x)

They call the registered operators of `flexunet.kernels.ops`
(`torch.ops.flexunet.conv3x3`, `torch.ops.flexunet.conv_transpose_same`, ...),
so eager mode, autograd and `torch.compile` all run the same operator. Inside,
each convolution (and pooling, and the upsampling's adjoint) picks its
implementation, native kernels or PyTorch's own (oneDNN, with or without its
fused ReLU; Winograd as batched products; ATen), by measurement: every layer shape, dtype
and mode (inference, training) is timed once on this machine and the fastest
remembered (`flexunet.kernels.choice`; `FLEXUNET_NATIVE=1` forces the native
kernels, `=0` PyTorch's). These functions return None where the plain PyTorch
operation is the better or the only choice:

* while exporting (`torch.export`, ONNX) or scripting: exported graphs hold
  standard operators that any runtime executes;
* off the CPU, or for dtypes other than float32 and bfloat16;
* where the operator would only run what the layer runs itself: with PyTorch's
  paths forced (`FLEXUNET_NATIVE=0`, or no native kernels), a convolution of fewer
  than `ops.TORCH_WINOGRAD_MIN_CHANNELS` channels; a 2x2 pooling whose measured (or
  forced) choice is PyTorch's;
* in training, except 3x3 float32 convolutions of at least
  `TRAINING_MIN_CHANNELS` channels and `TRAINING_MIN_TILES` 4x4 output tiles
  (the operator then also computes both gradients, each chosen by measurement;
  oneDNN's own backward wins for an image's few input channels, for tiny maps
  and for transposed convolutions).

Under `torch.autocast` the operators compute in the autocast dtype with weights
cast once and cached, not at every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from flexunet.kernels import choice, native, ops

# Training runs 3x3 float32 convolutions with at least this many input and output channels on the
# operator (forward, input gradient and weight gradient on the fused kernels). Measured on whole Adam
# steps of SLEAP's profiles, 2 threads: from 16 channels on, every layer on the operator beats any
# per-layer choice (baseline_medium_rf.topdown 0.67 s vs 0.77 s with only wide or large layers on it);
# an image's 1-3 input channels train faster on oneDNN (0.69 s). Below 64 output tiles per batch the
# per-step kernel transforms cost more than Winograd saves (baseline_medium_rf.bottomup, whose 512-
# channel layers run at 16x16: 0.559 s from 64 tiles on, 0.573 s with every layer on the operator,
# 0.610 s from 256).
TRAINING_MIN_CHANNELS = 16
TRAINING_MIN_TILES = 64


def weight_cache_bytes() -> int:
    """Bytes held by the inference weight cache: every 3x3 weight in Winograd space (36 / 9 = 4x its
    size), packed transposed-convolution weights (1x) and autocast casts, for the models run so far."""
    return ops.CACHE.nbytes()


def clear_weight_cache() -> None:
    """Free the inference weight cache; the next call of each layer transforms its weight again."""
    ops.CACHE.clear()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of `x` computes in: the CPU autocast dtype under autocast, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _eligible(x: torch.Tensor) -> bool:
    """A CPU float32/bfloat16 call outside export and scripting."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and compute_dtype(x) in (torch.float32, torch.bfloat16)
            and not (torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()
                     or torch.onnx.is_in_onnx_export()))


def _tracked(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _layer_does_it(weight, dtype) -> bool:
    """Whether inference of this convolution would run oneDNN's convolution just as the layer does itself:
    where PyTorch's paths are forced (or the only ones) and the layer is not wide enough for Winograd.
    Measured choices always run in the operator, whose oneDNN candidates keep channels-last memory."""
    mode, wide = native.mode(), min(weight.shape[:2]) >= ops.TORCH_WINOGRAD_MIN_CHANNELS
    return not wide and (mode == "torch" or (mode == "native" and not native.supports_dtype(dtype)))


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False,
            skip: Optional[torch.Tensor] = None, upsample: Optional[str] = None) -> Optional[torch.Tensor]:
    """`flexunet::conv3x3` of `cat([skip, upsample(x)])`, rectified if `relu`, where it pays off
    (see the module docstring), else None."""
    if not _eligible(x):
        return None
    dtype = compute_dtype(x)
    tracked = _tracked(x, weight) or (skip is not None and _tracked(skip, weight))
    if not tracked and _layer_does_it(weight, dtype):
        return None  # the operator would run oneDNN's convolution as the layer does: spare its dispatch
    if tracked:
        n, _, h, w = x.shape
        factor = 1 if upsample is None else 2
        tiles = n * -(-h * factor // 4) * -(-w * factor // 4)
        # bfloat16 autocast training joins where bfloat16 is emulated: float32 kernels are candidates there.
        dtypes = dtype == x.dtype == weight.dtype == torch.float32 or (
            dtype == torch.bfloat16 and weight.dtype == torch.float32 and native.mode() == "measure"
            and not native.has_bfloat16())
        if not (dtypes and tiles >= TRAINING_MIN_TILES and min(weight.shape[:2]) >= TRAINING_MIN_CHANNELS):
            return None
    return torch.ops.flexunet.conv3x3(x, weight, bias, dtype, not tracked, relu, skip, upsample or "none")


def max_pool2x2(x: torch.Tensor) -> Optional[torch.Tensor]:
    """`flexunet::max_pool2x2` in inference (see the module docstring), else None."""
    if not _eligible(x) or (torch.is_grad_enabled() and x.requires_grad) or not native.supports_dtype(x.dtype):
        return None
    mode = native.mode()
    if mode == "torch" or (mode == "measure" and not torch.compiler.is_compiling()
                           and choice.CHOICES.get(choice.pool_key(x)) == "torch"):
        return None  # the layer's own pooling: spare the operator's dispatch
    return torch.ops.flexunet.max_pool2x2(x)


def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                   crop: int) -> Optional[torch.Tensor]:
    """`flexunet::conv_transpose_same` in inference (see the module docstring), else None."""
    if not _eligible(x) or _tracked(x, weight):
        return None
    return torch.ops.flexunet.conv_transpose_same(x, weight, bias, stride, crop, compute_dtype(x))


__all__ = ["TRAINING_MIN_CHANNELS", "TRAINING_MIN_TILES", "choice", "clear_weight_cache", "compute_dtype", "conv3x3",
           "conv_transpose", "max_pool2x2", "native", "ops", "weight_cache_bytes"]
