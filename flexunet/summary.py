"""Introspection from the specs alone: per-layer table, receptive field, FLOPs, memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from flexunet.blocks import LayerInfo
from flexunet.encoder_decoder import EncoderDecoder, PlacedBlock

# Layers whose output shapes SLEAP's tests record; others (Add, Concatenate, BN) are still listed.
_KINDS_WITH_FLOPS = ("Conv2D", "Conv2DTranspose", "Dense")


@dataclass(frozen=True)
class LayerRow:
    """One layer of the summary table.

    Attributes:
        name: Keras layer name.
        kind: Keras layer class ("Conv2D", "MaxPool2D", ...).
        output_shape: (H, W, C) of its output for the summarized input.
        params: Trainable parameters.
        flops: Floating-point operations (2 per multiply-add) per image.
    """

    name: str
    kind: str
    output_shape: tuple[int, int, int]
    params: int
    flops: int


@dataclass
class Summary:
    """What `summarize` measures; `str(summary)` is the printed table."""

    input_shape: tuple[int, int, int]
    rows: list[LayerRow]
    total_params: int
    flops: int
    encoder_stride: int
    output_stride: int
    receptive_field: int
    activation_bytes: int
    param_bytes: int
    output_shapes: list[tuple[int, int, int]]
    extra_sections: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        h, w, c = self.input_shape
        header = ("layer", "kind", "output (H, W, C)", "params")
        body = [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.params:,}") for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]

        def fmt(row):
            return "  ".join(
                cell.rjust(width) if i == 3 else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))
            ).rstrip()

        rule = "-" * len(fmt(header))
        lines = [f"input: {h}x{w}x{c}", rule, fmt(header), rule, *map(fmt, body), rule]
        outs = ", ".join("x".join(map(str, s)) for s in self.output_shapes)
        lines += [
            f"total parameters: {self.total_params:,}",
            f"encoder stride: {self.encoder_stride}    output stride: {self.output_stride}",
            f"receptive field: {self.receptive_field} px",
            f"output (H, W, C): {outs}",
            f"compute: {self.flops / 1e9:.2f} GFLOP per image",
            f"memory: parameters {self.param_bytes / 2**20:.1f} MiB, "
            f"activations {self.activation_bytes / 2**20:.1f} MiB per image (float32, forward)",
        ]
        for section in self.extra_sections:
            lines += ["", section]
        return "\n".join(lines)


def _flops(layer: LayerInfo, h_in: int, w_in: int, h_out: int, w_out: int) -> int:
    if layer.kind == "Conv2D":
        return 2 * layer.kernel**2 * layer.in_channels * layer.out_channels * h_out * w_out
    if layer.kind == "Conv2DTranspose":
        return 2 * layer.kernel**2 * layer.in_channels * layer.out_channels * h_in * w_in
    return 0


def layer_rows(plan: list[PlacedBlock], height: int, width: int) -> list[LayerRow]:
    """Walk the placed blocks' layers, tracking the spatial size of each output."""
    rows = []
    for block in plan:
        h, w = math.ceil(height / block.in_stride), math.ceil(width / block.in_stride)
        for layer in block.layers():
            h_in, w_in = h, w
            if layer.stride > 1:
                h, w = math.ceil(h / layer.stride), math.ceil(w / layer.stride)
            h, w = h * layer.upsample, w * layer.upsample
            rows.append(
                LayerRow(layer.name, layer.kind, (h, w, layer.out_channels), layer.params,
                         _flops(layer, h_in, w_in, h, w))
            )
    return rows


def receptive_field(model: EncoderDecoder) -> int:
    """Theoretical receptive field (pixels) of one output unit, along the deepest path.

    Skip connections never widen it; every layer on the path from the input to
    the last stack's output does: a k x k conv adds (k - 1) steps, a 2x2 pool
    one step before multiplying the step, a transposed conv ceil(k / s) - 1
    steps and a bilinear upsampling one step before dividing it.
    """
    rf, jump = 1.0, 1.0
    for block in model.plan():
        for layer in block.layers():
            if layer.kind == "Conv2D":
                rf += (layer.kernel - 1) * jump
            elif layer.kind == "MaxPool2D":
                rf += (layer.kernel - 1) * jump
                jump *= layer.stride
            elif layer.kind == "Conv2DTranspose":
                rf += (math.ceil(layer.kernel / layer.upsample) - 1) * jump
                jump /= layer.upsample
            elif layer.kind == "UpSampling2D":
                if layer.name.endswith("bilinear"):
                    rf += jump
                jump /= layer.upsample
    return int(round(rf))


def summarize(model: EncoderDecoder, input_shape: Optional[tuple[int, int, int]] = None) -> Summary:
    """Describe `model` for an input of `input_shape` = (H, W, C), without running it.

    Args:
        model: A flexunet `EncoderDecoder` (e.g. `UNet`).
        input_shape: (height, width, channels); defaults to 192x192 (rounded up to
            the maximum stride) with the model's input channels.
    """
    stride = model.maximum_stride
    if input_shape is None:
        side = max(192, stride) // stride * stride
        input_shape = (side, side, model.in_channels)
    h, w, c = input_shape
    if c != model.in_channels:
        raise ValueError(f"input_shape has {c} channels but the model takes {model.in_channels}.")
    if h < 1 or w < 1 or h % stride or w % stride:
        raise ValueError(f"input_shape height and width must be positive multiples of the maximum stride {stride}, got {h}x{w}.")
    plan = model.plan()
    rows = layer_rows(plan, h, w)
    outputs = [
        (h // model.output_stride, w // model.output_stride, p.out_channels)
        for p in plan
        if p is _last_of_stack(plan, p)
    ]
    total = sum(p.num_params for p in plan)
    act = sum(4 * r.output_shape[0] * r.output_shape[1] * r.output_shape[2] for r in rows)
    return Summary(
        input_shape=(h, w, c),
        rows=rows,
        total_params=total,
        flops=sum(r.flops for r in rows),
        encoder_stride=model.encoder_features_stride,
        output_stride=model.output_stride,
        receptive_field=receptive_field(model),
        activation_bytes=act,
        param_bytes=4 * total,
        output_shapes=outputs,
    )


def _last_of_stack(plan: list[PlacedBlock], block: PlacedBlock) -> Optional[PlacedBlock]:
    same = [p for p in plan if p.stack == block.stack and p.section != "stem"]
    return same[-1] if same else None
