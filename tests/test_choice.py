"""Kernels chosen by measurement: the fastest candidate wins, is remembered on disk per machine, and a switch forces it."""

import time

import pytest
import torch
import torch.nn.functional as F

from flexunet.kernels import choice, native, ops
from flexunet.nn.layers import Conv2dSame


@pytest.fixture
def private_cache(private_dir, monkeypatch):
    """Choices recorded in a cache of their own, measured (not forced)."""
    monkeypatch.setenv("FLEXUNET_CACHE_DIR", str(private_dir))
    monkeypatch.delenv("FLEXUNET_NATIVE", raising=False)
    choice.CHOICES._table = None
    yield private_dir
    choice.CHOICES._table = None


def _sleeper(seconds, calls, name):
    def run():
        calls.append(name)
        time.sleep(seconds)
        return torch.full((1,), seconds)
    return run


@pytest.mark.parametrize("fast", ["first", "second"])
def test_the_faster_candidate_wins_and_is_measured_once(private_cache, fast):
    calls = []
    slow_s, fast_s = 0.02, 0.002
    candidates = {"first": _sleeper(fast_s if fast == "first" else slow_s, calls, "first"),
                  "second": _sleeper(fast_s if fast == "second" else slow_s, calls, "second")}
    out = choice.CHOICES.run("test|key", candidates)
    assert float(out) == pytest.approx(fast_s)  # the winner's own result
    entry = choice.choices()["test|key"]
    assert entry["choice"] == fast and entry["ms"][fast] < entry["ms"]["first" if fast == "second" else "second"]
    assert 2 <= calls.count("first") <= 1 + choice.ROUNDS  # a warm-up run, then timed, interleaved runs
    calls.clear()
    choice.CHOICES.run("test|key", candidates)
    assert calls == [fast]  # remembered: no second measurement


def test_choices_persist_per_machine_and_threads(private_cache):
    choice.CHOICES.run("test|persist", {"a": lambda: torch.zeros(1), "b": lambda: torch.ones(1)})
    files = list(private_cache.glob("choices-*.json"))
    assert len(files) == 1
    fresh = choice.Choices()  # another process on this machine
    assert fresh.get("test|persist") in ("a", "b")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert choice._file() != files[0] and fresh.get("test|persist") is None  # measured again per thread count
    finally:
        torch.set_num_threads(threads)
    choice.clear()
    assert not list(private_cache.glob("choices-*.json")) and choice.choices() == {}


def test_a_choice_measured_among_other_candidates_is_measured_again(private_cache):
    choice.CHOICES.run("test|new", {"a": lambda: torch.zeros(1), "b": lambda: torch.ones(1)})
    calls = []
    candidates = {name: (lambda name=name: calls.append(name) or torch.ones(1)) for name in ("a", "b", "c")}
    choice.CHOICES.run("test|new", candidates)  # a new candidate: timed with the others
    assert set(calls) == {"a", "b", "c"} and set(choice.choices()["test|new"]["ms"]) == {"a", "b", "c"}
    calls.clear()
    choice.CHOICES.run("test|new", candidates)
    assert len(calls) == 1


def test_an_unreadable_choices_file_is_measured_again(private_cache):
    choice._file().write_text("{not json")
    out = choice.CHOICES.run("test|bad", {"only": lambda: torch.ones(1), "other": lambda: torch.ones(1)})
    assert float(out) == 1 and choice.Choices().get("test|bad") in ("only", "other")


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built here (no C compiler)")
@pytest.mark.parametrize("forced,expected_mode", [(None, "measure"), ("1", "native"), ("0", "torch")])
def test_a_layer_runs_its_measured_or_forced_choice_exactly(private_cache, monkeypatch, forced, expected_mode):
    if forced is not None:
        monkeypatch.setenv("FLEXUNET_NATIVE", forced)
    assert native.mode() == expected_mode
    torch.manual_seed(0)
    layer = Conv2dSame(32, 48, 3, activation="relu").eval()
    x = torch.randn(2, 32, 40, 40)
    with torch.inference_mode():
        y = layer(x)
    torch.testing.assert_close(y, F.relu(F.conv2d(x, layer.weight, layer.bias, padding=1)), rtol=1e-4, atol=1e-4)
    recorded = choice.choices()
    if expected_mode == "measure":
        (key, entry), = recorded.items()
        assert key == "conv3x3|float32|2x32x40x40|skip0|none|48|relu"
        expected = {"native", "onednn"} | ({"onednn relu"} if ops.fused_relu_available(torch.float32) else set())
        assert entry["choice"] in expected and set(entry["ms"]) == expected
    else:
        assert recorded == {}  # forced: nothing measured


