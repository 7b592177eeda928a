"""Slow, literal NumPy versions of TensorFlow's definitions (NHWC, 'same' padding).

Written from TensorFlow's documented formulas, independently of flexunet's
layers, to check kernel sizes and strides the reference files do not cover.
"""

import math

import numpy as np


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'same': output ceil(size / stride); the odd pixel of padding goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d_same(x, kernel, bias):
    """x (N, H, W, Cin), kernel (kh, kw, Cin, Cout), stride 1."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    (t, b), (l, r) = same_pads(h, kh, 1), same_pads(w, kw, 1)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    out = np.zeros((n, h, w, cout))
    for i in range(h):
        for j in range(w):
            patch = xp[:, i : i + kh, j : j + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out + bias


def max_pool_same(x, stride, pool=2):
    n, h, w, c = x.shape
    (t, b), (l, r) = same_pads(h, pool, stride), same_pads(w, pool, stride)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-np.inf)
    oh, ow = math.ceil(h / stride), math.ceil(w / stride)
    out = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j, :] = xp[:, i * stride : i * stride + pool, j * stride : j * stride + pool, :].max(axis=(1, 2))
    return out


def conv2d_transpose_same(x, kernel, bias, stride):
    """x (N, H, W, Cin), kernel (kh, kw, Cout, Cin) as Keras stores it; output H*stride.

    The transpose (gradient) of a 'same' strided convolution from an output of
    size H*stride: scatter every input pixel through the kernel, then crop the
    forward convolution's padding (before = total // 2) from the full result.
    """
    n, h, w, _ = x.shape
    kh, kw, cout, _ = kernel.shape
    oh, ow = h * stride, w * stride
    full = np.zeros((n, (h - 1) * stride + kh, (w - 1) * stride + kw, cout))
    for i in range(h):
        for j in range(w):
            contrib = np.tensordot(x[:, i, j, :], kernel, axes=([1], [3]))  # (N, kh, kw, Cout)
            full[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :] += contrib
    top = same_pads(oh, kh, stride)[0]
    left = same_pads(ow, kw, stride)[0]
    out = np.zeros((n, oh, ow, cout))
    crop = full[:, top : top + oh, left : left + ow, :]
    out[:, : crop.shape[1], : crop.shape[2], :] = crop
    return out + bias


def resize_bilinear_half_pixel(x, scale):
    """tf.image.resize(method='bilinear') as UpSampling2D uses it (half-pixel centres)."""
    n, h, w, c = x.shape
    out = np.empty((n, h * scale, w * scale, c))

    def taps(size, i):
        src = (i + 0.5) / scale - 0.5
        lo = math.floor(src)
        frac = src - lo
        return min(max(lo, 0), size - 1), min(max(lo + 1, 0), size - 1), frac

    for i in range(h * scale):
        y0, y1, fy = taps(h, i)
        for j in range(w * scale):
            x0, x1, fx = taps(w, j)
            top = x[:, y0, x0] * (1 - fx) + x[:, y0, x1] * fx
            bottom = x[:, y1, x0] * (1 - fx) + x[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out


def resize_nearest(x, scale):
    return x.repeat(scale, axis=1).repeat(scale, axis=2)
