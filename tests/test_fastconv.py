"""CPU fast paths: exact to TensorFlow's definitions, with and without autograd, fp32 and bf16."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flexunet
from flexunet import kernels
from flexunet.kernels import fastconv, native, ops
from flexunet.nn.layers import Conv2dSame, ConvTranspose2dSame
from tests import tf_oracle

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (4, 2), (5, 2), (1, 2), (2, 3), (5, 3), (3, 1), (6, 4)])
@pytest.mark.parametrize("grad", [False, True])
def test_transposed_conv_matches_tf(kernel, stride, grad):
    x = RNG.standard_normal((2, 5, 4, 3))
    k = RNG.standard_normal((kernel, kernel, 4, 3))
    b = RNG.standard_normal(4)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    w = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
    with torch.set_grad_enabled(grad):
        if grad:
            xt.requires_grad_()
        y = fastconv.transposed_conv(xt, w, torch.from_numpy(b), stride)
    np.testing.assert_allclose(y.detach().permute(0, 2, 3, 1).numpy(),
                               tf_oracle.conv2d_transpose_same(x, k, b, stride), atol=1e-10)
    if grad:  # gradients equal those of PyTorch's own transposed convolution + TF crop
        y.square().sum().backward()
        ref = ConvTranspose2dSame(3, 4, kernel, stride).double()
        ref.weight.data, ref.bias.data = w, torch.from_numpy(b)
        x2 = xt.detach().clone().requires_grad_()
        out = F.conv_transpose2d(x2, ref.weight, ref.bias, ref.stride, ref.padding, ref.output_padding)
        if ref.crop_end:
            out = out[:, :, : out.shape[2] - 1, : out.shape[3] - 1]
        out.square().sum().backward()
        torch.testing.assert_close(xt.grad, x2.grad)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (5, 3), (7, 4), (3, 1), (3, 3), (1, 2)])
@pytest.mark.parametrize("path", ["fast", "plain"])
def test_sleap_nn_alignment_is_pytorchs_symmetric_padding(kernel, stride, path):
    """alignment="sleap_nn" equals nn.ConvTranspose2d(padding=(k-1)//2, output_padding=s-1), as sleap-nn builds it."""
    torch.manual_seed(0)
    layer = ConvTranspose2dSame(4, 6, kernel, stride, alignment="sleap_nn")
    ref = torch.nn.ConvTranspose2d(4, 6, kernel, stride, padding=(kernel - 1) // 2, output_padding=stride - 1)
    ref.load_state_dict(layer.state_dict())
    x = torch.rand(2, 4, 5, 7)
    with torch.set_grad_enabled(path == "plain"):  # eager inference takes the fast path
        y = layer(x)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    keras = ConvTranspose2dSame(4, 6, kernel, stride)
    keras.load_state_dict(layer.state_dict())
    # Apart where the crops differ (SLEAP's k=3, s=2: one pixel), equal elsewhere (k <= s, k=3 s=1).
    assert torch.allclose(keras(x), y, atol=1e-5) == (layer.crop_start == keras.crop_start)


def test_sleap_nn_alignment_needs_an_odd_kernel():
    with pytest.raises(ValueError, match="alignment='sleap_nn' needs an odd kernel size.*kernel_size=2"):
        ConvTranspose2dSame(4, 6, 2, 2, alignment="sleap_nn")
    with pytest.raises(ValueError, match="alignment must be one of 'keras', 'sleap_nn'; got 'tf'"):
        ConvTranspose2dSame(4, 6, 3, 2, alignment="tf")
    with pytest.raises(ValueError, match="SimpleUpsamplingBlock.alignment='sleap_nn' needs an odd"):
        flexunet.SimpleUpsamplingBlock(transposed_conv=True, transposed_conv_kernel_size=4, alignment="sleap_nn")


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("size", [(8, 8), (5, 7), (12, 4)])
def test_winograd_is_exact_in_float64(tile, size):
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(fastconv.winograd_conv3x3(x, w, b, tile=tile), F.conv2d(x, w, b, padding=1))


def test_winograd_gradients_match_direct_convolution():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    fastconv.winograd_conv3x3(x, w, None).square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    F.conv2d(x, w, padding=1).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("fused", [True, False], ids=["native", "pytorch"])
def test_conv_layer_uses_winograd_and_stays_exact(fused, monkeypatch):
    if not fused:  # the PyTorch Winograd path, for 256+ channels only
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        pytest.skip("native kernels unavailable here (no C compiler)")
    else:
        monkeypatch.setenv("FLEXUNET_NATIVE", "1")  # on any CPU, not only where they are the default
    layer = Conv2dSame(256, 256, 3).eval()
    x = torch.randn(2, 256, 12, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = layer(x)
        reference = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    assert float((fast.double() - reference).abs().max() / reference.abs().max()) < 5e-5  # F(4x4, 3x3) in float32
    # The transformed kernel is cached for inference.
    assert ops.CACHE.kinds(layer.weight) == [("winograd" if fused else "torch-winograd", torch.float32)]
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place update invalidates the cache
        again = layer(x)
    torch.testing.assert_close(again - layer.bias.view(1, -1, 1, 1),
                               2 * (fast - layer.bias.view(1, -1, 1, 1)), atol=1e-4, rtol=1e-4)


def test_unet_fast_path_equals_the_plain_path(monkeypatch):
    """A UNet with 256+ channel layers (Winograd) and transposed convolutions, eager vs plain ops."""
    torch.manual_seed(0)
    model = flexunet.UNet(filters=64, down_blocks=3, up_blocks=3).eval()
    x = torch.rand(2, 1, 48, 48)
    with torch.inference_mode():
        fast = model(x)
        monkeypatch.setattr(kernels, "_eligible", lambda x: False)
        plain = model(x)
    assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-5


def test_bfloat16_autocast_stays_within_two_percent():
    """Every 3x3 layer on bfloat16 Winograd F(4x4, 3x3) (tiles and kernels rounded to bfloat16)."""
    torch.manual_seed(0)
    model = flexunet.UNet(filters=32, down_blocks=4, up_blocks=4).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - ref).abs().max() / ref.abs().max()) < 0.02
