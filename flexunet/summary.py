"""Introspection from the specs alone: per-layer table, receptive field, FLOPs, memory."""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from flexunet.nn.blocks import LayerInfo
from flexunet.nn.encoder_decoder import EncoderDecoder, PlacedBlock

# Layers whose output shapes SLEAP's tests record; others (Add, Concatenate, BN) are still listed.


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


def _input_interval(layer: LayerInfo, lo: int, hi: int) -> tuple[int, int]:
    """Input indices (1-D, unbounded canvas) that feed outputs lo..hi of `layer`."""
    k, s, u = layer.kernel, layer.stride, layer.upsample
    if layer.kind == "Conv2D":
        before = (k - 1) // 2  # 'same': the odd pixel of padding goes after
        return lo - before, hi - before + k - 1
    if layer.kind == "MaxPool2D":
        return lo * s, hi * s + k - 1  # inputs are multiples of the stride: no padding before
    if layer.kind == "Conv2DTranspose":
        crop = max(k - u, 0) // 2
        return -((k - 1 - lo - crop) // u), (hi + crop) // u
    if layer.kind == "UpSampling2D":
        if layer.name.endswith("bilinear"):
            first = Fraction(2 * lo + 1, 2 * u) - Fraction(1, 2)
            last = Fraction(2 * hi + 1, 2 * u) - Fraction(1, 2)
            return math.floor(first), math.ceil(last)
        return lo // u, hi // u
    return lo, hi


def receptive_field(model: EncoderDecoder) -> int:
    """Receptive field (pixels) of one output unit, through every path of the network.

    Walks the blocks backwards from an output pixel, mapping the interval of
    pixels it depends on through each layer (and into the skip sources), on an
    unbounded canvas; the widest interval over output positions is returned.
    """
    plan = model.plan()
    last_stack = max((p.stack for p in plan if p.stack is not None), default=None)
    widest = 1
    for offset in range(2 * model.maximum_stride):
        needed: dict[int, tuple[int, int]] = {}  # block index -> output interval it must provide
        current = (offset, offset)
        start = max(i for i, p in enumerate(plan) if p.stack == last_stack and p.section != "stem")
        needed[start] = current
        sources = [i for i, p in enumerate(plan) if p.saves_skip]
        for i in range(start, -1, -1):
            block = plan[i]
            if i not in needed:
                continue
            lo, hi = needed.pop(i)
            layers = block.layers()
            for layer in reversed(layers):
                if layer.kind in ("Concatenate", "Add") and block.skip_source is not None:
                    stack_sources = [j for j in sources if plan[j].section == "stem"
                                     or plan[j].stack == block.stack]
                    j = stack_sources[block.skip_source]
                    old = needed.get(j, (lo, hi))
                    needed[j] = (min(old[0], lo), max(old[1], hi))
                lo, hi = _input_interval(layer, lo, hi)
            if i > 0:
                old = needed.get(i - 1, (lo, hi))
                needed[i - 1] = (min(old[0], lo), max(old[1], hi))
            else:
                widest = max(widest, hi - lo + 1)
    return widest


def summarize(model, shape: Optional[tuple[int, ...]] = None, *,
              input_shape: Optional[tuple[int, int, int]] = None) -> Summary:
    """Describe `model` for an input of `shape`, without running it.

    Args:
        model: A flexunet `EncoderDecoder` (e.g. `UNet`) or a `SleapModel`, whose
            heads are listed after the backbone.
        shape: The input's (N, C, H, W) or (C, H, W), as everywhere in flexunet;
            defaults to 192x192 (rounded up to the maximum stride) with the model's
            input channels. The batch size does not change the summary.
        input_shape: SLEAP's (height, width, channels) instead of `shape`.
    """
    if shape is not None and input_shape is not None:
        raise TypeError("give shape (N, C, H, W) or input_shape (H, W, C), not both.")
    if shape is not None:
        if len(shape) not in (3, 4):
            raise ValueError(f"shape must be (N, C, H, W) or (C, H, W), got {tuple(shape)!r}.")
        c, h, w = shape[-3:]
        input_shape = (h, w, c)
    elif input_shape is not None and len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)!r}.")
    heads = getattr(model, "head_specs", None)
    if heads is not None:
        summary = summarize(model.backbone, input_shape=input_shape)
        _add_heads(summary, model)
        return summary
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


def _add_heads(summary: Summary, model) -> None:
    """Append the heads of a `SleapModel` to a backbone summary."""
    h, w, _ = summary.input_shape
    table = [("head", "kind", "stride", "output", "params")]
    for spec in model.head_specs:
        module = model.heads[spec.name]
        params = sum(p.numel() for p in module.parameters())
        pixels = 1 if spec.is_vector else (h // spec.output_stride) * (w // spec.output_stride)
        weights = sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        shape = str(spec.channels) if spec.is_vector else f"{h // spec.output_stride}x{w // spec.output_stride}x{spec.channels}"
        table.append((spec.name, spec.kind, str(spec.output_stride), shape, f"{params:,}"))
        summary.total_params += params
        summary.param_bytes += 4 * params
        summary.flops += 2 * weights * pixels
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in table]
    summary.extra_sections.append(
        "heads:\n" + "\n".join(lines) + f"\ntotal parameters with heads: {summary.total_params:,}"
    )
