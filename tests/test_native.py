"""The fused native Winograd kernel: exact, used by default where it pays off (AVX-512), and optional.

Every test here runs the kernels, on any CPU (`FLEXUNET_NATIVE=1`): built for AVX2 they are slower
than the PyTorch paths, and not the default there, but they must be exact everywhere.
"""

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flexunet
from flexunet.kernels import fastconv, native, ops

if not native.available():
    if os.environ.get("CI"):
        raise RuntimeError("CI runs on a machine with a C compiler: the native kernels must build there.")
    pytest.skip("native kernels unavailable here (no C compiler)", allow_module_level=True)


@pytest.fixture(autouse=True)
def native_kernels_on(monkeypatch):
    monkeypatch.setenv("FLEXUNET_NATIVE", "1")


def test_unset_the_kernels_are_measured_and_the_switch_forces_them(monkeypatch):
    monkeypatch.delenv("FLEXUNET_NATIVE")
    assert native.mode() == "measure"
    monkeypatch.setenv("FLEXUNET_NATIVE", "1")
    assert native.mode() == "native"
    monkeypatch.setenv("FLEXUNET_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.mode() == "torch"
    finally:
        native.library.cache_clear()


def _native(x, weight, bias, relu=False, dtype=torch.float32, skip=None, upsample=None):
    packed = native.transform_kernel(weight, dtype)
    return native.winograd_conv3x3(x, packed, bias, weight.shape[0], relu=relu, skip=skip, upsample=upsample)


def _reference(x, weight, bias, skip=None, upsample=None):
    """cat([skip, upsample(x)]) convolved, in float64."""
    x = x.double()
    if upsample is not None:
        x = F.interpolate(x, scale_factor=2, mode=upsample, **({"align_corners": False} if upsample == "bilinear" else {}))
    if skip is not None:
        x = torch.cat([skip.double(), x], dim=1)
    return F.conv2d(x, weight.double(), None if bias is None else bias.double(), padding=1)


# bfloat16 Winograd F(4x4, 3x3) rounds the transformed tiles and kernel to bfloat16: in the worst
# pixel each costs about 1% of the largest output, several times a bfloat16 convolution's error.
BF16_WINOGRAD = 4e-2


SHAPES = [
    (1, 16, 64, 1, 1),  # a single pixel: every tap but the centre is padding
    (2, 16, 64, 5, 7),  # partial tiles at the bottom and right
    (3, 32, 128, 8, 8),  # whole tiles
    (1, 64, 64, 37, 29),  # odd sizes, more tiles than one block
    (2, 48, 192, 13, 4),
    (1, 16, 16, 6, 5),  # one narrow panel
    (2, 32, 112, 7, 9),  # a full panel and a 48-wide one
    (1, 1024, 64, 6, 6),  # deep input: small blocks
    (2, 24, 36, 9, 11),  # filters=24, rate 1.5: channel panels padded inside the kernel
    (1, 54, 81, 7, 6),
    (2, 5, 7, 6, 6),  # fewer than one vector in and out
    (1, 121, 182, 5, 3),
]


@pytest.mark.parametrize("n,cin,cout,h,w", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_native_winograd_matches_direct_convolution(n, cin, cout, h, w, bias):
    torch.manual_seed(n * cin + h)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3)
    b = torch.randn(cout) if bias else None
    y = _native(x, weight, b)
    ref = _reference(x, weight, b)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6 * max(1, cin ** 0.5)


# (batch, skip channels or 0, x channels, output channels, output H, W, upsampling)
JOINED = [
    (2, 32, 64, 32, 8, 12, "bilinear"),  # SLEAP's decoder: skip + bilinear x2
    (1, 24, 48, 24, 10, 6, "bilinear"),  # channels not multiples of 16 on both sources
    (2, 54, 81, 54, 6, 14, "bilinear"),
    (1, 17, 5, 70, 6, 10, "nearest"),
    (2, 0, 33, 20, 10, 14, "bilinear"),  # upsampled only, no skip
    (1, 16, 16, 16, 2, 2, "bilinear"),  # one source pixel: every neighbour clamps to the edge
    (1, 16, 32, 40, 8, 8, None),  # a plain concatenation
]


@pytest.mark.parametrize("n,cs,cx,cout,h,w,upsample", JOINED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_winograd_forms_the_upsampled_concatenation_while_reading(n, cs, cx, cout, h, w, upsample, dtype):
    if dtype == torch.bfloat16 and not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(cs + cx + h)
    factor = 2 if upsample else 1
    x = torch.randn(n, cx, h // factor, w // factor)
    skip = torch.randn(n, cs, h, w) if cs else None
    weight, bias = torch.randn(cout, cs + cx, 3, 3), torch.randn(cout)
    y = _native(x.to(dtype), weight, bias, relu=True, dtype=dtype, skip=None if skip is None else skip.to(dtype),
                upsample=upsample)
    ref = torch.relu(_reference(x.to(dtype), weight, bias, None if skip is None else skip.to(dtype), upsample))
    assert y.shape == ref.shape and y.dtype == dtype
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < (BF16_WINOGRAD if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("cin", [1, 2, 3, 4])
@pytest.mark.parametrize("cout", [16, 24, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_kernel_for_few_input_channels(cin, cout, dtype):
    if dtype == torch.bfloat16 and not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(cin * cout)
    x = torch.randn(2, cin, 13, 19)
    weight, bias = torch.randn(cout, cin, 3, 3), torch.randn(cout)
    y = native.direct_conv3x3(x, native.pack_direct(weight), bias, cout, relu=True, dtype=dtype)
    ref = torch.relu(_reference(x, weight, bias))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


BF16_CALLS = {  # every entry point that takes bfloat16, called with it
    "winograd": lambda: native.winograd_conv3x3(torch.zeros(1, 16, 4, 4), torch.zeros(36, 256, dtype=torch.bfloat16),
                                                None, 16),
    "direct": lambda: native.direct_conv3x3(torch.zeros(1, 1, 4, 4), torch.zeros(9, 16), None, 16,
                                            dtype=torch.bfloat16),
    "pooling": lambda: native.max_pool2x2(torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16)),
    "transposed": lambda: native.transposed_conv_k3s2(torch.zeros(1, 16, 4, 4),
                                                      torch.zeros(9, 256, dtype=torch.bfloat16), None),
}


@pytest.mark.parametrize("call", BF16_CALLS)
def test_bfloat16_entry_points_refuse_without_avx512_bf16(call):
    if native.has_bfloat16():
        pytest.skip("this CPU has AVX512-BF16: the bfloat16 kernels run (tested above)")
    with pytest.raises(ValueError, match="AVX512-BF16"):
        BF16_CALLS[call]()


def test_the_library_states_its_contract():
    """Constants come from the built library; every prototype of csrc/flexunet.h is an entry point."""
    lib = native.library()
    if native.march() == "native":  # 64-channel panels where AVX-512's 32 registers hold 24 accumulators
        assert native.panel() == (64 if native._has_avx512() else 16)
    assert native.panel() in (16, 64) and native.register_block() == 6
    assert native.has_bfloat16() == bool(lib.flexunet_has_bf16())
    table = native.signatures()
    assert {"winograd_f43", "winograd_f43_bf16", "winograd_f43_weight_grad", "direct3x3", "max_pool2x2",
            "transposed_k3s2", "transposed_k3s2_bf16", "upsample2x_adjoint", "has_bf16"} == set(table)
    assert len(table["winograd_f43"]) == 14 and table["has_bf16"] == []
    for name, args in table.items():
        assert getattr(lib, f"flexunet_{name}").argtypes == args
    with pytest.raises(RuntimeError, match="neither a pointer nor an int"):
        native.signatures("int flexunet_bad(float scale);")


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")
@pytest.mark.parametrize("name", [p.name for p in native.sources()])
def test_every_source_file_is_in_the_build_key(tmp_path, monkeypatch, name):
    """Changing any source or header changes the library that is built (and so the one that is loaded)."""
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC, csrc)
    monkeypatch.setattr(native, "CSRC", csrc)
    first = native.library_name(native._compiler())
    (csrc / name).write_text((csrc / name).read_text() + "\n/* changed */\n")
    assert native.library_name(native._compiler()) != first


def _rms(y, ref):
    return float((y.double() - ref).pow(2).mean().sqrt() / ref.abs().max())


@pytest.mark.parametrize("n,cin,cout,h,w", SHAPES)
def test_native_bfloat16_winograd_is_near_a_bfloat16_convolution(n, cin, cout, h, w):
    if not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(cin + h)
    x = torch.randn(n, cin, h, w).bfloat16()
    weight, bias = torch.randn(cout, cin, 3, 3), torch.randn(cout)
    y = _native(x, weight, bias, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    direct = F.conv2d(x, weight.bfloat16(), bias.bfloat16(), padding=1)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < BF16_WINOGRAD
    assert _rms(y, ref) < 10 * _rms(direct, ref)  # on average within an order of a bfloat16 rounding


def test_bfloat16_autocast_uses_the_native_kernel(monkeypatch):
    """Layers wider than `ops.NARROW_BF16_CHANNELS` (here all but the first) run the native bfloat16 kernel."""
    if not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(0)
    model = flexunet.UNet(filters=48, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(2, 1, 40, 40)
    dtypes = []
    original = native.winograd_conv3x3

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(native, "winograd_conv3x3", recording)
    with torch.inference_mode():
        ref = model(x)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert dtypes == [torch.bfloat16] * 9 and low.dtype == torch.bfloat16
    assert float((low.float() - ref).abs().max() / ref.abs().max()) < 0.02


def test_native_winograd_fuses_relu_and_keeps_nan():
    x = torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, 16, 3, 3), torch.randn(64)
    plain = _native(x, weight, bias)
    torch.testing.assert_close(_native(x, weight, bias, relu=True), torch.relu(plain))
    x[0, 3, 4, 4] = float("nan")
    y = _native(x, weight, bias, relu=True)
    assert y[0, :, 3:6, 3:6].isnan().all() and not y[0, :, 0, 0].isnan().any()


def test_native_winograd_reads_channels_first_input():
    x = torch.randn(2, 16, 10, 6)  # NCHW, as users pass it
    weight = torch.randn(64, 16, 3, 3)
    torch.testing.assert_close(_native(x, weight, None), F.conv2d(x, weight, padding=1), atol=1e-4, rtol=1e-4)


def test_native_winograd_rejects_what_it_cannot_take():
    assert native.supports_dtype(torch.float32)
    assert not native.supports_dtype(torch.float16)
    packed = native.transform_kernel(torch.zeros(16, 32, 3, 3), torch.float32)
    skip = torch.zeros(1, 16, 6, 6)
    with pytest.raises(ValueError, match="matching source sizes"):  # x upsampled is 8x8, the skip 6x6
        native.winograd_conv3x3(torch.zeros(1, 16, 4, 4), packed, None, 16, skip=skip, upsample="bilinear")


def test_unet_uses_the_native_kernel_by_default(monkeypatch):
    """Inference goes through the fused kernel (by default on AVX-512) and equals the pure-PyTorch path."""
    torch.manual_seed(0)
    model = flexunet.UNet(filters=16, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(2, 1, 40, 40)
    calls = []
    original = native.winograd_conv3x3
    monkeypatch.setattr(native, "winograd_conv3x3", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        fast = model(x)
        assert len(calls) == 9  # all ten 3x3 convolutions but the first (1 input channel)
        monkeypatch.setattr(native, "available", lambda: False)
        plain = model(x)
    assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-5


def test_library_builds_into_the_cache_directory(tmp_path):
    path = native._build(native._compiler(), tmp_path)
    assert path.parent == tmp_path and path.suffix == ".so"
    assert native._build(native._compiler(), tmp_path) == path  # built once, then reused
    # The library and its digest record, no temporary files left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".sha256").name])


def test_without_a_compiler_the_layers_fall_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert native.library() is None
        model = flexunet.UNet(filters=16, down_blocks=1, up_blocks=1).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every call
            with torch.inference_mode():
                assert model(torch.rand(1, 1, 16, 16)).shape == (1, 16, 16, 16)
    finally:
        native.library.cache_clear()


def test_native_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FLEXUNET_NATIVE", "0")
    native.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # switching off is silent
            assert not native.available()
    finally:
        native.library.cache_clear()
    monkeypatch.delenv("FLEXUNET_NATIVE")
    assert native.available()


@pytest.mark.parametrize("n,cin,cout,h,w", [(1, 16, 16, 1, 1), (2, 32, 48, 5, 7), (1, 16, 112, 7, 3),
                                             (2, 64, 64, 13, 9), (1, 128, 80, 6, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_transposed_convolution_matches_tensorflow_semantics(n, cin, cout, h, w, dtype):
    """Against the GEMM path, which tests/test_fastconv.py checks against TensorFlow's definition."""
    if dtype == torch.bfloat16 and not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(cin + w)
    x = torch.randn(n, cin, h, w).to(dtype)
    weight, bias = torch.randn(cin, cout, 3, 3), torch.randn(cout)
    y = native.transposed_conv_k3s2(x, native.pack_transposed(weight, dtype), bias)
    assert y.shape == (n, cout, 2 * h, 2 * w) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = fastconv.transposed_conv(x.double(), weight.double(), bias.double(), 2)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2  # 2e-6: sums of up to 4 x 128 float32 products
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tolerance


def test_transposed_layer_uses_the_native_kernel_and_refreshes_its_cache():
    from flexunet.nn.layers import ConvTranspose2dSame
    layer = ConvTranspose2dSame(32, 16, 3, 2).eval()
    x = torch.randn(2, 32, 5, 6)
    with torch.inference_mode():
        fast = layer(x)
        assert ops.CACHE.kinds(layer.weight) == [("transposed", torch.float32)]
        ref = fastconv.transposed_conv(x, layer.weight, layer.bias, 2)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-1)
        again = layer(x)
    torch.testing.assert_close(again, fastconv.transposed_conv(x, layer.weight, layer.bias, 2), atol=1e-5, rtol=1e-5)


# (batch, skip channels or 0, x channels, output channels, output H, W, upsampling)
WEIGHT_GRADS = [
    (2, 0, 24, 24, 13, 6, None),  # partial tiles, channels not multiples of 16
    (1, 0, 135, 54, 10, 7, None),  # more input channels than a register block
    (2, 0, 5, 70, 9, 9, None),  # two output panels
    (2, 24, 36, 24, 12, 8, "bilinear"),  # a decoder's joined input
    (1, 16, 16, 40, 8, 10, "nearest"),
]


@pytest.mark.parametrize("n,cs,cx,cout,h,w,upsample", WEIGHT_GRADS)
def test_native_weight_gradient_matches_the_direct_one(n, cs, cx, cout, h, w, upsample):
    torch.manual_seed(cx + cout)
    factor = 2 if upsample else 1
    x = torch.randn(n, cx, h // factor, w // factor)
    skip = torch.randn(n, cs, h, w) if cs else None
    grad = torch.randn(n, cout, h, w)
    got = native.winograd_weight_grad(x, grad, skip, upsample)
    joined = x.double()
    if upsample:
        joined = F.interpolate(joined, scale_factor=2, mode=upsample,
                               **({"align_corners": False} if upsample == "bilinear" else {}))
    if skip is not None:
        joined = torch.cat([skip.double(), joined], 1)
    want = torch.ops.aten.convolution_backward(grad.double(), joined, torch.zeros(cout, cs + cx, 3, 3, dtype=torch.float64),
                                               None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert got.shape == want.shape
    assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-5


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("n,channels,h,w,start", [(2, 60, 8, 12, 24), (1, 5, 2, 2, 0), (2, 17, 6, 10, 3), (1, 40, 1, 3, 8)])
def test_upsampling_adjoint_is_the_gradient_of_the_upsampling(mode, n, channels, h, w, start):
    """Read from channels `start:` of the joined gradient in place; equal to autograd through F.interpolate."""
    torch.manual_seed(channels + h)
    x = torch.randn(n, channels - start, h, w, dtype=torch.float64, requires_grad=True)
    up = F.interpolate(x, scale_factor=2, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    grad = torch.randn(n, channels, 2 * h, 2 * w, dtype=torch.float64)
    up.backward(grad[:, start:])
    got = native.upsample2x_adjoint(grad.float(), start, mode)
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert float((got.double() - x.grad).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 17, 1, 1), (2, 24, 12, 10), (1, 40, 3, 6)])
def test_native_max_pool_is_tensorflows_same_pooling(shape, dtype):
    """Clipped windows at odd sizes, channel tails, NaN kept: equal to ceil-mode max pooling."""
    if dtype == torch.bfloat16 and not native.has_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16")
    torch.manual_seed(shape[1])
    x = torch.randn(*shape).to(dtype)
    if shape[2] > 1:
        x[0, 0, 1, 1] = float("nan")
    got = native.max_pool2x2(x)
    want = F.max_pool2d(x.float(), 2, 2, ceil_mode=True)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.float().isnan(), want.isnan())
    assert torch.equal(got.float().nan_to_num(0.0), want.nan_to_num(0.0))


X86_64_V3 = {"avx2", "fma", "bmi2", "f16c", "movbe"}


def test_the_kernels_are_exact_built_for_avx2(private_dir):
    """Every kernel test again, on the library built for `-march=x86-64-v3` (AVX2, 16 registers): the
    build most laptops and older servers get, run here whatever this CPU has beyond it."""
    import platform
    import subprocess
    import sys

    if native.march() != "native":
        pytest.skip("this run already tests a non-native build")
    flags = set(native._cpu_signature().split())
    if platform.machine() not in ("x86_64", "AMD64") or not X86_64_V3 <= flags:
        pytest.skip(f"an x86-64-v3 build needs {sorted(X86_64_V3)}; this CPU ({platform.machine()}) lacks some")
    cache = private_dir
    env = {**os.environ, "FLEXUNET_MARCH": "x86-64-v3", "FLEXUNET_CACHE_DIR": str(cache)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
    assert [p.name for p in cache.glob("kernels-*.so")], "the x86-64-v3 library was not built in the given cache"


def test_weight_gradients_are_the_same_on_every_run():
    """Each thread sums a fixed share of the tiles: the native weight gradient is bitwise reproducible."""
    torch.manual_seed(3)
    x, grad = torch.randn(2, 48, 40, 40), torch.randn(2, 40, 40, 40)
    first = native.winograd_weight_grad(x, grad)
    for _ in range(3):
        assert torch.equal(native.winograd_weight_grad(x, grad), first)


AARCH64_GCC, QEMU_AARCH64, AARCH64_ROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"


def _record_calls(monkeypatch) -> list:
    """Every entry point call from here on, as (name, [(kind, value or bytes)], expected outputs): inputs
    copied before the call, outputs after (this machine's results); tensors from their data pointer on."""
    outputs = {}  # entry point -> which parameters it writes (the non-const pointers of the contract)
    for name, params in native._PROTOTYPE.findall(native.CONTRACT.read_text()):
        outputs[name] = [("*" in p and "const" not in p) for p in params.split(",")]
    calls, call = [], native._call

    def span(t: torch.Tensor) -> torch.Tensor:  # the bytes from the tensor's data pointer on, as a view
        storage = t.untyped_storage()
        return torch.empty(0, dtype=torch.uint8).set_(storage)[t.data_ptr() - storage.data_ptr():]

    def recording(name, *args):
        written = outputs[name]
        for i, a in enumerate(args):
            if written[i]:
                a.zero_()  # what the kernel leaves alone (padding) then reads the same on both sides
        record = [(3, 0) if a is None else (0, int(a)) if not isinstance(a, torch.Tensor) else
                  (2, span(a).numel()) if written[i] else (1, span(a).numpy().tobytes()) for i, a in enumerate(args)]
        status = call(name, *args)
        calls.append((name, record, status, [span(a).numpy().tobytes() for i, a in enumerate(args) if written[i]]))
        return status

    monkeypatch.setattr(native, "_call", recording)
    return calls


def test_the_kernels_compute_the_same_built_for_aarch64(tmp_path, monkeypatch):
    """The NEON build (cross-compiled, run under qemu-user) returns what this machine's 16-channel-panel
    build returns, call for call, on every kernel family: the ARM path compiles and is exact."""
    import shutil
    import struct
    import subprocess

    import numpy as np

    if shutil.which(AARCH64_GCC) is None or shutil.which(QEMU_AARCH64) is None:
        pytest.skip(f"needs {AARCH64_GCC} and {QEMU_AARCH64} (Debian: gcc-aarch64-linux-gnu, qemu-user)")
    if native.panel() != 16:
        pytest.skip("records calls from a build with 16-channel panels: on AVX-512 CPUs this test runs in the "
                    "x86-64-v3 build's run (test_the_kernels_are_exact_built_for_avx2)")
    if native.march() != "native" and not native._has_avx512():
        pytest.skip("this CPU's own build has 16-channel panels and ran this test already")
    replay = tmp_path / "native_replay"
    sources = [str(p) for p in native.sources() if p.suffix == ".c"] + [str(Path(__file__).with_name("native_replay.c"))]
    flags = [f for f in native.FLAGS if f != "-shared"]  # the library's own flags, as an executable
    build = subprocess.run([AARCH64_GCC, *flags, "-march=armv8-a", "-I", str(native.CSRC), *sources,
                            "-o", str(replay), "-lm"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]

    calls = _record_calls(monkeypatch)
    torch.manual_seed(7)
    for cin, cout, h, w, cs, up in [(24, 36, 17, 13, 0, None), (16, 16, 8, 8, 0, None), (16, 24, 6, 5, 8, "bilinear"),
                                    (20, 12, 7, 9, 12, "nearest"), (70, 40, 4, 6, 0, None)]:
        x, weight, bias = torch.randn(2, cin, h, w), torch.randn(cout, cs + cin, 3, 3), torch.randn(cout)
        factor = 2 if up else 1
        skip = torch.randn(2, cs, h * factor, w * factor) if cs else None
        native.winograd_conv3x3(x, native.transform_kernel(weight), bias, cout, True, skip, up)
        native.winograd_weight_grad(x, torch.randn(2, cout, h * factor, w * factor), skip, up)
    for mode in ("bilinear", "nearest"):
        native.upsample2x_adjoint(torch.randn(2, 29, 10, 14), 11, mode)
    native.max_pool2x2(torch.randn(3, 21, 9, 7))
    for cin in (1, 3):
        weight = torch.randn(20, cin, 3, 3)
        native.direct_conv3x3(torch.randn(2, cin, 11, 9), native.pack_direct(weight), torch.randn(20), 20, True)
    native.transposed_conv_k3s2(torch.randn(2, 32, 5, 6), native.pack_transposed(torch.randn(32, 16, 3, 3)),
                                torch.randn(16))
    assert {name for name, *_ in calls} == {"winograd_f43", "winograd_f43_weight_grad", "upsample2x_adjoint",
                                            "max_pool2x2", "direct3x3", "transposed_k3s2"}

    with open(tmp_path / "calls", "wb") as f:
        for name, record, *_ in calls:
            f.write(b"FXRC" + name.encode().ljust(32, b"\0") + struct.pack("<i", len(record)))
            for kind, value in record:
                f.write(struct.pack("<iq", kind, len(value) if kind == 1 else value))
                if kind == 1:
                    f.write(value)
    run = subprocess.run([QEMU_AARCH64, "-L", AARCH64_ROOT, str(replay), str(tmp_path / "calls"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got, at = (tmp_path / "out").read_bytes(), 0
    for name, record, status, expected in calls:
        (arm_status,) = struct.unpack_from("<i", got, at)
        at += 4
        assert arm_status == status == 0, name
        for want in expected:
            theirs = np.frombuffer(got[at:at + len(want)], dtype=np.float32)
            ours = np.frombuffer(want, dtype=np.float32)
            at += len(want)
            scale = max(float(np.abs(ours).max()), 1.0)
            assert float(np.abs(theirs - ours).max()) <= 1e-5 * scale, name
    assert at == len(got)
