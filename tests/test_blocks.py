"""Every option of the block specs builds, runs and does what it says."""

import dataclasses

import pytest
import torch

from flexunet import PoolingBlock, SimpleConvBlock, SimpleUpsamplingBlock
from flexunet.nn.blocks import spec_from_dict
from flexunet.io.keras import keras_layers

torch.manual_seed(0)

CONV_CASES = [
    # (spec kwargs, in_channels, (H, W), output (C, H, W), module order)
    (dict(), 3, (8, 8), (32, 4, 4), ["conv0", "conv1", "pool"]),
    (dict(pool_before_convs=True), 3, (8, 8), (32, 4, 4), ["pool", "conv0", "conv1"]),
    (dict(pool=False, filters=5), 2, (7, 5), (5, 7, 5), ["conv0", "conv1"]),
    (dict(pooling_stride=1, num_convs=1, filters=4), 2, (6, 6), (4, 6, 6), ["conv0", "pool"]),
    (dict(pooling_stride=3, num_convs=1, filters=4), 2, (7, 7), (4, 3, 3), ["conv0", "pool"]),
    (dict(num_convs=0), 3, (8, 8), (3, 4, 4), ["pool"]),
    (dict(num_convs=3, kernel_size=5, filters=6, pool=False), 2, (9, 9), (6, 9, 9),
     ["conv0", "conv1", "conv2"]),
    (dict(kernel_size=2, filters=6, pool=False), 2, (5, 5), (6, 5, 5), ["conv0", "conv1"]),
    (dict(use_bias=False, pool=False, num_convs=1, filters=4), 2, (4, 4), (4, 4, 4), ["conv0"]),
    (dict(batch_norm=True, pool=False, num_convs=1, filters=4), 2, (4, 4), (4, 4, 4), ["conv0", "bn0", "bn0_act"]),
    (dict(batch_norm=True, batch_norm_before_activation=False, pool=False, num_convs=1, filters=4), 2, (4, 4),
     (4, 4, 4), ["conv0", "bn0"]),
    (dict(activation="linear", pool=False, num_convs=1, filters=4), 2, (4, 4), (4, 4, 4), ["conv0"]),
    (dict(activation="tanh", pool=False, num_convs=1, filters=4), 2, (4, 4), (4, 4, 4), ["conv0"]),
]


@pytest.mark.parametrize("kwargs,cin,hw,expected,order", CONV_CASES)
def test_conv_block_options(kwargs, cin, hw, expected, order):
    spec = SimpleConvBlock(**kwargs)
    block = spec.make_block(cin, "enc3")
    assert list(block._modules) == order
    y = block(torch.randn(2, cin, *hw))
    assert tuple(y.shape[1:]) == expected
    assert spec.out_channels(cin) == expected[0]
    assert sum(p.numel() for p in block.parameters()) == spec.num_params(cin)
    weighted = {layer.name for layer in spec.layers(cin, "enc3") if layer.params}
    assert set(keras_layers(torch.nn.ModuleDict({block.name: block}))) == weighted


def test_conv_block_prefix_names_layers_like_keras():
    spec = SimpleConvBlock(pool=False, num_convs=1, block_prefix="_middle_expand")
    block = spec.make_block(2, spec.block_name("stack0_enc5"))
    assert block.name == "stack0_enc5_middle_expand"
    assert list(keras_layers(torch.nn.ModuleDict({block.name: block}))) == ["stack0_enc5_middle_expand_conv0"]


def test_conv_block_without_bias_maps_zero_to_zero():
    block = SimpleConvBlock(use_bias=False, pool=False, activation="linear").make_block(3)
    assert all(m.bias is None for m in block if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(block(torch.zeros(1, 3, 4, 4)), torch.zeros(1, 32, 4, 4))


def test_linear_activation_makes_the_block_affine():
    block = SimpleConvBlock(pool=False, activation="linear").make_block(2)
    a, b = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6)
    zero = block(torch.zeros_like(a))
    torch.testing.assert_close(block(a + b) - zero, (block(a) - zero) + (block(b) - zero), atol=1e-5, rtol=1e-5)
    relu = SimpleConvBlock(pool=False).make_block(2)
    assert (relu(a) >= 0).all() and not (block(a) >= 0).all()


def test_batch_norm_before_or_after_activation():
    x = torch.randn(4, 2, 6, 6)
    before = SimpleConvBlock(pool=False, num_convs=1, batch_norm=True).make_block(2).train()
    after = SimpleConvBlock(pool=False, num_convs=1, batch_norm=True, batch_norm_before_activation=False).make_block(2).train()
    assert (before(x) >= 0).all()  # relu last
    y = after(x)  # BN last: zero mean per channel in training mode
    assert (y < 0).any()
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(32), atol=1e-4, rtol=0)
    bn = after.bn0
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)  # Keras defaults


def test_pooling_block():
    block = PoolingBlock().make_block(4, "stack0_enc4")
    assert list(block._modules) == ["last_pool"]
    assert block(torch.randn(1, 4, 7, 7)).shape == (1, 4, 4, 4)
    assert PoolingBlock(pool=False).make_block(4)(torch.ones(1, 4, 3, 3)).shape == (1, 4, 3, 3)
    assert PoolingBlock(pooling_stride=4).stride == 4 and PoolingBlock(pool=False).stride == 1