def test_the_weight_cache_is_bounded_and_can_be_freed(private_cache):
    """After inference of SLEAP's default UNet: one transformed copy per weight (the measurement's
    losing candidate dropped), at most 4x the 3x3 weights (36 Winograd positions for 9 taps)."""
    import flexunet

    flexunet.clear_weight_cache()
    model = flexunet.UNet(filters=16, down_blocks=3, up_blocks=3).eval()
    weights = sum(p.nbytes for p in model.parameters())
    with torch.inference_mode():
        model(torch.rand(1, 1, 64, 64))
    held = flexunet.weight_cache_bytes()
    assert held <= 4 * weights
    if native.mode() != "torch" and any(v["choice"] == "native" for v in choice.choices().values()):
        assert held > 0
    flexunet.clear_weight_cache()
    assert flexunet.weight_cache_bytes() == 0


CONV_CASES = [  # (cin, cout, h, w, skip, upsample, relu, dtype): every candidate of each must agree
    (1, 16, 24, 20, 0, "none", True, torch.float32),  # an image's channel: native direct kernel
    (24, 36, 17, 13, 0, "none", False, torch.float32),
    (16, 24, 8, 10, 8, "bilinear", True, torch.float32),  # a decoder's joined input
    (128, 128, 6, 6, 0, "none", True, torch.float32),  # Winograd as batched products is a candidate
    (32, 32, 12, 12, 16, "nearest", True, torch.bfloat16),
]


@pytest.mark.parametrize("cin,cout,h,w,cs,upsample,relu,dtype", CONV_CASES)
def test_every_conv3x3_candidate_computes_the_same_convolution(cin, cout, h, w, cs, upsample, relu, dtype):
    from flexunet.kernels import ops

    torch.manual_seed(cin + cout)
    x, weight, bias = torch.randn(2, cin, h, w), torch.randn(cout, cin + cs, 3, 3), torch.randn(cout)
    factor = 1 if upsample == "none" else 2
    skip = torch.randn(2, cs, h * factor, w * factor) if cs else None
    want = ops._upsampled_input(x.double(), None if skip is None else skip.double(), upsample)
    want = F.conv2d(want, weight.double(), bias.double(), padding=1)
    want = torch.relu(want) if relu else want
    args = (x.to(dtype), weight, bias, dtype, True, relu, None if skip is None else skip.to(dtype), upsample)
    runs = {"onednn": ops._onednn_conv3x3, "winograd": ops._winograd_conv3x3}
    if relu and ops.fused_relu_available(dtype):
        runs["onednn relu"] = lambda *a: ops._onednn_conv3x3(*a, fused=True)
    if native.supports_dtype(dtype):
        runs["native"] = ops._native_conv3x3
    if native.available():  # bfloat16 layers computed in float32 where bfloat16 is emulated
        runs["native fp32"] = lambda *a: ops._in_float32(ops._native_conv3x3, *a)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for name, run in runs.items():
        got = run(*args)
        assert got.dtype == dtype and got.shape == want.shape, name
        assert float((got.double() - want).abs().max() / want.abs().max()) < tolerance, name


@pytest.mark.parametrize("stride,kernel,crop", [(2, 3, 0), (2, 3, 1), (2, 4, 1), (3, 3, 0), (3, 3, 1), (2, 1, 0),
                                               (4, 7, 3), (2, 5, 2)])
