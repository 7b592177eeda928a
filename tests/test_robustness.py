"""The library's boundary: bad inputs, configs and files end in one clear sentence."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flexunet
from flexunet.nn.heads import HeadSpec
from flexunet.sleap import SleapModel, load_model, model_from_training_config
from tests.conftest import BACKBONES, SLEAP_MODELS

# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("up_blocks", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("size", [(97, 101), (53, 64), (17, 31)])
def test_pad_to_stride_pads_runs_and_crops_every_output(up_blocks, size):
    torch.manual_seed(0)
    model = flexunet.UNet(filters=4, down_blocks=4, up_blocks=up_blocks).eval()
    x = torch.rand(2, 1, *size)
    with pytest.raises(ValueError, match="multiple of the maximum stride 16"):
        model(x)
    model.pad_to_stride = True
    with torch.no_grad():
        (out,), (features,) = model.forward_intermediates(x)
        ph, pw = -size[0] % 16, -size[1] % 16
        model.pad_to_stride = False
        (ref_out,), (ref_features,) = model.forward_intermediates(F.pad(x, (0, pw, 0, ph)))  # zeros bottom/right
    stride = model.output_stride
    expected = (-(-size[0] // stride), -(-size[1] // stride))
    assert tuple(out.shape[-2:]) == expected
    torch.testing.assert_close(out, ref_out[..., : expected[0], : expected[1]])
    assert len(features) == len(ref_features) == up_blocks
    for f, r in zip(features, ref_features):
        h, w = -(-size[0] // f.stride), -(-size[1] // f.stride)
        torch.testing.assert_close(f.tensor, r.tensor[..., :h, :w])


def test_pad_to_stride_on_sleap_models_crops_maps_not_vectors():
    model = SleapModel(flexunet.UNet(filters=4, down_blocks=3, up_blocks=2), [
        HeadSpec("CentroidConfmapsHead", "CentroidConfmapsHead_0", 1, 2),
        HeadSpec("PartAffinityFieldsHead", "PartAffinityFieldsHead_0", 4, 4),
        HeadSpec("ClassVectorsHead", "ClassVectorsHead", 3, 8, activation="softmax"),
    ]).eval()
    model.pad_to_stride = True
    with torch.no_grad():
        out = model(torch.rand(1, 1, 61, 43))
    assert out["CentroidConfmapsHead_0"].shape == (1, 1, 31, 22)
    assert out["PartAffinityFieldsHead_0"].shape == (1, 4, 16, 11)
    assert out["ClassVectorsHead"].shape == (1, 3)


def test_dtypes_and_layouts_are_handled():
    torch.manual_seed(0)
    model = flexunet.UNet(filters=4, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model(x.double()), ref)  # float64 images into a float32 model
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref)
        wide = torch.rand(2, 1, 16, 32)
        torch.testing.assert_close(model(wide[:, :, :, ::2]), model(wide[:, :, :, ::2].contiguous()))
        assert torch.equal(model(x), model(x))  # deterministic in eval mode
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.uint8"):
        model(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must not be empty"):
        model(torch.zeros(0, 1, 16, 16))


def test_nan_and_inf_propagate_without_error():
    model = flexunet.UNet(filters=4, down_blocks=2, up_blocks=2, up_interpolate=True).eval()
    clean = torch.rand(1, 1, 16, 16)
    with_nan, with_inf = clean.clone(), clean.clone()
    with_nan[0, 0, 3, 3] = float("nan")
    with_inf[0, 0, 10, 10] = float("inf")
    with torch.no_grad():
        assert torch.isfinite(model(clean)).all()
        assert torch.isnan(model(with_nan)).any()  # NaN propagates
        assert not torch.isfinite(model(with_inf)).all()  # inf propagates (as inf, or NaN where inf - inf)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("build,error,match", [
    (lambda: flexunet.UNet.from_dict({"filters": "64"}), TypeError, "filters must be an integer"),
    (lambda: flexunet.UNet.from_dict({"stack": 2}), ValueError, "did you mean 'stacks'"),
    (lambda: flexunet.UNetConfig.from_dict({"output_strid": 2}), ValueError, "did you mean 'output_stride'"),
    (lambda: flexunet.UNetConfig(max_stride=16.0), TypeError, "max_stride must be an integer"),
    (lambda: HeadSpec.from_dict({"kind": "CentroidConfmapsHead", "name": "c", "channel": 1, "output_stride": 1}),
     ValueError, "did you mean 'channels'"),
    (lambda: HeadSpec("NoSuchHead", "x", 1, 1), ValueError, "HeadSpec.kind must be one of"),
    (lambda: flexunet.UNet(filters=64, filters_rate=30.0), ValueError, "parameters, more than"),
])
def test_configs_are_validated_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def training_config(**unet):
    return {"data": {"anything": [1, 2]}, "optimization": {"whatever": True},
            "model": {"backbone": {"unet": {"max_stride": 8, "output_stride": 2, "filters": 4,
                                            "filters_rate": 2, **unet}},
                      "heads": {"centroid": {"anchor_part": None, "sigma": 2.0, "output_stride": 2,
                                             "offset_refinement": False}}}}


def test_sleap_configs_are_read_leniently_outside_the_model():
    config = training_config()
    config["some_future_section"] = {"x": 1}
    model = model_from_training_config(config)
    assert model.backbone.output_stride == 2


def test_unknown_keys_inside_the_model_warn():
    config = training_config(new_option=True)
    with pytest.warns(UserWarning, match="unknown key model.backbone.unet.new_option"):
        model_from_training_config(config)


@pytest.mark.parametrize("change,path", [
    (lambda c: c["model"]["backbone"]["unet"].pop("max_stride"), "model.backbone.unet.max_stride is missing"),
    (lambda c: c["model"]["backbone"]["unet"].update(max_stride="8"), "model.backbone.unet.max_stride must be int"),
    (lambda c: c["model"]["backbone"]["unet"].update(max_stride=12), "model.backbone.unet.max_stride must be a power of two"),
    (lambda c: c["model"]["backbone"]["unet"].update(filters=0), "model.backbone.unet.filters must be >= 1"),
    (lambda c: c["model"]["heads"]["centroid"].update(output_stride=None), "model.heads.centroid.output_stride is missing"),
    (lambda c: c["model"]["heads"].update(single_instance={"output_stride": 2}), "must set exactly one of"),
    (lambda c: c["model"].pop("heads"), "model.heads is missing"),
    (lambda c: c["model"]["backbone"].update(unet=[1]), "model.backbone.unet must be a JSON object"),
])
def test_needed_values_name_their_json_path(change, path):
    config = training_config()
    change(config)
    with pytest.raises(ValueError, match=path):
        model_from_training_config(config)


# ------------------------------------------------------------------ files


@pytest.mark.parametrize("damage", ["truncate", "empty", "text", "png"])
def test_damaged_sleap_weights_name_the_file(reference, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    path = folder / "best_model.h5"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "text": b"weights",
                      "png": b"\x89PNG\r\n\x1a\n" + bytes(64)}[damage])
    with pytest.raises((OSError, ValueError), match="best_model.h5"):
        load_model(folder)


@pytest.mark.parametrize("damage", [b"", b"\x00" * 20, b"not safetensors"])
def test_damaged_native_weights_name_the_file(tmp_path, damage):
    flexunet.save(flexunet.UNet(filters=4, down_blocks=2, up_blocks=2), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(damage)
    with pytest.raises(ValueError, match="model.safetensors"):
        flexunet.load(tmp_path / "m")


def _fake_helper(tmp_path, monkeypatch, body: str) -> None:
    """Replace the HDF5 reader script by one that runs `body`."""
    from flexunet.io import keras

    script = tmp_path / "helper.py"
    script.write_text(body)
    monkeypatch.setattr(keras, "HELPER_SCRIPT", script)


def test_a_hanging_read_is_stopped(monkeypatch, tmp_path):
    """A read that never returns (as damaged HDF5 metadata can cause) ends as a ValueError."""
    import time

    from flexunet.io import keras

    monkeypatch.setattr(keras, "READ_TIMEOUT", 1.0)
    _fake_helper(tmp_path, monkeypatch, "import time\ntime.sleep(60)\n")
    path = tmp_path / "model.h5"
    path.write_bytes(b"x")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="model.h5: reading took longer than 1 s"):
        keras.read_keras_weights(path)
    assert time.perf_counter() - start < 10


def test_a_crashing_read_is_contained(monkeypatch, tmp_path):
    from flexunet.io import keras

    _fake_helper(tmp_path, monkeypatch, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    path = tmp_path / "model.h5"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="crashed reading this file .SIGSEGV"):
        keras.read_keras_weights(path)


def test_a_failing_helper_is_not_blamed_on_the_file(monkeypatch, reference, tmp_path):
    """A helper that cannot run is reported as such, with its reason; the valid file is not called damaged."""
    from flexunet.io import keras

    _fake_helper(tmp_path, monkeypatch, "import h5py_that_is_not_installed\n")
    with pytest.raises(RuntimeError, match="HDF5 reader failed.*ModuleNotFoundError.*not judged") as info:
        keras.read_keras_weights(BACKBONES / "tiny_reference.h5")
    assert "damaged" not in str(info.value)


def test_without_an_interpreter_to_start_files_are_read_in_process(monkeypatch, reference):
    from flexunet.io import keras

    monkeypatch.setattr(keras, "_helper_command", lambda: None)
    layers = keras.read_keras_weights(BACKBONES / "tiny_reference.h5")
    assert "stack0_enc0_conv0" in layers


UNGUARDED_SCRIPT = """
import multiprocessing, sys
# A platform that can only spawn (Windows, macOS by default).
multiprocessing.get_all_start_methods = lambda: ["spawn"]
multiprocessing.set_start_method("spawn", force=True)
import torch
import flexunet
model = flexunet.sleap.load_model(sys.argv[1])
x = torch.rand(1, model.in_channels, 64, 64)
print("outputs", sorted(model(x)))
"""


def test_an_unguarded_script_loads_a_model_where_processes_can_only_spawn(reference, tmp_path):
    script = tmp_path / "user_script.py"  # no `if __name__ == "__main__":` guard, as many users write
    script.write_text(UNGUARDED_SCRIPT)
    folder = SLEAP_MODELS / "minimal_instance.UNet.centroid"
    result = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("outputs") == 1  # the script ran once: no child re-ran it
    assert "CentroidConfmapsHead_0" in result.stdout


def test_keras_files_load_from_several_threads_while_a_model_runs(reference):
    from concurrent.futures import ThreadPoolExecutor

    path = BACKBONES / "tiny_reference.h5"
    model = flexunet.UNet(filters=8, down_blocks=2, up_blocks=2)

    def run_model():
        with torch.no_grad():
            return [model(torch.rand(1, 1, 64, 64)).shape for _ in range(5)]

    with ThreadPoolExecutor(5) as pool:
        running = pool.submit(run_model)
        reads = [pool.submit(flexunet.io.keras.read_keras_weights, path) for _ in range(4)]
        results = [r.result(timeout=300) for r in reads]
        running.result(timeout=300)
    assert all(sorted(r) == sorted(results[0]) for r in results)
    assert all(np.array_equal(r["stack0_enc0_conv0"]["kernel"], results[0]["stack0_enc0_conv0"]["kernel"])
               for r in results)


class _LoadingDataset(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.from_numpy(flexunet.io.keras.read_keras_weights(self.path)["stack0_enc0_conv0"]["bias"])


def test_keras_files_load_inside_dataloader_workers(reference):
    loader = torch.utils.data.DataLoader(_LoadingDataset(BACKBONES / "tiny_reference.h5"), batch_size=1,
                                         num_workers=1)
    batches = list(loader)
    assert len(batches) == 2 and torch.equal(batches[0], batches[1])


FUZZ = Path(__file__).resolve().parent / "fuzz_files.py"


def test_fuzzed_files_load_or_fail_cleanly(reference, tmp_path):
    """400 damaged copies of the reference files, in a child process: no crash, no hang, no stray error."""
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(FUZZ), "--seed", "0", "--cases", "400", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["unexpected"] == []
    assert summary["slowest_case_s"] < 30
    counts = summary["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 400
    for target in ("keras_backbone", "sleap_folder", "sleap_nn_folder", "native"):
        assert counts[target].get("ValueError", 0) > 0 and counts[target].get("loaded and ran", 0) > 0