UP_CASES = [
    # (spec kwargs, in_channels, skip_channels, output channels, modules)
    (dict(), 4, None, 64, ["interp_bilinear", "refine_conv0", "refine_conv0_bn", "refine_conv0_bn_act",
                          "refine_conv1", "refine_conv1_bn", "refine_conv1_bn_act"]),
    (dict(transposed_conv=True, transposed_conv_filters=6, refine_convs=0), 4, None, 6,
     ["trans_conv", "trans_conv_bn", "trans_conv_bn_act"]),
    (dict(transposed_conv=True, transposed_conv_filters=6, transposed_conv_batch_norm_before_activation=False,
          refine_convs=0), 4, None, 6, ["trans_conv", "trans_conv_act", "trans_conv_bn"]),
    (dict(transposed_conv=True, transposed_conv_filters=6, transposed_conv_batch_norm=False,
          transposed_conv_kernel_size=4, transposed_conv_use_bias=False, refine_convs=0), 4, None, 6,
     ["trans_conv", "trans_conv_act"]),
    (dict(interp_method="nearest", refine_convs=0), 4, None, 4, ["interp_nearest"]),
    (dict(skip_connection=True, refine_convs=1, refine_convs_filters=5, refine_convs_batch_norm=False), 4, 3, 5,
     ["interp_bilinear", "refine_conv0"]),
    (dict(skip_connection=False, refine_convs=0), 4, 3, 4, ["interp_bilinear"]),
    (dict(skip_connection=True, skip_add=True, refine_convs=0), 4, 4, 4, ["interp_bilinear"]),
    (dict(skip_connection=True, skip_add=True, refine_convs=0), 4, 3, 4, ["interp_bilinear", "skip_conv1x1"]),
    (dict(refine_convs=3, refine_convs_first_filters=7, refine_convs_filters=5, refine_convs_kernel_size=5,
          refine_convs_batch_norm=False, refine_convs_use_bias=False), 4, None, 5,
     ["interp_bilinear", "refine_conv0", "refine_conv1", "refine_conv2"]),
    (dict(refine_convs=1, refine_convs_batch_norm_before_activation=False), 4, None, 64,
     ["interp_bilinear", "refine_conv0", "refine_conv0_bn"]),
    (dict(upsampling_stride=3, transposed_conv=True, transposed_conv_kernel_size=2, transposed_conv_filters=3,
          refine_convs=0), 4, None, 3, ["trans_conv", "trans_conv_bn", "trans_conv_bn_act"]),
]


@pytest.mark.parametrize("kwargs,cin,skip_c,out_c,order", UP_CASES)
def test_upsampling_block_options(kwargs, cin, skip_c, out_c, order):
    spec = SimpleUpsamplingBlock(**kwargs)
    block = spec.make_block(cin, spec.block_name("stack0_dec1", 8), skip_c).train()
    assert block.name == f"stack0_dec1_s8_to_s{8 // spec.upsampling_stride}"
    assert [k for k in block._modules if block._modules[k] is not None] == order
    s = spec.upsampling_stride
    skip = None if skip_c is None else torch.randn(2, skip_c, 5 * s, 4 * s)
    y = block(torch.randn(2, cin, 5, 4), skip)
    assert tuple(y.shape) == (2, out_c, 5 * s, 4 * s)
    assert spec.out_channels(cin, skip_c) == out_c == block.out_channels
    assert sum(p.numel() for p in block.parameters()) == spec.num_params(cin, skip_c)
    weighted = {layer.name for layer in spec.layers(cin, block.name, skip_c) if layer.params}
    assert set(keras_layers(torch.nn.ModuleDict({block.name: block}))) == weighted


