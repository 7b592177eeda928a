"""`flexunet.optimize_for_inference`: same outputs as eager, bf16 within 5%, model untouched."""

import os

import pytest
import torch

import flexunet
from flexunet.kernels import allocator
from flexunet.kernels import native


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return flexunet.UNet(filters=16, down_blocks=3, up_blocks=3).eval()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_runner_matches_eager(model, dtype, tolerance):
    x = torch.rand(2, 1, 48, 40)
    with torch.inference_mode():
        ref = model(x)
    runner = flexunet.optimize_for_inference(model, x, dtype=dtype)
    out = runner(torch.rand(3, 1, 32, 64))  # other batch and size than the example
    assert out.shape == (3, 16, 32, 64) and out.dtype == torch.float32
    y = runner(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < tolerance
    assert runner.model is not model and next(model.parameters()).dtype == torch.float32


def test_runner_keeps_sleap_outputs_structure():
    from flexunet.nn.heads import HeadSpec
    torch.manual_seed(1)
    backbone = flexunet.UNet(filters=16, down_blocks=2, up_blocks=1)
    heads = [HeadSpec("CentroidConfmapsHead", "CentroidConfmapsHead_0", 1, 4),
             HeadSpec("OffsetRefinementHead", "OffsetRefinementHead_0", 2, 4)]
    sleap_model = flexunet.sleap.SleapModel(backbone, heads).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        ref = sleap_model(x)
    out = flexunet.optimize_for_inference(sleap_model, x)(x)
    assert type(out) is type(ref) and list(out) == list(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad,error,match", [
    (dict(dtype=torch.float16), ValueError, "dtype must be"),
    (dict(example_input=torch.zeros(1, 1, 8, 8, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(example_input=[[0.0]]), TypeError, "floating-point"),
])
def test_bad_arguments_are_rejected(model, bad, error, match):
    kwargs = dict(example_input=torch.rand(1, 1, 16, 16), dtype=torch.float32) | bad
    with pytest.raises(error, match=match):
        flexunet.optimize_for_inference(model, **kwargs)


FAULTS = """
import resource, sys, torch
from flexunet.kernels import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory() is True
def faults():
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, over glibc's default mmap threshold; written, so mapped
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    faults()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_allocator_tuning_keeps_freed_memory_for_the_next_allocation():
    """The effect, measured: with the tuning a freed 64 MiB block is reused without page faults."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    env = dict(os.environ, FLEXUNET_KEEP_FREED_MEMORY="1")
    counts = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       env=env, check=True).stdout) for mode in ("keep", "default")}
    pages = 4 * 64 * 2**20 // 4096  # four allocations of fresh pages
    assert counts["default"] >= 0.9 * pages, counts  # every allocation faults its pages in
    assert counts["keep"] <= 0.6 * pages, counts  # the first (two) only; the rest reuse them


def test_without_native_kernels_the_runner_falls_back_with_a_warning(model, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.library.cache_clear()
    try:
        x = torch.rand(1, 1, 24, 24)
        with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):  # said once
            runner = flexunet.optimize_for_inference(model, x)
        with torch.inference_mode():
            torch.testing.assert_close(runner(x), model(x), atol=1e-5, rtol=1e-4)
    finally:
        native.library.cache_clear()


def test_keeping_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FLEXUNET_KEEP_FREED_MEMORY", "0")
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()
