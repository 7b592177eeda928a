"""TensorFlow-exact primitives, checked against literal NumPy versions of TF's definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexunet.nn.layers import ConvTranspose2dSame, Conv2dSame, MaxPool2dSame, Upsample
from tests import tf_oracle

RNG = np.random.default_rng(0)


def to_nchw(a):
    return torch.from_numpy(a).float().permute(0, 3, 1, 2)


def to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).double().numpy()


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_conv_same_padding_matches_tf(kernel, size):
    x = RNG.standard_normal((2, *size, 3))
    k = RNG.standard_normal((kernel, kernel, 3, 4))
    b = RNG.standard_normal(4)
    layer = Conv2dSame(3, 4, kernel)
    layer.weight.data = torch.from_numpy(k.transpose(3, 2, 0, 1)).float()
    layer.bias.data = torch.from_numpy(b).float()
    np.testing.assert_allclose(to_nhwc(layer(to_nchw(x))), tf_oracle.conv2d_same(x, k, b), atol=1e-4)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (4, 2), (5, 2), (1, 2), (1, 3), (2, 3), (3, 3), (5, 3), (6, 4), (3, 1)])
@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
def test_transposed_conv_same_padding_matches_tf(kernel, stride, size):
    x = RNG.standard_normal((2, *size, 3))
    k = RNG.standard_normal((kernel, kernel, 4, 3))  # Keras layout (kh, kw, out, in)
    b = RNG.standard_normal(4)
    layer = ConvTranspose2dSame(3, 4, kernel, stride)
    layer.weight.data = torch.from_numpy(k.transpose(3, 2, 0, 1)).float()
    layer.bias.data = torch.from_numpy(b).float()
    ours = to_nhwc(layer(to_nchw(x)))
    assert ours.shape == (2, size[0] * stride, size[1] * stride, 4)
    np.testing.assert_allclose(ours, tf_oracle.conv2d_transpose_same(x, k, b, stride), atol=1e-4)


def test_pytorch_default_transposed_padding_would_be_one_pixel_off():
    """The usual padding=1, output_padding=1 crops the wrong side for k=3, s=2."""
    x = RNG.standard_normal((1, 4, 4, 2))
    k = RNG.standard_normal((3, 3, 2, 2))
    naive = torch.nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1)
    naive.weight.data = torch.from_numpy(k.transpose(3, 2, 0, 1)).float()
    naive.bias.data.zero_()
    reference = tf_oracle.conv2d_transpose_same(x, k, np.zeros(2), 2)
    assert np.abs(to_nhwc(naive(to_nchw(x))) - reference).max() > 1e-2


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("size", [(8, 8), (7, 5), (1, 3)])
def test_max_pool_same_matches_tf(stride, size):
    x = RNG.standard_normal((2, *size, 3))
    np.testing.assert_allclose(to_nhwc(MaxPool2dSame(stride)(to_nchw(x))), tf_oracle.max_pool_same(x, stride), atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bilinear_upsampling_uses_half_pixel_centres(scale):
    x = RNG.standard_normal((2, 3, 5, 2))
    ours = to_nhwc(Upsample(scale, "bilinear")(to_nchw(x)))
    np.testing.assert_allclose(ours, tf_oracle.resize_bilinear_half_pixel(x, scale), atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3])
def test_nearest_upsampling_repeats_pixels(scale):
    x = RNG.standard_normal((1, 3, 4, 2))
    np.testing.assert_allclose(to_nhwc(Upsample(scale, "nearest")(to_nchw(x))), tf_oracle.resize_nearest(x, scale), atol=0)


@pytest.mark.parametrize("mode", ["1", "0", None])
@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "sigmoid"])
def test_every_activation_follows_the_convolution_on_every_kernel_path(monkeypatch, mode, activation):
    """Native kernels (FLEXUNET_NATIVE=1), PyTorch's (0) or the measured choice: ReLU is fused, others follow."""
    if mode is None:
        monkeypatch.delenv("FLEXUNET_NATIVE", raising=False)
    else:
        monkeypatch.setenv("FLEXUNET_NATIVE", mode)
    torch.manual_seed(1)
    layer = Conv2dSame(20, 32, 3, activation=activation).eval()
    x, skip = torch.randn(2, 12, 6, 7), torch.randn(2, 8, 12, 14)
    act = {"linear": lambda t: t, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    want = act(F.conv2d(torch.cat([skip, up], 1), layer.weight, layer.bias, padding=1))
    with torch.inference_mode():
        got = layer(x, skip, "bilinear")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
