"""flexunet's operators, registered with PyTorch (`torch.ops.flexunet.*`).

Each operator has one meaning, stated in TensorFlow's terms, and picks its
fastest implementation at run time:

* `conv3x3(x, weight, bias, dtype, cache, relu=False, skip=None, upsample="none")`:
  3x3 stride-1 convolution with one zero pixel of padding on every side
  (TensorFlow's 'same' for k=3), computed in `dtype`, of `cat([skip, upsample(x)])`
  (SLEAP's decoder input: `x` upsampled by 2, bilinear or nearest, after the skip),
  rectified if `relu`. Native kernels where they apply (fused Winograd, which forms
  the joined input while reading it; direct for 1-4 input channels), Winograd as
  batched matrix products from 256 channels, else oneDNN's direct convolution.
* `conv3x3_weight_grad(x, grad, skip, upsample)` and `upsample2x_backward(grad,
  start, mode)`: the weight gradient of `conv3x3` and the adjoint of the upsampling,
  which its autograd formula calls (native kernels, else ATen).
* `max_pool2x2(x)`: TensorFlow's 'same' 2x2 max pooling (inference, native or ATen's
  by measurement; training keeps ATen's, whose backward needs its indices).
* `conv_transpose_same(x, weight, bias, stride, crop, dtype)`: the transposed
  convolution of `x` (N, Cin, H, W) with `weight` (Cin, Cout, k, k), of which the
  rows and columns `crop .. crop + H * stride` are kept (TensorFlow: `crop =
  max(k - stride, 0) // 2`; sleap-nn: `(k - 1) // 2`). Native kernel for
  TensorFlow's k=3, s=2, else one matrix product per input shift.

All return channels-last tensors. Each has a fake (meta) implementation, so
`torch.compile(fullgraph=True)` keeps them as single nodes and fuses around them;
`conv3x3` also has an autograd formula (its input gradient is the same operator
with the kernel flipped). In inference, transformed, packed or cast weights are
cached per weight tensor and refreshed whenever it changes (`WeightCache`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from flexunet.kernels import choice, fastconv, native

# 3x3 convolutions with at least this many input and output channels use the PyTorch Winograd
# path when the native kernels are unavailable: below it oneDNN's direct convolution is faster.
TORCH_WINOGRAD_MIN_CHANNELS = 256
# The native weight gradient (Winograd space) needs enough 4x4 output tiles to amortise its
# per-call work on the (36, Cin, Cout) sums, and more than 16 channels (below, the transforms
# dominate). Measured, 2 threads, native vs oneDNN: 384->128 @64x64 batch 2 (512 tiles) 19 vs 36 ms,
# 256->256 @32x32 (128 tiles) 9.6 vs 11.6 ms, 24->24 @192x192 batch 16 34 vs 40 ms; but
# 512->512 @16x16 (32 tiles) 26 vs 14 ms, 182->182 @6x6 batch 16 (64 tiles) 3.0 vs 1.8 ms,
# 16->16 @512x512 batch 2 13.9 vs 11.9 ms.
NATIVE_WEIGHT_GRAD_MIN_TILES = 128
NATIVE_WEIGHT_GRAD_MAX_NARROW = 16
# In bfloat16, layers of at most this many input and output channels (not joined to a skip or an
# upsampled input) run on oneDNN's direct bfloat16 convolution: there the Winograd transforms cost
# as much as the products. Measured, 2 threads, whole bf16 autocast UNets with the threshold at
# 0 / 16 / 24 / 32 (ms): SLEAP baseline.centroid 71.2 / 69.4 / 70.0 / 74.2, large_rf.topdown
# 71.0 / 69.4 / 71.8 / 72.0, large_rf.single 91.4 / 96.5 / 96.5 / 102.6, sleap-nn bottomup
# 49.3 / 47.4 / 47.0 / 46.3; the ten profiles of benchmarks/bench_profiles.py within 3% of the best at 16.
NARROW_BF16_CHANNELS = 16
# Measured choices also time Winograd as batched products for layers this wide (below, it never won).
WINOGRAD_CANDIDATE_MIN_CHANNELS = 128
CHANNELS_LAST = torch.channels_last


class WeightCache:
    """Values derived from a weight tensor (transforms, packs, casts), kept while it is unchanged.

    Entries are keyed by the tensor object and recomputed when its data pointer
    or in-place version changes (an optimizer step); they go when the tensor does.
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, weight: torch.Tensor, kind: tuple, make: Callable[[], object]):
        # Inference tensors have no version counter; they cannot change in place outside inference mode.
        state = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        key = id(weight)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not weight:
            ref = weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None))
            entry = (ref, {})
            self._entries[key] = entry
        values = entry[1]
        if kind not in values or values[kind][0] != state:
            values[kind] = (state, make())
        return values[kind][1]

    def kinds(self, weight: torch.Tensor) -> list[tuple]:
        """What is cached for `weight` (e.g. `[("winograd", torch.float32)]`)."""
        entry = self._entries.get(id(weight))
        return list(entry[1]) if entry is not None and entry[0]() is weight else []

    def discard(self, weight: torch.Tensor, *kinds: tuple) -> None:
        """Drop what is cached for `weight` under `kinds` (a measured choice's losing candidates)."""
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0]() is weight:
            for kind in kinds:
                entry[1].pop(kind, None)

    def nbytes(self) -> int:
        """Bytes held by every cached tensor."""
        return sum(value.nbytes for entry in self._entries.values() for _, value in entry[1].values()
                   if isinstance(value, torch.Tensor))

    def clear(self) -> None:
        self._entries.clear()


