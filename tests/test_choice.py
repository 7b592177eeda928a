"""Kernels chosen by measurement: the faster candidate wins, is remembered on disk per machine, and a switch forces it."""

import time

import pytest
import torch
import torch.nn.functional as F

from flexunet.kernels import choice, native
from flexunet.nn.layers import Conv2dSame


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("FLEXUNET_CACHE_DIR", str(directory))
    monkeypatch.delenv("FLEXUNET_NATIVE", raising=False)
    choice.CHOICES._table = None
    yield directory
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
        assert entry["choice"] in ("native", "torch") and set(entry["ms"]) == {"native", "torch"}
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
