"""SLEAP's generalized UNet, layer for layer."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Optional

from flexunet.nn.blocks import PoolingBlock, SimpleConvBlock, SimpleUpsamplingBlock
from flexunet.nn.config import UNetConfig
from flexunet.nn.encoder_decoder import EncoderDecoder
from flexunet.nn.layers import ALIGNMENTS
from flexunet.nn.validation import check_bool, check_choice, check_int, check_keys, check_positive_number


# Upper bounds that keep a typo (down_blocks=400) from building for hours.
MAX_KERNEL = 63
MAX_CONVS = 64


class UNet(EncoderDecoder):
    """UNet encoder-decoder (Ronneberger et al., 2015) as SLEAP defines it.

    Encoder blocks pool *before* their convolutions, so skip connections come
    from the convolutions at every stride from the first one on; a closing
    `PoolingBlock` ends the encoder. The default (64 filters, 4 down and 4 up
    blocks, transposed convolutions) has 34,512,128 parameters.

    Args:
        filters: Channels of the first encoder block.
        filters_rate: Channel multiplier per block; block `k` has
            `int(filters * filters_rate ** k)` channels.
        kernel_size: Kernel size of encoder, middle and decoder convolutions.
        stem_kernel_size: Kernel size of stem convolutions.
        convs_per_block: Convolutions per block.
        stem_blocks: Extra initial downsampling blocks, run once before the stacks.
        down_blocks: Pooling steps in the encoder.
        middle_block: Add an expand/contract block at the bottom of the encoder.
        up_blocks: Upsampling steps in the decoder (<= down_blocks + stem_blocks);
            output stride is `2 ** (stem_blocks + down_blocks - up_blocks)`.
        up_interpolate: Bilinear upsampling instead of transposed convolutions.
        block_contraction: Halve (divide by `filters_rate`) the channels at the end
            of the middle and decoder blocks, as CARE does.
        stacks: Number of stacked encoder-decoders (needs output stride == stem stride).
        in_channels: Channels of the input images.
        alignment: The numerics of the transposed convolutions: "keras" (SLEAP <= 1.4,
            TensorFlow's 'same' crop, kernel `kernel_size`) or "sleap_nn" (SLEAP >= 1.5,
            sleap-nn's `ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1)`:
            kernel 3 whatever `kernel_size`, the odd pixel cropped at the top/left).
            Interpolating decoders are the same under both. Run a trained model with
            the alignment it was trained with.

    Example:
        >>> model = UNet(filters=16, down_blocks=3, up_blocks=3)
        >>> model(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 16, 64, 64])
    """

    def __init__(
        self,
        filters: int = 64,
        filters_rate: float = 2,
        kernel_size: int = 3,
        stem_kernel_size: int = 3,
        convs_per_block: int = 2,
        stem_blocks: int = 0,
        down_blocks: int = 4,
        middle_block: bool = True,
        up_blocks: int = 4,
        up_interpolate: bool = False,
        block_contraction: bool = False,
        stacks: int = 1,
        in_channels: int = 1,
        alignment: str = "keras",
    ):
        super().__init__(stacks=stacks, in_channels=in_channels)
        self.alignment = check_choice("alignment", alignment, ALIGNMENTS)
        self.filters = check_int("filters", filters, minimum=1)
        self.filters_rate = check_positive_number("filters_rate", filters_rate)
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=1, maximum=MAX_KERNEL)
        self.stem_kernel_size = check_int("stem_kernel_size", stem_kernel_size, minimum=1, maximum=MAX_KERNEL)
        self.convs_per_block = check_int("convs_per_block", convs_per_block, minimum=1, maximum=MAX_CONVS)
        # Strides above 2 ** 16 would need inputs wider than any image.
        self.stem_blocks = check_int("stem_blocks", stem_blocks, minimum=0, maximum=16)
        self.down_blocks = check_int("down_blocks", down_blocks, minimum=0, maximum=16)
        self.middle_block = check_bool("middle_block", middle_block)
        self.up_blocks = check_int("up_blocks", up_blocks, minimum=0, maximum=32)
        self.up_interpolate = check_bool("up_interpolate", up_interpolate)
        self.block_contraction = check_bool("block_contraction", block_contraction)
        depth = self.down_blocks + self.stem_blocks
        if self.up_blocks > depth:
            raise ValueError(
                f"up_blocks must be <= down_blocks + stem_blocks ({depth}), got {self.up_blocks}; "
                "the decoder cannot upsample past the input resolution."
            )
        if stacks > 1 and self.up_blocks != max(self.down_blocks, 1):
            raise ValueError(
                f"stacks={stacks} needs the decoder to return to the stem's stride, i.e. "
                f"up_blocks == down_blocks ({self.down_blocks}) with down_blocks >= 1, got "
                f"up_blocks={self.up_blocks}."
            )
        for name, k in self._filter_exponents():
            if self._filters(k) < 1:
                raise ValueError(
                    f"filters={filters} with filters_rate={filters_rate} gives {name} "
                    f"int({filters} * {filters_rate} ** {k}) = 0 channels; increase filters or filters_rate."
                )
        self.build()

    # -------------------------------------------------------------- channels
    def _filters(self, exponent: int) -> int:
        return int(self.filters * self.filters_rate**exponent)

    def _filter_exponents(self):
        depth = self.down_blocks + self.stem_blocks
        yield from ((f"stem block {b}", b) for b in range(self.stem_blocks))
        yield from ((f"down block {b}", b + self.stem_blocks) for b in range(self.down_blocks))
        if self.middle_block:
            yield "the middle block", depth
            if self.block_contraction:
                yield "the middle block", depth - 1
        for b in range(self.up_blocks):
            yield f"up block {b}", depth - 1 - b
            if self.block_contraction:
                yield f"up block {b}", depth - 2 - b

    def _conv_block(self, filters: int, pool: bool, kernel: int, num_convs: int, **kw) -> SimpleConvBlock:
        return SimpleConvBlock(
            pool=pool, pooling_stride=2, num_convs=num_convs, filters=filters, kernel_size=kernel,
            use_bias=True, batch_norm=False, activation="relu", **kw,
        )

    # ----------------------------------------------------------------- specs
    @property
    def stem_stack(self) -> Optional[list]:
        """`stem_blocks` conv blocks (the first without pooling) and a closing pool."""
        if self.stem_blocks == 0:
            return None
        blocks = [
            self._conv_block(self._filters(b), b > 0, self.stem_kernel_size, self.convs_per_block,
                             pool_before_convs=True)
            for b in range(self.stem_blocks)
        ]
        return blocks + [PoolingBlock(pool=True, pooling_stride=2)]

    @property
    def encoder_stack(self) -> list:
        """Down blocks (pool, then convs), a closing pool, then the optional middle block."""
        depth = self.down_blocks + self.stem_blocks
        blocks: list = [
            self._conv_block(self._filters(b + self.stem_blocks), b > 0, self.kernel_size,
                             self.convs_per_block, pool_before_convs=True)
            for b in range(self.down_blocks)
        ]
        blocks.append(PoolingBlock(pool=True, pooling_stride=2))
        if self.middle_block:
            if self.convs_per_block > 1:
                blocks.append(self._conv_block(self._filters(depth), False, self.kernel_size,
                                               self.convs_per_block - 1, block_prefix="_middle_expand"))
            contract = depth - 1 if self.block_contraction else depth
            blocks.append(self._conv_block(self._filters(contract), False, self.kernel_size, 1,
                                           block_prefix="_middle_contract"))
        return blocks

    @property
    def decoder_stack(self) -> list:
        """Up blocks: upsample x2, concatenate the skip, refine with convs."""
        depth = self.down_blocks + self.stem_blocks
        blocks = []
        for b in range(self.up_blocks):
            filters_in = self._filters(depth - 1 - b)
            filters_out = self._filters(depth - 2 - b) if self.block_contraction else filters_in
            blocks.append(
                SimpleUpsamplingBlock(
                    upsampling_stride=2,
                    transposed_conv=not self.up_interpolate,
                    transposed_conv_filters=filters_in,
                    # sleap-nn's decoder always upsamples with a 3x3 kernel.
                    transposed_conv_kernel_size=3 if self.alignment == "sleap_nn" else self.kernel_size,
                    transposed_conv_batch_norm=False,
                    alignment=self.alignment,
                    interp_method="bilinear",
                    skip_connection=True,
                    skip_add=False,
                    refine_convs=self.convs_per_block,
                    refine_convs_first_filters=filters_in,
                    refine_convs_filters=filters_out,
                    refine_convs_kernel_size=self.kernel_size,
                    refine_convs_batch_norm=False,
                )
            )
        return blocks

    # ---------------------------------------------------------------- config
    PARAMS = (
        "filters", "filters_rate", "kernel_size", "stem_kernel_size", "convs_per_block", "stem_blocks",
        "down_blocks", "middle_block", "up_blocks", "up_interpolate", "block_contraction", "stacks",
        "in_channels", "alignment",
    )

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this UNet (`UNet(**unet.to_dict())`)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNet":
        """Build from constructor arguments; unknown keys are rejected with a suggestion."""
        if not isinstance(data, dict):
            raise TypeError(f"UNet parameters must be a dict, got {type(data).__name__}.")
        check_keys(data, cls.PARAMS, "UNet parameters")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_config(cls, config: UNetConfig, in_channels: int = 1, alignment: str = "keras") -> "UNet":
        """Build the UNet a SLEAP `UNetConfig` describes (SLEAP's mapping).

        Args:
            config: Stride-based description.
            in_channels: Channels of the input images.
            alignment: "keras" or "sleap_nn" (see `UNet`).
        """
        if isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig or dict, got {type(config).__name__}.")
        stem_blocks = 0 if config.stem_stride is None else int(math.log2(config.stem_stride))
        return cls(
            filters=config.filters,
            filters_rate=config.filters_rate,
            kernel_size=3,
            stem_kernel_size=7,
            convs_per_block=2,
            stem_blocks=stem_blocks,
            down_blocks=int(math.log2(config.max_stride)) - stem_blocks,
            middle_block=config.middle_block,
            up_blocks=int(math.log2(config.max_stride // config.output_stride)),
            up_interpolate=config.up_interpolate,
            stacks=config.stacks,
            in_channels=in_channels,
            alignment=alignment,
        )

    def extra_repr(self) -> str:
        defaults = inspect.signature(UNet.__init__).parameters
        changed = {k: v for k, v in self.to_dict().items() if v != defaults[k].default}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())