CACHE = WeightCache()


def _derived(weight: torch.Tensor, kind: tuple, make: Callable[[], torch.Tensor], cache: bool) -> torch.Tensor:
    """`make()`, kept in `CACHE` when `cache` (inference). Training changes the weights every step:
    keeping a transformed copy of each between steps would only hold memory."""
    return CACHE.get(weight, kind, make) if cache else make()


def _cast(weight: torch.Tensor, dtype: torch.dtype, cache: bool) -> torch.Tensor:
    if weight.dtype == dtype:
        return weight
    return _derived(weight, ("cast", dtype), lambda: weight.detach().to(dtype), cache)


def _bias(bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if bias is None else bias.to(dtype)


# ---------------------------------------------------------------- conv3x3

@torch.library.custom_op("flexunet::conv3x3", mutates_args=(), device_types="cpu")
def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, cache: bool,
            relu: bool = False, skip: Optional[torch.Tensor] = None, upsample: str = "none") -> torch.Tensor:
    """3x3 'same' convolution, in `dtype`, of `cat([skip, upsample(x)])`: `x` upsampled by 2
    ("bilinear", half-pixel centres, or "nearest"; "none" keeps it) and joined after `skip`
    (if given), as SLEAP's decoder blocks feed their first convolution; rectified if `relu`.
    `weight` is (Cout, Cskip + Cx, 3, 3); `cache` keeps the transformed weight (inference)."""
    with torch.autocast("cpu", enabled=False):  # exactly `dtype`, whatever the caller's autocast state
        return _conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample)


def _upsampled_input(x: torch.Tensor, skip: Optional[torch.Tensor], upsample: str) -> torch.Tensor:
    """`cat([skip, upsample(x)])` as tensors: what the native kernel forms on the fly."""
    if upsample != "none":
        options = {"align_corners": False} if upsample == "bilinear" else {}
        x = F.interpolate(x, scale_factor=2, mode=upsample, **options)
    return x if skip is None else torch.cat([skip.to(x.dtype), x], dim=1)


