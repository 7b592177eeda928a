"""UNet: SLEAP's test-suite figures, specs, configs, validation, and a custom EncoderDecoder."""

import json

import pytest
import torch

import flexunet
from flexunet import (
    EncoderDecoder,
    PoolingBlock,
    SimpleConvBlock,
    SimpleUpsamplingBlock,
    UNet,
    UNetConfig,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# (UNet kwargs, input side, params, output shape per stack, feature strides per stack, enc stride, out stride)
SLEAP_FIGURES = [
    (dict(), 192, 34_512_128, (64, 192, 192), [16, 8, 4, 2], 16, 1),
    (dict(filters=8, down_blocks=2, up_blocks=2, middle_block=False), 64, 16_320, (8, 64, 64), [4, 2], 4, 1),
    (dict(stacks=3, filters=16, down_blocks=5, up_blocks=5, up_interpolate=True), 160, 23_590_608, (16, 160, 160),
     [32, 16, 8, 4, 2], 32, 1),
    (dict(stem_blocks=2, stacks=3, filters=16, down_blocks=3, up_blocks=3, up_interpolate=True), 160, 23_396_592,
     (64, 40, 40), [32, 16, 8], 32, 4),
]


@pytest.mark.parametrize("kwargs,side,params,out_shape,strides,enc,out", SLEAP_FIGURES)
def test_sleap_figures(kwargs, side, params, out_shape, strides, enc, out):
    model = UNet(**kwargs).eval()
    assert n_params(model) == params == model.num_params_from_specs()
    assert (model.encoder_features_stride, model.output_stride, model.maximum_stride) == (enc, out, enc)
    with torch.no_grad():
        outputs, per_stack = model.forward_intermediates(torch.zeros(1, 1, side, side))
    assert len(outputs) == len(per_stack) == model.stacks
    for o, f in zip(outputs, per_stack):
        assert tuple(o.shape[1:]) == out_shape
        assert [feat.stride for feat in f] == strides
        assert all(isinstance(feat, flexunet.IntermediateFeature) for feat in f)
        assert [feat.tensor.shape[-1] for feat in f] == [side // s for s in strides]


@pytest.mark.parametrize("stacks", [1, 2, 3])
def test_forward_returns_the_last_stack_and_forward_stacks_every_stack(stacks):
    torch.manual_seed(stacks)
    model = UNet(filters=4, down_blocks=2, up_blocks=2, stacks=stacks).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        out, every = model(x), model.forward_stacks(x)
        outputs, features = model.forward_intermediates(x)
    assert isinstance(out, torch.Tensor) and isinstance(every, list) and len(every) == len(outputs) == stacks
    assert torch.equal(out, every[-1]) and all(torch.equal(a, b) for a, b in zip(every, outputs))
    assert len(features) == stacks and all(len(f) == 2 for f in features)
    if stacks > 1:
        assert not torch.equal(every[0], every[-1])


def test_default_specs_are_sleaps():
    model = UNet()
    enc = model.encoder_stack
    assert model.stem_stack is None
    assert [b.filters for b in enc[:4]] == [64, 128, 256, 512]
    assert [b.pool for b in enc[:4]] == [False, True, True, True]
    assert all(b.pool_before_convs for b in enc[:4])
    assert enc[4] == PoolingBlock(pool=True, pooling_stride=2)
    assert (enc[5].filters, enc[5].num_convs, enc[5].block_prefix) == (1024, 1, "_middle_expand")
    assert (enc[6].filters, enc[6].num_convs, enc[6].block_prefix) == (1024, 1, "_middle_contract")
    dec = model.decoder_stack
    assert [(b.transposed_conv_filters, b.refine_convs_first_filters, b.refine_convs_filters) for b in dec] == [
        (512, 512, 512), (256, 256, 256), (128, 128, 128), (64, 64, 64)]
    assert all(b.transposed_conv and b.skip_connection and not b.skip_add for b in dec)
    assert all(not b.transposed_conv_batch_norm and not b.refine_convs_batch_norm for b in dec)


def test_block_contraction_halves_the_channels_at_block_ends():
    model = UNet(filters=8, block_contraction=True)
    assert model.encoder_stack[-1].filters == 64  # contract: 8 * 2 ** 3
    assert [(b.refine_convs_first_filters, b.refine_convs_filters) for b in model.decoder_stack] == [
        (64, 32), (32, 16), (16, 8), (8, 4)]
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 4, 32, 32)
    assert n_params(model) == model.num_params_from_specs()


def test_stem_blocks_and_kernels():
    model = UNet(filters=4, stem_blocks=2, stem_kernel_size=7, down_blocks=2, up_blocks=2)
    stem = model.stem_stack
    assert [type(b).__name__ for b in stem] == ["SimpleConvBlock", "SimpleConvBlock", "PoolingBlock"]
    assert [b.kernel_size for b in stem[:2]] == [7, 7] and [b.pool for b in stem[:2]] == [False, True]
    assert model.stem_features_stride == 4 and model.encoder_features_stride == 16 and model.output_stride == 4
    assert model.blocks["stem0"].conv0.kernel_size == (7, 7)


def test_middle_block_without_expand_when_one_conv_per_block():
    model = UNet(filters=4, convs_per_block=1, down_blocks=2, up_blocks=2)
    assert [b.block_prefix for b in model.encoder_stack if isinstance(b, SimpleConvBlock)][-1] == "_middle_contract"
    assert not any(b.block_prefix == "_middle_expand" for b in model.encoder_stack if isinstance(b, SimpleConvBlock))


@pytest.mark.parametrize("config,expected", [
    (UNetConfig(), dict(stem_blocks=0, down_blocks=4, up_blocks=4)),
    (UNetConfig(max_stride=16, output_stride=4), dict(stem_blocks=0, down_blocks=4, up_blocks=2)),
    (UNetConfig(stem_stride=4, max_stride=32, output_stride=4, stacks=2), dict(stem_blocks=2, down_blocks=3, up_blocks=3)),
    (UNetConfig(max_stride=8, output_stride=8, filters=8), dict(stem_blocks=0, down_blocks=3, up_blocks=0)),
])
def test_from_config_uses_sleaps_mapping(config, expected):
    model = UNet.from_config(config, in_channels=3)
    assert {k: getattr(model, k) for k in expected} == expected
    assert (model.kernel_size, model.stem_kernel_size, model.convs_per_block, model.in_channels) == (3, 7, 2, 3)
    assert model.maximum_stride == config.max_stride and model.output_stride == config.output_stride


def test_configs_round_trip_through_json():
    config = UNetConfig(stem_stride=2, max_stride=32, output_stride=2, filters=24, filters_rate=1.5, stacks=2)
    assert UNetConfig.from_json(config.to_json()) == config
    model = UNet(filters=8, filters_rate=1.5, down_blocks=3, up_blocks=2, up_interpolate=True, in_channels=3)
    rebuilt = UNet.from_dict(json.loads(model.to_json()))
    assert rebuilt.to_dict() == model.to_dict()
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_layer_names_map_to_keras_names_mechanically():
    names = set(flexunet.io.keras.keras_layers(UNet(stem_blocks=1, down_blocks=3, up_blocks=3)))
    for expected in ["stem0_conv0", "stem0_conv1", "stack0_enc0_conv0", "stack0_enc4_middle_expand_conv0",
                     "stack0_enc5_middle_contract_conv0", "stack0_dec0_s16_to_s8_trans_conv",
                     "stack0_dec0_s16_to_s8_refine_conv1"]:
        assert expected in names
    model = UNet(filters=4, down_blocks=2, up_blocks=2)
    for key in model.state_dict():
        block, layer, _ = key.split(".")[1:]
        assert f"{block}_{layer}" in flexunet.io.keras.keras_layers(model)


class LeapCNN(EncoderDecoder):
    """A LEAP-CNN-like network: conv blocks with pooling, upsampling without skips."""

    def __init__(self, filters=8, down_blocks=2, in_channels=1):
        super().__init__(stacks=1, in_channels=in_channels)
        self.filters, self.down_blocks = filters, down_blocks
        self.build()

    @property
    def encoder_stack(self):
        return [SimpleConvBlock(pool=True, filters=self.filters * 2**i, num_convs=2) for i in range(self.down_blocks)]

    @property
    def decoder_stack(self):
        return [SimpleUpsamplingBlock(transposed_conv=True, transposed_conv_filters=self.filters,
                                      transposed_conv_batch_norm=False, skip_connection=False,
                                      refine_convs=2, refine_convs_filters=self.filters,
                                      refine_convs_batch_norm=False) for _ in range(self.down_blocks)]


def test_a_network_without_skips_is_defined_by_its_stacks_alone():
    model = LeapCNN()
    assert model.maximum_stride == 4 and model.output_stride == 1
    assert not any(model.blocks[p.name].uses_skip for p in model.plan() if p.section == "decoder")
    (y,), (features,) = model.forward_intermediates(torch.randn(2, 1, 16, 16))
    assert y.shape == (2, 8, 16, 16) and [f.stride for f in features] == [4, 2]
    assert n_params(model) == model.num_params_from_specs()
    # Without skips the decoder input channels are the previous block's outputs only.
    assert model.blocks["stack0_dec1_s2_to_s1"].trans_conv.in_channels == 8


def test_skip_sources_follow_sleaps_rule():
    plan = UNet(filters=4, stem_blocks=1, down_blocks=2, up_blocks=3).plan()
    dec = [p for p in plan if p.section == "decoder"]
    # Sources: the stem output (stride 2, 4 channels), then enc0 (stride 2, 8) and enc1 (stride 4, 16);
    # the block to stride 2 takes the stem output, the first source there.
    assert [(p.in_stride, p.out_stride, p.skip_channels) for p in dec] == [(8, 4, 16), (4, 2, 4), (2, 1, None)]


BAD_UNETS = [
    (dict(filters=0), ValueError, "filters"),
    (dict(filters=2.0), TypeError, "filters"),
    (dict(filters_rate=0), ValueError, "filters_rate"),
    (dict(filters_rate=-1.5), ValueError, "filters_rate"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(stem_kernel_size=-3), ValueError, "stem_kernel_size"),
    (dict(down_blocks=-1), ValueError, "down_blocks"),
    (dict(up_blocks=-1), ValueError, "up_blocks"),
    (dict(stem_blocks=-2), ValueError, "stem_blocks"),
    (dict(convs_per_block=0), ValueError, "convs_per_block"),
    (dict(up_blocks=5), ValueError, "up_blocks must be <= down_blocks \\+ stem_blocks \\(4\\)"),
    (dict(stacks=0), ValueError, "stacks"),
    (dict(stacks=2, up_blocks=3), ValueError, "stacks=2"),
    (dict(middle_block="yes"), TypeError, "middle_block"),
    (dict(filters=1, filters_rate=0.5), ValueError, "filters_rate"),
    (dict(in_channels=0), ValueError, "in_channels"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_UNETS)
def test_invalid_unet_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        UNet(**kwargs)


BAD_CONFIGS = [
    (dict(max_stride=12), "max_stride must be a power of two, got 12 \\(nearest: 8 or 16\\)"),
    (dict(output_stride=3), "output_stride"),
    (dict(stem_stride=6), "stem_stride"),
    (dict(max_stride=8, output_stride=16), "output_stride \\(16\\) must be <= max_stride \\(8\\)"),
    (dict(stem_stride=16, max_stride=16), "stem_stride"),
    (dict(filters=0), "filters"),
    (dict(filters_rate=0.0), "filters_rate"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS)
def test_invalid_unet_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'max_stride'"):
        UNetConfig.from_dict({"max_strid": 16})
    with pytest.raises(ValueError, match="did you mean 'filters'"):
        UNet.from_dict({"filter": 16})


BAD_INPUTS = [
    (torch.zeros(1, 64, 64), ValueError, "4 dimensions"),
    (torch.zeros(1, 3, 64, 64), ValueError, "1 channels"),
    (torch.zeros(1, 1, 100, 64), ValueError, "height must be a multiple of the maximum stride 16, got 100; nearest valid sizes: 96 or 112"),
    (torch.zeros(1, 1, 64, 8), ValueError, "width .* got 8; nearest valid sizes: 16 or 32"),
    (torch.zeros(1, 1, 64, 64, dtype=torch.int64), TypeError, "floating-point"),
    ([[0.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("x,error,match", BAD_INPUTS)
def test_forward_rejects_bad_inputs_with_a_sentence(x, error, match):
    model = UNet(filters=4)
    with pytest.raises(error, match=match):
        model(x)
