"""The kernel layer: fast CPU implementations of the model's convolutions, behind PyTorch operators.

The model layer (`flexunet.layers`) states TensorFlow's semantics and asks
this package for a fast result in one call:

    fast = kernels.conv3x3(x, weight, bias)        # a Tensor, or None: run the plain convolution
    fast = kernels.conv_transpose(x, weight, bias, stride, crop)

Both call the registered operators of `flexunet.kernels.ops`
(`torch.ops.flexunet.conv3x3`, `torch.ops.flexunet.conv_transpose_same`) when
they pay off, so eager mode, autograd and `torch.compile` all run the same
operator, and return None where the plain PyTorch operation is the better or
the only choice:

* while exporting (`torch.export`, ONNX) or scripting: exported graphs hold
  standard operators that any runtime executes;
* off the CPU, or for dtypes other than float32 and bfloat16;
* in training, except 3x3 float32 convolutions with enough 4x4 output tiles
  for their channel count (`MIN_TRAINING_TILES`; the operator then also
  computes the input gradient; oneDNN's own backward wins on smaller maps and
  for transposed convolutions).

Under `torch.autocast` the operators compute in the autocast dtype with weights
cast once and cached, not at every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from flexunet.kernels import native, ops

# Training: (fewest input/output channels, fewest 4x4 output tiles per batch) from which the fused
# kernel's forward + input gradient beat oneDNN's, although every step transforms the kernel twice.
# Measured per layer, batch 4, 2 threads, operator vs oneDNN: 512->512 @24x24 (144 tiles) 128 vs 173 ms,
# 256->256 @12x12 (36 tiles) 12 vs 15 ms, 128->128 @24x24 8.4 vs 10.1 ms; but 128->128 @12x12
# 3.3 vs 2.8 ms and 64->64 @24x24 3.3 vs 2.7 ms.
MIN_TRAINING_TILES = ((256, 32), (128, 128), (16, 512))


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


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False,
            skip: Optional[torch.Tensor] = None, upsample: Optional[str] = None) -> Optional[torch.Tensor]:
    """`flexunet::conv3x3` of `cat([skip, upsample(x)])`, rectified if `relu`, where it pays off
    (see the module docstring), else None."""
    if not _eligible(x):
        return None
    dtype = compute_dtype(x)
    tracked = _tracked(x, weight) or (skip is not None and _tracked(skip, weight))
    if tracked:
        n, _, h, w = x.shape
        channels, tiles = min(weight.shape[:2]), n * -(-h // 4) * -(-w // 4)
        pays = any(channels >= c and tiles >= t for c, t in MIN_TRAINING_TILES)
        if not (dtype == x.dtype == weight.dtype == torch.float32 and pays):
            return None
    return torch.ops.flexunet.conv3x3(x, weight, bias, dtype, not tracked, relu, skip, upsample or "none")


def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                   crop: int) -> Optional[torch.Tensor]:
    """`flexunet::conv_transpose_same` in inference (see the module docstring), else None."""
    if not _eligible(x) or _tracked(x, weight):
        return None
    return torch.ops.flexunet.conv_transpose_same(x, weight, bias, stride, crop, compute_dtype(x))


__all__ = ["MIN_TRAINING_TILES", "compute_dtype", "conv3x3", "conv_transpose", "native", "ops"]