def test_concat_puts_the_skip_first():
    block = SimpleUpsamplingBlock(skip_connection=True, interp_method="nearest", refine_convs=0).make_block(2, skip_channels=3)
    x, skip = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 6, 6)
    y = block(x, skip)
    assert torch.equal(y[:, :3], skip)
    assert torch.equal(y[:, 3:], x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_skip_add_adds_and_projects_with_a_linear_1x1_conv():
    same = SimpleUpsamplingBlock(skip_connection=True, skip_add=True, interp_method="nearest", refine_convs=0).make_block(2, skip_channels=2)
    x, skip = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(same(x, skip), skip + x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    proj = SimpleUpsamplingBlock(skip_connection=True, skip_add=True, interp_method="nearest", refine_convs=0).make_block(2, skip_channels=5)
    skip5 = torch.randn(1, 5, 6, 6)
    expected = proj.skip_conv1x1(skip5) + x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(proj(x, skip5), expected)
    assert (proj.skip_conv1x1(-skip5) < 0).any()  # linear: no activation on the projection


def test_refine_activation_is_applied_as_configured():
    x = torch.randn(2, 3, 4, 4)
    linear = SimpleUpsamplingBlock(refine_convs=1, refine_convs_batch_norm=False, refine_convs_activation="linear").make_block(3)
    relu = SimpleUpsamplingBlock(refine_convs=1, refine_convs_batch_norm=False).make_block(3)
    assert (linear(x) < 0).any() and (relu(x) >= 0).all()


def test_transposed_conv_activation_linear_keeps_negative_values():
    x = torch.randn(2, 3, 4, 4)
    spec = SimpleUpsamplingBlock(transposed_conv=True, transposed_conv_batch_norm=False,
                                 transposed_conv_activation="linear", refine_convs=0)
    assert (spec.make_block(3)(x) < 0).any()


def test_block_built_with_a_skip_requires_one():
    block = SimpleUpsamplingBlock(skip_connection=True, refine_convs=0).make_block(2, "dec0", 3)
    with pytest.raises(ValueError, match="dec0"):
        block(torch.randn(1, 2, 3, 3))


@pytest.mark.parametrize("spec", [SimpleConvBlock(filters=3, block_prefix="_x"), PoolingBlock(pool=False),
                                  SimpleUpsamplingBlock(refine_convs_first_filters=4, interp_method="nearest")])
def test_specs_round_trip_through_dicts(spec):
    assert spec_from_dict(spec.to_dict()) == spec
    assert dataclasses.is_dataclass(spec) and hash(spec) == hash(spec_from_dict(spec.to_dict()))


BAD_SPECS = [
    (SimpleConvBlock, dict(filters=0), ValueError, "filters"),
    (SimpleConvBlock, dict(kernel_size=0), ValueError, "kernel_size"),
    (SimpleConvBlock, dict(num_convs=-1), ValueError, "num_convs"),
    (SimpleConvBlock, dict(activation="relu6x"), ValueError, "activation"),
    (SimpleConvBlock, dict(pool="yes"), TypeError, "pool"),
    (SimpleConvBlock, dict(filters=2.5), TypeError, "filters"),
    (PoolingBlock, dict(pooling_stride=0), ValueError, "pooling_stride"),
    (SimpleUpsamplingBlock, dict(interp_method="bicubic"), ValueError, "interp_method"),
    (SimpleUpsamplingBlock, dict(upsampling_stride=0), ValueError, "upsampling_stride"),
    (SimpleUpsamplingBlock, dict(refine_convs_first_filters=0), ValueError, "refine_convs_first_filters"),
    (SimpleUpsamplingBlock, dict(transposed_conv_activation="nope"), ValueError, "transposed_conv_activation"),
]


@pytest.mark.parametrize("cls,kwargs,error,field", BAD_SPECS)
def test_invalid_specs_name_the_field(cls, kwargs, error, field):
    with pytest.raises(error, match=field):
        cls(**kwargs)


def test_unknown_spec_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'filters'"):
        spec_from_dict({"type": "SimpleConvBlock", "filter": 3})


@pytest.mark.parametrize("interp,activation,batch_norm", [
    ("bilinear", "relu", False), ("nearest", "relu", False), ("bilinear", "tanh", False), ("bilinear", "relu", True),
])
def test_decoder_joins_upsampling_concatenation_and_first_conv_in_one_call(interp, activation, batch_norm):
    """interp -> concat -> conv is one `Conv2dSame(x, skip, upsample)` call, equal to the three steps, gradients too."""
    torch.manual_seed(0)
    spec = SimpleUpsamplingBlock(skip_connection=True, interp_method=interp, refine_convs=2, refine_convs_filters=24,
                                 refine_convs_activation=activation, refine_convs_batch_norm=batch_norm)
    block = spec.make_block(36, "dec0", skip_channels=24).eval()
    assert block.fused_mode == interp
    x, skip = torch.randn(2, 36, 10, 12), torch.randn(2, 24, 20, 24)

    def stepwise(x, skip):
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode=interp,
                                             **({"align_corners": False} if interp == "bilinear" else {}))
        y = torch.cat([skip, up], 1)
        for key in block._refine:
            y = getattr(block, key)(y)
        return y

    with torch.no_grad():
        got, want = block(x, skip), stepwise(x, skip)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    block.train()
    leaves = [x.clone().requires_grad_(), skip.clone().requires_grad_()]
    block(*leaves).square().sum().backward()
    fused_grads = [t.grad for t in leaves] + [block.refine_conv0.weight.grad.clone()]
    block.zero_grad()
    again = [x.clone().requires_grad_(), skip.clone().requires_grad_()]
    stepwise(*again).square().sum().backward()
    for mine, theirs in zip(fused_grads, [t.grad for t in again] + [block.refine_conv0.weight.grad]):
        assert float((mine - theirs).abs().max() / theirs.abs().max()) < 1e-4


def test_conv_applies_its_own_activation_like_keras():
    block = SimpleConvBlock(pool=False, num_convs=1, filters=4, activation="tanh").make_block(2)
    x = torch.randn(1, 2, 5, 5)
    plain = torch.nn.functional.conv2d(x, block.conv0.weight, block.conv0.bias, padding=1)
    torch.testing.assert_close(block(x), torch.tanh(plain))
    assert block.conv0.activation == "tanh" and "activation='tanh'" in repr(block.conv0)
