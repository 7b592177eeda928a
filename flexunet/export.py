"""Export to `torch.export` programs and ONNX, with dynamic batch, height and width."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def _maximum_stride(model: nn.Module) -> int:
    stride = getattr(model, "maximum_stride", None)
    if not isinstance(stride, int):
        raise TypeError(f"expected a flexunet model (UNet or SleapModel), got {type(model).__name__}.")
    return stride


def _spatial_is_dynamic(model: nn.Module) -> bool:
    # A class-vectors head that flattens without pooling fixes the feature map size.
    specs = getattr(model, "head_specs", [])
    return all(s.global_pool for s in specs if s.is_vector)


def dynamic_shapes(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[int, Any]]:
    """`torch.export` dynamic shapes for `model`: any batch, H and W multiples of the maximum stride.

    H and W must be at least twice the maximum stride: at one stride the bottom of
    the network is 1x1, which the tracer treats as a special case.
    """
    stride = _maximum_stride(model)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if _spatial_is_dynamic(model):
        dims[2] = stride * torch.export.Dim("height_blocks", min=2, max=65536 // stride)
        dims[3] = stride * torch.export.Dim("width_blocks", min=2, max=65536 // stride)
    return (dims,)


def export_program(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export.export` of `model` with dynamic batch, height and width.

    Args:
        model: A flexunet model; put it in eval mode first for inference.
        example_input: (N, C, H, W) input used for tracing.
    """
    stride = _maximum_stride(model)
    model.check_input(example_input)
    return torch.export.export(model, (_tracing_input(model, example_input, stride),),
                               dynamic_shapes=dynamic_shapes(model, example_input))


def _tracing_input(model: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    # A size of 1 (batch) or of one stride (H, W) would be specialised by the tracer as a
    # constant, so trace with at least 2 of each; the values do not matter.
    n, c, h, w = x.shape
    if _spatial_is_dynamic(model):
        h, w = max(h, 2 * stride), max(w, 2 * stride)
    return torch.zeros(max(n, 2), c, h, w, dtype=x.dtype, device=x.device)


def output_names(model: nn.Module) -> list[str]:
    """ONNX output names: head names for SLEAP models, `output` (the last stack's) for UNets."""
    names = getattr(model, "output_names", None)
    return ["output"] if names is None else list(names)


def export_onnx(model: Any, path: str | os.PathLike, example_input: torch.Tensor,
                opset_version: int | None = None, **keypoint_options: Any) -> str:
    """Write `model` as an ONNX file with dynamic batch, height and width.

    Height and width must be multiples of the model's maximum stride (at least two
    of them) at run time. Needs the `export` extra (`onnx`, `onnxscript`).

    A `Predictor` (`flexunet.sleap.load_predictor`) is exported with its decoding in
    the graph: uint8 frames in, keypoints and scores out, for frames shaped like
    `example_input` (N, H, W, C); see `flexunet.predict.export.export_keypoints_onnx`,
    which takes `keypoint_options` (`max_instances`, `max_peaks`).

    Args:
        model: A flexunet model (`UNet` or `SleapModel`); it is exported in its
            current mode, so call `.eval()` first. Or a `Predictor`.
        path: Output `.onnx` file.
        example_input: (N, C, H, W) float input used for tracing (a predictor:
            uint8 frames (N, H, W, C)).
        opset_version: ONNX opset, or None for the exporter's default.

    Returns:
        The path written.
    """
    from flexunet.predict.predictor import Predictor

    if isinstance(model, Predictor):
        from flexunet.predict.export import export_keypoints_onnx

        return export_keypoints_onnx(model, path, tuple(example_input.shape[-3:]), opset_version=opset_version,
                                     **keypoint_options)
    if keypoint_options:
        raise TypeError(f"export_onnx takes {', '.join(keypoint_options)} only for predictors.")
    path = os.fspath(path)
    program = export_program(model, example_input)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    onnx_program = torch.onnx.export(
        program, (_tracing_input(model, example_input, _maximum_stride(model)),), input_names=["input"], output_names=output_names(model),
        dynamo=True, verbose=False, **kwargs,
    )
    onnx_program.save(path)
    return path