def _conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample):
    cout, cin = weight.shape[:2]
    joined = skip is not None or upsample != "none"
    native_ok = native.supports_dtype(dtype)
    if native.mode() == "measure":  # the fastest, timed once per shape (inference and training apart)
        key = choice.conv3x3_key(x, cout, dtype, relu, skip, upsample, cache)
        args = (x, weight, bias, dtype, cache, relu, skip, upsample)
        candidates = {"onednn": lambda: _onednn_conv3x3(*args)}
        kinds = {"native": [("winograd", dtype), ("direct",)], "onednn": [("onednn", dtype)],
                 "onednn relu": [("onednn", dtype)], "winograd": [("torch-winograd", dtype)]}
        if relu and fused_relu_available(dtype):
            candidates["onednn relu"] = lambda: _onednn_conv3x3(*args, fused=True)
        if native_ok:
            candidates["native"] = lambda: _native_conv3x3(*args)
        if min(cin, cout) >= WINOGRAD_CANDIDATE_MIN_CHANNELS:
            candidates["winograd"] = lambda: _winograd_conv3x3(*args)
        if dtype == torch.bfloat16 and not native.has_bfloat16() and native.available():
            # Without bfloat16 hardware oneDNN emulates it (~10x slower than float32): a bfloat16 layer
            # may compute in float32 on the native kernels, its result rounded to bfloat16 (more exact).
            candidates["native fp32"] = lambda: _in_float32(_native_conv3x3, *args)
            kinds["native fp32"] = [("winograd", torch.float32), ("direct",)]
            if bfloat16_emulated():  # not worth a warm-up run each (seconds on wide layers)
                candidates.pop("onednn"), candidates.pop("winograd", None)
        return _fastest(key, candidates, weight, kinds, cache)
    narrow_bf16 = (dtype == torch.bfloat16 and max(cin, cout) <= NARROW_BF16_CHANNELS and not joined
                   and cin > native.DIRECT_MAX_CHANNELS)
    if native_ok and native.mode() == "native" and not narrow_bf16:
        return _native_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample)
    return _torch_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample)


def _fastest(key: str, candidates: dict, weight: torch.Tensor, kinds: dict, cache: bool) -> torch.Tensor:
    """`choice.CHOICES.run(key, candidates)`; when it measured (and `cache`), only the winner's derived
    weights are kept: `kinds` names the `CACHE` entries of each candidate."""
    measured = len(candidates) > 1 and not choice.CHOICES.known(key, candidates)
    y = choice.CHOICES.run(key, candidates)
    if measured and cache:
        keep = set(kinds.get(choice.CHOICES.get(key), []))
        CACHE.discard(weight, *(kind for held in kinds.values() for kind in held if kind not in keep))
    return y


def _in_float32(conv, x, weight, bias, dtype, cache, relu, skip, upsample):
    """`conv` computed in float32 on float32 operands, its output rounded to `dtype`."""
    y = conv(x.float(), weight, bias, torch.float32, cache, relu, None if skip is None else skip.float(), upsample)
    return y.to(dtype)


def _native_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample):
    """Direct for an image's few channels, else the fused Winograd kernel (joined input formed while read)."""
    cout, cin = weight.shape[:2]
    if skip is None and upsample == "none" and cin <= native.DIRECT_MAX_CHANNELS:
        packed = _derived(weight, ("direct",), lambda: native.pack_direct(weight), cache)
        return native.direct_conv3x3(x, packed, bias, cout, relu, dtype)
    packed = _derived(weight, ("winograd", dtype), lambda: native.transform_kernel(weight, dtype), cache)
    return native.winograd_conv3x3(x, packed, bias, cout, relu, skip, None if upsample == "none" else upsample)


def _torch_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample):
    """Without measurement: Winograd as batched products from 256 channels, else oneDNN's convolution."""
    if min(weight.shape[:2]) >= TORCH_WINOGRAD_MIN_CHANNELS:
        return _winograd_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample)
    return _onednn_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample)


def _onednn_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample, fused=False):
    """oneDNN's convolution on channels-last memory (AMX or AVX-512 bfloat16 where the CPU has them);
    `fused`: its ReLU as oneDNN's post-op (`mkldnn::_convolution_pointwise`, which sets up its
    primitive at every call: faster on large maps only, so a candidate of its own)."""
    x = _upsampled_input(x.to(dtype), skip, upsample).contiguous(memory_format=CHANNELS_LAST)
    # A channels-last weight makes oneDNN write channels-last output, even for an image's 1-3 channels.
    w = _derived(weight, ("onednn", dtype), lambda: weight.detach().to(dtype).contiguous(memory_format=CHANNELS_LAST),
                 cache)
    b = _bias(bias, dtype)
    if fused:
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")
    else:
        y = F.conv2d(x, w, b, padding=1)
        y = torch.relu_(y) if relu else y
    return y.contiguous(memory_format=CHANNELS_LAST)


@functools.lru_cache(maxsize=None)
def fused_relu_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's convolution with a fused ReLU runs here in `dtype` (tried once on a tiny input)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    x = torch.ones(1, 2, 3, 3, dtype=dtype).contiguous(memory_format=CHANNELS_LAST)
    w = torch.ones(2, 2, 3, 3, dtype=dtype).contiguous(memory_format=CHANNELS_LAST)
    try:
        torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")
    except RuntimeError:  # e.g. bfloat16 on CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT
        return False
    return True