def test_every_transposed_candidate_computes_the_same_convolution(stride, kernel, crop):
    from flexunet.kernels import ops

    torch.manual_seed(kernel * stride + crop)
    x, weight, bias = torch.randn(2, 32, 5, 7), torch.randn(32, 16, kernel, kernel), torch.randn(16)
    h, w = 5 * stride, 7 * stride
    full = F.conv_transpose2d(x.double(), weight.double(), None, stride=stride)
    full = F.pad(full, (0, max(crop + w - full.shape[3], 0), 0, max(crop + h - full.shape[2], 0)))  # rows past it: 0
    want = full[:, :, crop:crop + h, crop:crop + w] + bias.double().view(1, -1, 1, 1)
    runs = {"gemm": lambda: ops._torch_conv_transpose(x, weight, bias, stride, crop, torch.float32),
            "onednn": lambda: ops._onednn_conv_transpose(x, weight, bias, stride, crop, torch.float32)}
    if kernel == 3 and stride == 2 and crop == 0 and native.available():
        runs["native"] = lambda: ops._native_conv_transpose(x, weight, bias, torch.float32)
    for name, run in runs.items():
        got = run()
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last), name
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5, name


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built here (no C compiler)")
def test_bfloat16_autocast_training_has_float32_candidates_where_bfloat16_is_emulated(private_cache):
    """Without AVX512-BF16 the operator serves bf16 autocast training too, and every gradient stays
    within bfloat16 rounding of float32's."""
    torch.manual_seed(2)
    layer = Conv2dSame(32, 48, 3, activation="relu")
    x = torch.randn(2, 32, 64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert ("conv3x3" in y.grad_fn.name()) == (not native.has_bfloat16())
    y.float().square().sum().backward()
    got = [x.grad, layer.weight.grad, layer.bias.grad]
    x2 = x.detach().requires_grad_()
    w2, b2 = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    torch.relu(F.conv2d(x2, w2, b2, padding=1)).square().sum().backward()
    for grad, want in zip(got, [x2.grad, w2.grad, b2.grad]):
        assert grad.dtype == torch.float32
        assert float((grad - want).abs().max() / want.abs().max()) < 3e-2
    if not native.has_bfloat16():
        keys = list(choice.choices())
        assert any(k.startswith("conv3x3_weight_grad|") for k in keys)
        # Where oneDNN emulates bfloat16 the float32 kernels are the forward's only candidate (not timed).
        assert any(k.endswith("|train") for k in keys) == (not ops.bfloat16_emulated())


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built here (no C compiler)")
@pytest.mark.parametrize("shape", [(2, 16, 32, 32), (1, 20, 7, 9), (3, 5, 1, 2)])
def test_pooling_is_measured_and_its_candidates_agree(private_cache, shape):
    torch.manual_seed(shape[1])
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")  # propagated by both, as TensorFlow and torch do
    want = F.max_pool2d(x, 2, 2, ceil_mode=True)
    for got in (native.max_pool2x2(x), ops._torch_max_pool2x2(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    with torch.inference_mode():
        torch.testing.assert_close(torch.ops.flexunet.max_pool2x2(x), want, rtol=0, atol=0, equal_nan=True)
    entry = choice.choices()[choice.pool_key(x)]
    assert entry["choice"] in ("native", "torch") and set(entry["ms"]) == {"native", "torch"}


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built here (no C compiler)")
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_the_upsampling_adjoint_is_measured_and_its_candidates_agree(private_cache, mode):
    torch.manual_seed(0)
    grad = torch.randn(2, 21, 10, 14).contiguous(memory_format=torch.channels_last)
    source = torch.randn(2, 13, 5, 7, dtype=torch.float64, requires_grad=True)
    options = {"align_corners": False} if mode == "bilinear" else {}
    F.interpolate(source, scale_factor=2, mode=mode, **options).backward(grad[:, 8:].double())
    for got in (native.upsample2x_adjoint(grad, 8, mode), ops._torch_upsample2x_backward(grad, 8, mode),
                torch.ops.flexunet.upsample2x_backward(grad, 8, mode)):
        torch.testing.assert_close(got.double(), source.grad, rtol=1e-5, atol=1e-5)
    entry = choice.choices()[choice.upsample_adjoint_key(grad, 8, mode)]
    assert entry["choice"] in ("native", "torch") and set(entry["ms"]) == {"native", "torch"}


@pytest.mark.parametrize("kernel,crop", [(3, 0), (4, 1)])
def test_bfloat16_transposed_layers_have_float32_candidates(private_cache, kernel, crop):
    """Where bfloat16 is emulated it is ~10x slower than float32: float32 candidates, rounded, are timed too."""
    torch.manual_seed(kernel)
    x, weight, bias = torch.randn(2, 32, 6, 5), torch.randn(32, 16, kernel, kernel), torch.randn(16)
    with torch.inference_mode():
        y = torch.ops.flexunet.conv_transpose_same(x.bfloat16(), weight, bias, 2, crop, torch.bfloat16)
    want = ops._torch_conv_transpose(x.double(), weight.double(), bias.double(), 2, crop, torch.float64)
    assert y.dtype == torch.bfloat16 and y.shape == want.shape
    assert float((y.double() - want).abs().max() / want.abs().max()) < 2e-2
    entries = [v for k, v in choice.choices().items() if k.startswith("transposed|bfloat16")]
    native_fp32 = kernel == 3 and native.available() and not native.has_bfloat16()
    if ops.bfloat16_emulated() and not native_fp32:
        assert entries == []  # the float32 product is the only candidate: nothing to time
        return
    (entry,) = entries
    assert {"gemm fp32"} | (set() if ops.bfloat16_emulated() else {"gemm", "onednn"}) <= set(entry["ms"])
    assert ("native fp32" in entry["ms"]) == native_fp32
