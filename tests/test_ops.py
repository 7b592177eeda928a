"""flexunet's registered operators: one operator for eager, autograd, torch.compile; plain ops when exporting."""

import pytest
import torch
import torch.nn.functional as F

import flexunet
from flexunet import kernels
from flexunet.kernels import native
from flexunet.nn.layers import Conv2dSame, ConvTranspose2dSame, MaxPool2dSame

CONV3X3 = torch.ops.flexunet.conv3x3.default
TRANSPOSED = torch.ops.flexunet.conv_transpose_same.default


@pytest.mark.parametrize("cin,cout,dtype", [(16, 32, torch.float32), (3, 8, torch.float32), (32, 16, torch.bfloat16)])
def test_conv3x3_passes_pytorchs_operator_checks(cin, cout, dtype):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as PyTorch checks them."""
    x = torch.randn(2, cin, 9, 7, requires_grad=dtype == torch.float32)
    weight = torch.randn(cout, cin, 3, 3, requires_grad=dtype == torch.float32)
    bias = torch.randn(cout, requires_grad=dtype == torch.float32)
    torch.library.opcheck(CONV3X3, (x, weight, bias, dtype, dtype == torch.bfloat16))


@pytest.mark.parametrize("cin,cout,k,stride,crop", [(16, 32, 3, 2, 0), (16, 16, 3, 2, 1), (5, 7, 5, 3, 1)])
def test_conv_transpose_passes_pytorchs_operator_checks(cin, cout, k, stride, crop):
    x, weight, bias = torch.randn(2, cin, 5, 6), torch.randn(cin, cout, k, k), torch.randn(cout)
    torch.library.opcheck(TRANSPOSED, (x, weight, bias, stride, crop, torch.float32))


@pytest.mark.parametrize("cin,cout", [(16, 32), (3, 8), (1, 24), (256, 256), (54, 81), (121, 60), (24, 36)])
def test_conv3x3_equals_a_padded_convolution(cin, cout):
    x, weight, bias = torch.randn(2, cin, 13, 10), torch.randn(cout, cin, 3, 3), torch.randn(cout)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = torch.ops.flexunet.conv3x3(x, weight, bias, torch.float32, True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 5e-5


# (x channels, skip channels or 0, output channels, upsampling, relu)
FUSED = [(16, 16, 16, "bilinear", True), (24, 12, 20, "nearest", False), (33, 0, 16, "bilinear", True),
         (5, 3, 7, "none", True)]


@pytest.mark.parametrize("cx,cs,cout,upsample,relu", FUSED)
def test_fused_conv3x3_passes_pytorchs_operator_checks(cx, cs, cout, upsample, relu):
    factor = 1 if upsample == "none" else 2
    x = torch.randn(2, cx, 5, 4, requires_grad=True)
    skip = torch.randn(2, cs, 5 * factor, 4 * factor, requires_grad=True) if cs else None
    weight, bias = torch.randn(cout, cs + cx, 3, 3, requires_grad=True), torch.randn(cout, requires_grad=True)
    torch.library.opcheck(CONV3X3, (x, weight, bias, torch.float32, False, relu, skip, upsample))


@pytest.mark.parametrize("cx,cs,cout,upsample,relu", FUSED)
def test_fused_conv3x3_and_its_gradients_equal_upsample_concat_conv_relu(cx, cs, cout, upsample, relu):
    """conv(cat([skip, upsample(x)])) + ReLU as one operator: the values and all gradients of the four steps."""
    torch.manual_seed(cx + cs)
    factor = 1 if upsample == "none" else 2
    x = torch.randn(2, cx, 12, 10, dtype=torch.float64)
    skip = torch.randn(2, cs, 12 * factor, 10 * factor, dtype=torch.float64) if cs else None
    weight, bias = torch.randn(cout, cs + cx, 3, 3, dtype=torch.float64), torch.randn(cout, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (x, weight, bias)] + ([skip.float().requires_grad_()] if cs else [])
    got = CONV3X3(leaves[0], leaves[1], leaves[2], torch.float32, False, relu, leaves[3] if cs else None, upsample)
    ref_leaves = [t.requires_grad_() for t in (x, weight, bias)] + ([skip.requires_grad_()] if cs else [])
    joined = x if upsample == "none" else F.interpolate(
        x, scale_factor=2, mode=upsample, **({"align_corners": False} if upsample == "bilinear" else {}))
    joined = torch.cat([skip, joined], 1) if cs else joined
    want = F.conv2d(joined, weight, bias, padding=1)
    want = torch.relu(want) if relu else want
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    upstream = torch.randn_like(want)
    got.backward(upstream.float())
    want.backward(upstream)
    for mine, theirs in zip(leaves, ref_leaves):
        assert float((mine.grad.double() - theirs.grad).abs().max() / theirs.grad.abs().max()) < 1e-4


@pytest.mark.parametrize("cx,cs,cout,upsample", [(24, 0, 20, "none"), (16, 12, 8, "bilinear"), (5, 3, 7, "nearest")])
def test_weight_gradient_passes_pytorchs_operator_checks(cx, cs, cout, upsample):
    factor = 1 if upsample == "none" else 2
    x, grad = torch.randn(2, cx, 6, 5), torch.randn(2, cout, 6 * factor, 5 * factor)
    skip = torch.randn(2, cs, 6 * factor, 5 * factor) if cs else None
    torch.library.opcheck(torch.ops.flexunet.conv3x3_weight_grad.default, (x, grad, skip, upsample))


@pytest.mark.parametrize("cin,cout,joined,native_calls", [(16, 16, False, 0), (8, 12, False, 0), (24, 16, False, 1),
                                                          (16, 16, True, 1)])
def test_narrow_bfloat16_layers_run_on_onednn(cin, cout, joined, native_calls, monkeypatch):
    """In bfloat16, unjoined layers of at most NARROW_BF16_CHANNELS channels use oneDNN's direct convolution."""
    if not (native.available() and native.has_bfloat16()):
        pytest.skip("needs the native kernels with AVX512-BF16")
    calls = []
    original = native.winograd_conv3x3
    monkeypatch.setattr(native, "winograd_conv3x3", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, cin // 2 if joined else cin, 6 if joined else 12, 6 if joined else 12)
    skip = torch.randn(2, cin - cin // 2, 12, 12) if joined else None
    weight, bias = torch.randn(cout, cin, 3, 3), torch.randn(cout)
    got = CONV3X3(x, weight, bias, torch.bfloat16, True, True, skip, "bilinear" if joined else "none")
    joined_input = torch.cat([skip, F.interpolate(x, scale_factor=2, mode="bilinear")], 1) if joined else x
    want = torch.relu(F.conv2d(joined_input.double(), weight.double(), bias.double(), padding=1))
    assert len(calls) == native_calls and got.dtype == torch.bfloat16
    assert float((got.double() - want).abs().max() / want.abs().max()) < (5e-2 if native_calls else 2e-2)


@pytest.mark.parametrize("shape", [(2, 24, 7, 10), (1, 16, 8, 8)])
def test_max_pool_passes_pytorchs_operator_checks_and_serves_inference_only(shape):
    x = torch.randn(*shape)
    torch.library.opcheck(torch.ops.flexunet.max_pool2x2.default, (x,))
    pool = MaxPool2dSame()
    with torch.no_grad():
        torch.testing.assert_close(pool(x), F.max_pool2d(x, 2, 2, ceil_mode=True))
        # The operator where the native kernels are forced or measured faster; else the layer's own pooling.
        torch_wins = native.mode() == "torch" or (
            native.mode() == "measure" and kernels.choice.CHOICES.get(kernels.choice.pool_key(x)) == "torch")
        assert (kernels.max_pool2x2(x) is not None) == (not torch_wins)
    assert kernels.max_pool2x2(x.requires_grad_()) is None  # training: ATen's, whose backward needs its indices


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsampling_adjoint_passes_pytorchs_operator_checks(mode):
    torch.library.opcheck(torch.ops.flexunet.upsample2x_backward.default, (torch.randn(2, 20, 6, 8), 7, mode))


@pytest.mark.parametrize("shape,cin,cout,grad,uses_operator", [
    ((2, 16, 32, 32), 16, 16, False, True),  # inference: always where the native kernels run
    ((2, 16, 32, 32), 16, 16, True, True),  # training: 16 channels, 128 tiles
    ((2, 3, 32, 32), 3, 16, True, False),  # an image's channels: oneDNN
    ((1, 64, 12, 12), 64, 64, True, False),  # 9 tiles: oneDNN
    ((1, 64, 12, 12), 64, 64, False, True),
    ((1, 256, 8, 8), 256, 256, False, True),  # the PyTorch Winograd path, on any CPU
])
def test_training_runs_on_the_operator_from_16_channels_and_64_tiles(shape, cin, cout, grad, uses_operator):
    x = torch.rand(*shape, requires_grad=grad)
    weight = torch.rand(cout, cin, 3, 3, requires_grad=grad)
    if not grad and kernels._layer_does_it(weight, torch.float32):
        uses_operator = False  # PyTorch's paths forced: oneDNN's convolution, which the layer runs itself
    with torch.set_grad_enabled(grad):
        assert (kernels.conv3x3(x, weight, None) is not None) == uses_operator


def test_conv3x3_gradients_equal_the_plain_convolutions():
    """Training on the operator (enough tiles): the same gradients as F.conv2d, to float32 rounding."""
    torch.manual_seed(0)
    layer = Conv2dSame(32, 48, 3)
    x = torch.randn(2, 32, 64, 64, requires_grad=True)
    y = layer(x)
    assert "conv3x3" in y.grad_fn.name()  # the operator's registered backward
    y.square().sum().backward()
    grads = [x.grad, layer.weight.grad, layer.bias.grad]
    x2 = x.detach().requires_grad_()
    w2, b2 = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    F.conv2d(x2, w2, b2, padding=1).square().sum().backward()
    for got, want in zip(grads, [x2.grad, w2.grad, b2.grad]):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def _graph_targets(model, x, **compile_kwargs):
    """The call targets of the FX graph `torch.compile` hands to its backend."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True, **compile_kwargs)
    with torch.no_grad():
        out = compiled(x)
    return targets, out


def test_compiled_models_keep_the_operators():
    torch.manual_seed(0)
    model = flexunet.UNet(filters=16, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(2, 1, 32, 32)
    targets, out = _graph_targets(model, x)
    n_conv3x3 = sum(t is torch.ops.flexunet.conv3x3.default or t is torch.ops.flexunet.conv3x3 for t in targets)
    n_transposed = sum(t in (TRANSPOSED, torch.ops.flexunet.conv_transpose_same) for t in targets)
    # Every 3x3 convolution of the network where the native kernels run; else the layers' own.
    assert n_conv3x3 == (0 if native.mode() == "torch" else 10)
    assert n_transposed == 2  # both upsampling steps
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_inductor_compiles_around_the_operators_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = flexunet.UNet(filters=16, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(2, 1, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_exported_programs_hold_standard_operators_only():
    model = flexunet.UNet(filters=16, down_blocks=2, up_blocks=2).eval()
    program = flexunet.export_program(model, torch.rand(1, 1, 32, 32))
    names = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("flexunet" in name for name in names)
    assert any("convolution" in name or "conv2d" in name for name in names)


@pytest.mark.parametrize("make,args", [
    (lambda: Conv2dSame(16, 16, 3), (1, 16, 8, 8)),
    (lambda: ConvTranspose2dSame(16, 16, 3, 2), (1, 16, 8, 8)),
])
def test_layers_use_plain_operations_where_the_operators_do_not_pay(make, args):
    layer = make()
    x = torch.rand(*args)
    assert kernels.conv3x3(x.double(), layer.weight.double(), None) is None  # float64: PyTorch's own
    x_grad = x.clone().requires_grad_()
    assert kernels.conv_transpose(x_grad, layer.weight, None, 2, 0) is None  # training: oneDNN's backward
    small = torch.rand(1, 16, 8, 8, requires_grad=True)  # 4 tiles: too few to amortise the transforms
    assert kernels.conv3x3(small, torch.rand(16, 16, 3, 3), None) is None