@functools.lru_cache(maxsize=None)
def bfloat16_emulated() -> bool:
    """Whether oneDNN has no bfloat16 kernels for this CPU (none of AVX-512 BW/VL/DQ, AVX512-BF16, AMX,
    AVX-NE-CONVERT): it emulates bfloat16, about 10x slower than float32, so bfloat16 layers are not timed
    on it where float32 candidates exist."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _winograd_conv3x3(x, weight, bias, dtype, cache, relu, skip, upsample):
    """Winograd as batched matrix products (`fastconv`), for wide layers."""
    x = _upsampled_input(x.to(dtype), skip, upsample).contiguous(memory_format=CHANNELS_LAST)
    tile = fastconv.winograd_tile(dtype)
    kernel = _derived(weight, ("torch-winograd", dtype),
                      lambda: fastconv.winograd_kernel(weight.detach().float(), tile).to(dtype), cache)
    y = fastconv.winograd_conv3x3(x, weight, bias, kernel=kernel, tile=tile)
    y = torch.relu_(y) if relu else y
    return y.contiguous(memory_format=CHANNELS_LAST)


@conv3x3.register_fake
def _(x, weight, bias, dtype, cache, relu=False, skip=None, upsample="none"):
    factor = 1 if upsample == "none" else 2
    return torch.empty((x.shape[0], weight.shape[0], x.shape[2] * factor, x.shape[3] * factor), dtype=dtype,
                       device=x.device, memory_format=CHANNELS_LAST)


def _conv3x3_setup(ctx, inputs, output):
    x, weight, bias, dtype, _, relu, skip, upsample = inputs
    ctx.save_for_backward(x, weight, skip, output if relu else None)
    ctx.has_bias, ctx.dtype, ctx.upsample = bias is not None, dtype, upsample


def _conv3x3_backward(ctx, grad):
    x, weight, skip, output = ctx.saved_tensors
    grad = grad.contiguous(memory_format=CHANNELS_LAST)  # as the output: elementwise passes stay fast
    if output is not None:  # through the fused ReLU: one pass, as ReLU's own backward
        grad = torch.ops.aten.threshold_backward(grad, output, 0)
    grad_x = grad_w = grad_b = grad_skip = None
    need_x, need_skip = ctx.needs_input_grad[0], skip is not None and ctx.needs_input_grad[6]
    if need_x or need_skip:
        # The input gradient of a 'same' 3x3 convolution is one too: kernel flipped, channels swapped.
        grad_in = torch.ops.flexunet.conv3x3(grad, weight.flip(2, 3).transpose(0, 1), None, ctx.dtype, False)
        cs = 0 if skip is None else skip.shape[1]
        grad_skip = grad_in[:, :cs] if need_skip else None
        if need_x and ctx.upsample != "none":  # the adjoint of the upsampling
            grad_x = torch.ops.flexunet.upsample2x_backward(grad_in, cs, ctx.upsample)
        elif need_x:
            grad_x = grad_in[:, cs:]
    need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    grad_b = grad.sum((0, 2, 3)).to(weight.dtype) if need_b else None
    if need_w:
        grad_w = torch.ops.flexunet.conv3x3_weight_grad(x, grad, skip, ctx.upsample).to(weight.dtype)
    return grad_x, grad_w, grad_b, None, None, None, grad_skip, None


@torch.library.custom_op("flexunet::upsample2x_backward", mutates_args=(), device_types="cpu")
def upsample2x_backward(grad: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    """The gradient of a source upsampled by 2 (`mode` "bilinear" or "nearest", as `F.interpolate`)
    whose upsampled copy is channels `start:` of `grad`; computed from `grad` in place (no slice copy)."""
    if grad.dtype == torch.float32 and native.mode() == "measure":
        return choice.CHOICES.run(choice.upsample_adjoint_key(grad, start, mode), {
            "native": lambda: native.upsample2x_adjoint(grad, start, mode),
            "torch": lambda: _torch_upsample2x_backward(grad, start, mode)})
    if grad.dtype == torch.float32 and native.mode() == "native":
        return native.upsample2x_adjoint(grad, start, mode)
    return _torch_upsample2x_backward(grad, start, mode)


def _torch_upsample2x_backward(grad: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    part = grad[:, start:]
    size, shape = [int(s) for s in part.shape[2:]], [part.shape[0], part.shape[1], part.shape[2] // 2, part.shape[3] // 2]
    if mode == "bilinear":
        out = torch.ops.aten.upsample_bilinear2d_backward.default(part, size, shape, False, None, None)
    else:
        out = torch.ops.aten.upsample_nearest2d_backward.default(part, size, shape, None, None)
    return out.contiguous(memory_format=CHANNELS_LAST)


@upsample2x_backward.register_fake
def _(grad, start, mode):
    return torch.empty((grad.shape[0], grad.shape[1] - start, grad.shape[2] // 2, grad.shape[3] // 2),
                       dtype=grad.dtype, device=grad.device, memory_format=CHANNELS_LAST)


@torch.library.custom_op("flexunet::conv3x3_weight_grad", mutates_args=(), device_types="cpu")
def conv3x3_weight_grad(x: torch.Tensor, grad: torch.Tensor, skip: Optional[torch.Tensor],
                        upsample: str) -> torch.Tensor:
    """The weight gradient (Cout, Cskip + Cx, 3, 3) of `conv3x3(x, ..., skip=skip, upsample=upsample)`
    whose output gradient is `grad`."""
    with torch.autocast("cpu", enabled=False):
        n, cout, h, w = grad.shape
        tiles, cin = n * -(-h // 4) * -(-w // 4), x.shape[1] + (0 if skip is None else skip.shape[1])
        if native.mode() == "measure" and (x.dtype == torch.float32 or not native.has_bfloat16()):
            # bfloat16 without bfloat16 hardware: the native float32 kernel is a candidate, as in the forward.
            return choice.CHOICES.run(choice.weight_grad_key(x, grad, skip, upsample), {
                "native": lambda: _native_weight_grad(x, grad, skip, upsample).to(x.dtype),
                "torch": lambda: _torch_weight_grad(x, grad, skip, upsample)})
        if (x.dtype == torch.float32 and native.mode() == "native" and tiles >= NATIVE_WEIGHT_GRAD_MIN_TILES
                and min(cin, cout) > NATIVE_WEIGHT_GRAD_MAX_NARROW):
            return _native_weight_grad(x, grad, skip, upsample)
        return _torch_weight_grad(x, grad, skip, upsample)


def _native_weight_grad(x, grad, skip, upsample):
    """In Winograd space, the joined input formed while reading, as in the forward pass."""
    return native.winograd_weight_grad(x, grad, skip, None if upsample == "none" else upsample)


def _torch_weight_grad(x, grad, skip, upsample):
    """ATen's weight gradient of the convolution of the joined input (Winograd products from 256 channels)."""
    inputs = _upsampled_input(x, skip, upsample)  # recomputed: cheaper than keeping it
    if min(inputs.shape[1], grad.shape[1]) >= TORCH_WINOGRAD_MIN_CHANNELS and x.dtype == torch.float32:
        return fastconv.winograd_weight_grad(inputs, grad)  # one batched product in Winograd space
    weight_shape = [grad.shape[1], inputs.shape[1], 3, 3]
    return torch.ops.aten.convolution_backward(grad.to(x.dtype), inputs, inputs.new_empty(weight_shape), None,
                                               [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]


@conv3x3_weight_grad.register_fake
def _(x, grad, skip, upsample):
    cin = x.shape[1] + (0 if skip is None else skip.shape[1])
    return x.new_empty((grad.shape[1], cin, 3, 3))


conv3x3.register_autograd(_conv3x3_backward, setup_context=_conv3x3_setup)


# ---------------------------------------------------------------- max_pool2x2


@torch.library.custom_op("flexunet::max_pool2x2", mutates_args=(), device_types="cpu")
def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2 and TensorFlow's 'same' padding (windows clipped at the
    bottom/right): (N, C, ceil(H / 2), ceil(W / 2)), NaN propagated."""
    mode = native.mode()
    if not native.supports_dtype(x.dtype) or mode == "torch":
        return _torch_max_pool2x2(x)
    if mode == "native":
        return native.max_pool2x2(x)
    return choice.CHOICES.run(choice.pool_key(x), {"native": lambda: native.max_pool2x2(x),
                                                   "torch": lambda: _torch_max_pool2x2(x)})


def _torch_max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True).contiguous(memory_format=CHANNELS_LAST)


@max_pool2x2.register_fake
def _(x):
    return torch.empty((x.shape[0], x.shape[1], (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2), dtype=x.dtype,
                       device=x.device, memory_format=CHANNELS_LAST)


# ---------------------------------------------------- conv_transpose_same


@torch.library.custom_op("flexunet::conv_transpose_same", mutates_args=(), device_types="cpu")
def conv_transpose_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, crop: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Transposed convolution of `x` by `stride`, rows/columns `crop .. crop + H * stride` kept, in `dtype`."""
    with torch.autocast("cpu", enabled=False):
        return _conv_transpose_same(x, weight, bias, stride, crop, dtype)


