"""The generic encoder-decoder: stem, encoder and decoder stacks of block specs.

A subclass describes its architecture by three lists of specs (`stem_stack`,
`encoder_stack`, `decoder_stack`); this base does the stride and channel
bookkeeping once, on the specs (`plan`), builds one module per block and runs
them with SLEAP's skip-connection rule:

* The skip sources of a stack are the stem's output (if there is a stem) and,
  for every stride the encoder reaches, its first block output at that stride,
  except the last stride reached.
* A decoder block that upsamples to stride `s` takes the first source at `s`.
* Stacks repeat the encoder and decoder (not the stem); each stack starts from
  the previous stack's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexunet.nn.blocks import DecoderBlock, EncoderBlock, LayerInfo
from flexunet.nn.validation import check_int, nearest_multiples


def crop_to_input(t: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Crop a map at `stride` to the part covering an input of (H, W) = `size`: ceil(H / stride) rows."""
    return t[:, :, : -(-size[0] // stride), : -(-size[1] // stride)]


# A guard against configs that would exhaust memory (SLEAP's default UNet has 34.5M).
MAX_PARAMETERS = 2_000_000_000


class IntermediateFeature(NamedTuple):
    """A decoder block's input and its stride relative to the network input."""

    tensor: torch.Tensor
    stride: int


class BackboneRun(NamedTuple):
    """What `EncoderDecoder.run` returns.

    Attributes:
        outputs: One output per stack.
        features: Per stack, the input of every decoder block (empty unless asked for).
        input_size: The (H, W) the input had before `pad_to_stride` padded it, else None.
        output_stride: Stride of the outputs.
    """

    outputs: list[torch.Tensor]
    features: list[list[IntermediateFeature]]
    input_size: Optional[tuple[int, int]]
    output_stride: int

    def cropped(self) -> "BackboneRun":
        """Outputs and features cropped to the part that covers the unpadded input."""
        if self.input_size is None:
            return self
        size = self.input_size
        return BackboneRun([crop_to_input(o, self.output_stride, size) for o in self.outputs],
                           [[IntermediateFeature(crop_to_input(f.tensor, f.stride, size), f.stride) for f in stack]
                            for stack in self.features], None, self.output_stride)


@dataclass(frozen=True)
class PlacedBlock:
    """A block spec placed in the network: its name, channels, strides and skip wiring.

    Attributes:
        spec: The block spec.
        name: Keras layer prefix, also the key of its module in `blocks`.
        section: "stem", "encoder" or "decoder".
        stack: Stack index (None for the stem).
        in_channels / out_channels: Channels entering and leaving the block.
        in_stride / out_stride: Strides of its input and output.
        skip_channels: Decoder blocks: channels of the skip source, or None.
        skip_source: Decoder blocks: index into the stack's skip sources, or None.
        saves_skip: Stem/encoder blocks: the output is kept as a skip source.
    """

    spec: Union[EncoderBlock, DecoderBlock]
    name: str
    section: str
    stack: Optional[int]
    in_channels: int
    out_channels: int
    in_stride: int
    out_stride: int
    skip_channels: Optional[int] = None
    skip_source: Optional[int] = None
    saves_skip: bool = False

    def layers(self) -> list[LayerInfo]:
        """Keras-named layers of the block (see `LayerInfo`)."""
        return self.spec.layers(self.in_channels, self.name, self.skip_channels)

    @property
    def num_params(self) -> int:
        """Trainable parameters, from the spec alone."""
        return self.spec.num_params(self.in_channels, self.skip_channels)

    def make_block(self) -> nn.Module:
        """The block's module."""
        return self.spec.make_block(self.in_channels, self.name, self.skip_channels)


def _product(values) -> int:
    return int(math.prod(values))


class EncoderDecoder(nn.Module):
    """Base class of encoder-decoder networks built from block specs.

    Subclasses call `super().__init__(stacks, in_channels)`, set their own
    hyperparameters, define the `stem_stack` / `encoder_stack` / `decoder_stack`
    properties and finish their `__init__` with `self.build()`.

    Args:
        stacks: Number of times the encoder-decoder is repeated.
        in_channels: Channels of the input images.
    """

    def __init__(self, stacks: int = 1, in_channels: int = 1):
        super().__init__()
        self.stacks = check_int("stacks", stacks, minimum=1, maximum=64)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.checkpointing: Optional[str] = None
        #: Accept any input size: pad at the bottom/right with zeros up to a multiple of the
        #: maximum stride (as SLEAP's preprocessing does) and crop every output back.
        self.pad_to_stride = False

    def set_checkpointing(self, mode: Optional[str]) -> "EncoderDecoder":
        """Trade compute for memory in training: recompute activations in the backward pass.

        Args:
            mode: "block" keeps only each block's input, "stack" only each stack's
                input; None (the default) keeps every activation. "stack" keeps the
                fewest activations between forward and backward, but recomputes a
                whole stack at once in the backward pass, so it lowers the peak
                memory only when there are several stacks; "block" lowers it always.

        Returns:
            The model, for chaining.
        """
        if mode not in (None, "block", "stack"):
            raise ValueError(f"checkpointing mode must be None, 'block' or 'stack', got {mode!r}.")
        self.checkpointing = mode
        return self

    # ------------------------------------------------------------------ specs
    @property
    def stem_stack(self) -> Optional[Sequence[EncoderBlock]]:
        """Specs of the stem (run once, before the first stack), or None."""
        return None

    @property
    def encoder_stack(self) -> Sequence[EncoderBlock]:
        """Specs of the encoder blocks of one stack."""
        raise NotImplementedError("EncoderDecoder subclasses must define encoder_stack.")

    @property
    def decoder_stack(self) -> Sequence[DecoderBlock]:
        """Specs of the decoder blocks of one stack."""
        raise NotImplementedError("EncoderDecoder subclasses must define decoder_stack.")

    # ---------------------------------------------------------------- strides
    @property
    def stem_features_stride(self) -> int:
        """Stride of the stem's output (1 without a stem)."""
        return _product(b.stride for b in self.stem_stack or [])

    @property
    def encoder_features_stride(self) -> int:
        """Stride of the encoder's output, stem included."""
        return self.stem_features_stride * _product(b.stride for b in self.encoder_stack)

    @property
    def decoder_features_stride(self) -> int:
        """Stride of the decoder's output, i.e. of the network output."""
        return self.encoder_features_stride // _product(b.upsampling_stride for b in self.decoder_stack)

    @property
    def maximum_stride(self) -> int:
        """Input height and width must be multiples of this."""
        return self.encoder_features_stride

    @property
    def output_stride(self) -> int:
        """Stride of the network output relative to the input."""
        return self.decoder_features_stride

    # ------------------------------------------------------------------- plan
    def plan(self) -> list[PlacedBlock]:
        """Place every block: names, channels, strides and skip wiring, from the specs only."""
        stem = list(self.stem_stack or [])
        encoder, decoder = list(self.encoder_stack), list(self.decoder_stack)
        for where, specs, kind in (
            ("stem_stack", stem, EncoderBlock),
            ("encoder_stack", encoder, EncoderBlock),
            ("decoder_stack", decoder, DecoderBlock),
        ):
            for spec in specs:
                if not isinstance(spec, kind):
                    raise TypeError(f"{where} must hold {kind.__name__} specs, got {spec!r}.")
        if self.stacks > 1 and self.stem_features_stride != self.decoder_features_stride:
            raise ValueError(
                f"stacks={self.stacks} needs the decoder to return to the stem's stride "
                f"({self.stem_features_stride}), but it ends at stride {self.decoder_features_stride}; "
                "use stacks=1 or as many up blocks as down blocks (a stem can provide output stride > 1)."
            )

        placed: list[PlacedBlock] = []
        channels, stride = self.in_channels, 1
        for i, spec in enumerate(stem):
            out = spec.out_channels(channels)
            placed.append(PlacedBlock(spec, spec.block_name(f"stem{i}"), "stem", None,
                                      channels, out, stride, stride * spec.stride))
            channels, stride = out, stride * spec.stride
        stem_sources = []
        if stem:
            placed[-1] = replace(placed[-1], saves_skip=True)
            stem_sources = [(stride, channels)]

        for s in range(self.stacks):
            # Encoder: remember the first output at each new stride as a skip source.
            sources = list(stem_sources)
            enc_strides: list[int] = []
            candidates: list[int] = []  # indices into `placed` of encoder skip sources
            stride = self.stem_features_stride
            for i, spec in enumerate(encoder):
                out = spec.out_channels(channels)
                new_stride = stride * spec.stride
                placed.append(PlacedBlock(spec, spec.block_name(f"stack{s}_enc{i}"), "encoder", s,
                                          channels, out, stride, new_stride))
                if new_stride not in enc_strides:
                    enc_strides.append(new_stride)
                    candidates.append(len(placed) - 1)
                channels, stride = out, new_stride
            for idx in candidates[:-1]:
                placed[idx] = replace(placed[idx], saves_skip=True)
                sources.append((placed[idx].out_stride, placed[idx].out_channels))

            # Decoder: each block takes the first source at the stride it upsamples to.
            for i, spec in enumerate(decoder):
                next_stride = stride // spec.upsampling_stride
                src = next((k for k, (st, _) in enumerate(sources) if st == next_stride), None)
                skip_c = sources[src][1] if src is not None else None
                out = spec.out_channels(channels, skip_c)
                placed.append(PlacedBlock(spec, spec.block_name(f"stack{s}_dec{i}", stride), "decoder", s,
                                          channels, out, stride, next_stride, skip_c, src))
                channels, stride = out, next_stride
        names = [p.name for p in placed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"block names must be unique, but {duplicates} appear more than once.")
        return placed

    def build(self) -> None:
        """Build one module per placed block, keyed by its Keras prefix in `self.blocks`."""
        self._plan = self.plan()
        total = sum(p.num_params for p in self._plan)
        if total > MAX_PARAMETERS:
            raise ValueError(
                f"this configuration would have {total:,} parameters, more than the {MAX_PARAMETERS:,} "
                "flexunet builds; check filters and filters_rate."
            )
        self.blocks = nn.ModuleDict({p.name: p.make_block() for p in self._plan})
        self.to(memory_format=torch.channels_last)
        self._input_multiple = self.maximum_stride  # cached: forward must not rebuild the specs
        self._output_stride = self.output_stride
        self.out_channels = self._plan[-1].out_channels if self._plan else self.in_channels
        # Execution order: the stem once, then each stack's blocks (encoder, then decoder).
        self._stem = [p for p in self._plan if p.section == "stem"]
        self._stack_blocks = [[p for p in self._plan if p.stack == s] for s in range(self.stacks)]

    def num_params_from_specs(self) -> int:
        """Total trainable parameters computed from the specs, without building modules."""
        return sum(p.num_params for p in self.plan())

    # ---------------------------------------------------------------- forward
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a `ValueError`/`TypeError` naming what is wrong with an input batch."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor of shape (N, {self.in_channels}, H, W), got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(
                f"input must have 4 dimensions (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have {self.in_channels} channels (dim 1 of N, C, H, W), got shape {tuple(x.shape)}; "
                "images in NHWC layout need x.permute(0, 3, 1, 2)."
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert with x.float().")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"input must not be empty, got shape {tuple(x.shape)}.")
        if self.pad_to_stride:
            return
        stride = self._input_multiple
        for axis, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % stride:
                lo, hi = nearest_multiples(int(size), stride)
                raise ValueError(
                    f"input {axis} must be a multiple of the maximum stride {stride}, got {int(size)}; "
                    f"nearest valid sizes: {lo} or {hi} (or set model.pad_to_stride = True)."
                )

    def run(self, x: torch.Tensor, keep_features: bool = False) -> "BackboneRun":
        """Run the network for callers that need more than `forward` (heads, export).

        With `pad_to_stride` the input is zero-padded at the bottom/right and the
        outputs cover the padded image; `BackboneRun.input_size` then holds the
        size to crop back to (`BackboneRun.cropped`).

        Args:
            x: (N, in_channels, H, W) images.
            keep_features: Also return every decoder block's input.
        """
        self.check_input(x)
        x, size = self._pad_to_stride(x)
        weight_dtype = next((p.dtype for p in self.parameters()), None)
        if weight_dtype is not None and x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)  # e.g. float64 images into a float32 model
        x = x.contiguous(memory_format=torch.channels_last)  # the layout every kernel runs on without copies
        mode = self.checkpointing if self.training and torch.is_grad_enabled() else None
        call = self._checkpointed if mode == "block" else self._call
        for block in self._stem:
            x = call(block, x)
        stem_sources = [x] if self._stem else []
        outputs, features = [], []
        for blocks in self._stack_blocks:
            if mode == "stack":
                x, stack_features = checkpoint(self._run_stack, blocks, x, stem_sources, keep_features, self._call,
                                               use_reentrant=False)
            else:
                x, stack_features = self._run_stack(blocks, x, stem_sources, keep_features, call)
            outputs.append(x)
            features.append(stack_features)
        return BackboneRun(outputs, features, size, self._output_stride)

    def _run_stack(self, blocks: list[PlacedBlock], x: torch.Tensor, stem_sources: list, keep_features: bool, call):
        """One stack: encoder blocks keep their skip sources, decoder blocks take theirs."""
        sources = list(stem_sources)
        features = []
        for block in blocks:
            if block.section == "encoder":
                x = call(block, x)
                if block.saves_skip:
                    sources.append(x)
            else:
                if keep_features:
                    features.append(IntermediateFeature(x, block.in_stride))
                x = call(block, x, None if block.skip_source is None else sources[block.skip_source])
        return x, features

    def _pad_to_stride(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
        """With `pad_to_stride`: zeros at the bottom/right up to the stride (as SLEAP pads), and the original size."""
        if not self.pad_to_stride:
            return x, None
        stride, (h, w) = self._input_multiple, x.shape[2:]
        pad_h, pad_w = -h % stride, -w % stride
        if not (pad_h or pad_w):
            return x, None
        return F.pad(x, (0, pad_w, 0, pad_h)), (h, w)  # (N, C, H + pad_h, W + pad_w)

    def _call(self, block: PlacedBlock, *args):
        return self.blocks[block.name](*args)

    def _checkpointed(self, block: PlacedBlock, *args):
        return checkpoint(self.blocks[block.name], *args, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on `x` of shape (N, in_channels, H, W).

        Returns:
            The output (N, out_channels, H / output_stride, W / output_stride): the
            last stack's, whatever `stacks` is (`forward_stacks` gives every stack's).
        """
        return self.run(x).cropped().outputs[-1]

    def forward_stacks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stack's output, first to last (for intermediate supervision); one tensor per stack."""
        return list(self.run(x).cropped().outputs)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list["IntermediateFeature"]]]:
        """Run the network and also return every decoder block's input.

        Returns:
            `(outputs, features)`: one output per stack (as `forward_stacks`) and, per
            stack, its list of `IntermediateFeature` (one per decoder block, in order),
            as SLEAP's `make_backbone` gives them.
        """
        outputs, features, _, _ = self.run(x, keep_features=True).cropped()
        return list(outputs), [list(f) for f in features]
