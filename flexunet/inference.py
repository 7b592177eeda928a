"""`optimize_for_inference`: a ready-to-run copy of a model for fast CPU inference."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from flexunet.kernels import allocator


class InferenceRunner:
    """Callable returned by `optimize_for_inference`; see there.

    Attributes:
        model: The prepared copy (eval mode, frozen, in `dtype`, channels-last).
        dtype: The compute dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor) -> Any:
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        with torch.inference_mode():
            out = self.model(x.to(self.dtype))
            return _cast(out, out_dtype)

    def __repr__(self) -> str:
        return f"InferenceRunner(dtype={self.dtype}, model={type(self.model).__name__})"


def _cast(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    if isinstance(out, dict):
        return {k: _cast(v, dtype) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_cast(v, dtype) for v in out)
    return out


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor, dtype: torch.dtype = torch.float32,
                           tune_allocator: bool = True) -> InferenceRunner:
    """Prepare a copy of `model` for fast CPU inference; returns a callable with its outputs.

    The copy is frozen (eval mode, no gradients), stored in `dtype` and in
    channels-last memory, and run once on `example_input` so that every
    transformed kernel (Winograd) is computed before the first real call. The
    flexunet CPU kernels (`flexunet.kernels`: native, or their pure-PyTorch fallbacks) run
    in eager mode, where they beat compiled direct convolutions, so no graph
    compiler is involved. Outputs come back in the input's dtype. With `tune_allocator`
    (default), glibc's malloc is told to keep large freed blocks for reuse
    (`flexunet.kernels.allocator`): this process then holds on to its peak
    memory, and large allocations skip the page faults of freshly mapped memory.
    The kernels do the same at their first use unless `FLEXUNET_KEEP_FREED_MEMORY=0`.

    Args:
        model: A flexunet model (`UNet`, `SleapModel`); it is not modified.
        example_input: An (N, C, H, W) float batch like the ones to come.
        dtype: `torch.float32` (outputs within 1e-4 relative of eager) or
            `torch.bfloat16` (about 1% of the output's range).
        tune_allocator: Tune glibc's malloc for repeated large allocations
            (process-wide; see above) now rather than at the kernels' first use.

    Returns:
        An `InferenceRunner`: `runner(x)` returns what `model(x)` returns.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}.")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError("example_input must be a floating-point torch.Tensor of shape (N, C, H, W).")
    if tune_allocator:
        allocator.keep_freed_memory()
    prepared = copy.deepcopy(model).eval()
    prepared.requires_grad_(False)
    prepared.to(dtype=dtype, memory_format=torch.channels_last)
    runner = InferenceRunner(prepared, dtype)
    runner(example_input)  # validates the input and fills the kernel caches
    return runner