def _conv_transpose_same(x, weight, bias, stride, crop, dtype):
    cin, cout, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    keras_k3s2 = k == 3 and stride == 2 and crop == 0
    native_ok = keras_k3s2 and native.supports_transposed(dtype, cin, cout, k, stride)
    if native.mode() == "measure":
        key = choice.transposed_key(x, cout, dtype, bias is not None, k, stride, crop)
        candidates = {"gemm": lambda: _torch_conv_transpose(x, weight, bias, stride, crop, dtype),
                      "onednn": lambda: _onednn_conv_transpose(x, weight, bias, stride, crop, dtype)}
        kinds = {"gemm": [("cast", dtype)], "onednn": [("cast", dtype)], "native": [("transposed", dtype)],
                 "native fp32": [("transposed", torch.float32)], "gemm fp32": []}
        if native_ok:
            candidates["native"] = lambda: _native_conv_transpose(x, weight, bias, dtype)
        if dtype == torch.bfloat16:
            # Where bfloat16 is emulated (no AVX512-BF16 or AMX) it runs ~10x slower than float32: float32
            # candidates, their results rounded to bfloat16 (more exact), measured against it.
            candidates["gemm fp32"] = lambda: _torch_conv_transpose(x, weight, bias, stride, crop,
                                                                    torch.float32).to(dtype)
            if keras_k3s2 and not native_ok and native.supports_transposed(torch.float32, cin, cout, k, stride):
                candidates["native fp32"] = lambda: _native_conv_transpose(x.float(), weight, bias,
                                                                           torch.float32).to(dtype)
            if bfloat16_emulated():
                candidates.pop("gemm"), candidates.pop("onednn")
        return _fastest(key, candidates, weight, kinds, cache=True)
    if not native_ok or native.mode() == "torch":
        return _torch_conv_transpose(x, weight, bias, stride, crop, dtype)
    return _native_conv_transpose(x, weight, bias, dtype)


def _native_conv_transpose(x, weight, bias, dtype):
    packed = _derived(weight, ("transposed", dtype), lambda: native.pack_transposed(weight, dtype), True)
    return native.transposed_conv_k3s2(x, packed, bias)


def _onednn_conv_transpose(x, weight, bias, stride, crop, dtype):
    """oneDNN's transposed convolution on channels-last memory, cropped to TensorFlow's 'same' window."""
    x = x.to(dtype).contiguous(memory_format=CHANNELS_LAST)
    h, w, k = x.shape[2] * stride, x.shape[3] * stride, weight.shape[-1]
    # The full output has (H - 1) * s + k rows; the window may reach `crop + s - k` rows past it
    # (k < s + crop), which output_padding adds (rows with the bias alone).
    extra = max(crop + stride - k, 0)
    full = F.conv_transpose2d(x, _cast(weight, dtype, True), _bias(bias, dtype), stride=stride, output_padding=extra)
    return full[:, :, crop:crop + h, crop:crop + w].contiguous(memory_format=CHANNELS_LAST)


def _torch_conv_transpose(x, weight, bias, stride, crop, dtype):
    x = x.to(dtype).contiguous(memory_format=CHANNELS_LAST)
    return fastconv.transposed_conv(x, _cast(weight, dtype, True), _bias(bias, dtype), stride, crop)


@conv_transpose_same.register_fake
def _(x, weight, bias, stride, crop, dtype):
    return torch.empty((x.shape[0], weight.shape[1], x.shape[2] * stride, x.shape[3] * stride), dtype=dtype,
                       device=x.device, memory_format=CHANNELS_LAST)
