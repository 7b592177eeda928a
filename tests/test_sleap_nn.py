"""sleap-nn model folders (SLEAP >= 1.5): exact to sleap-nn's own outputs, and safely loaded."""

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import flexunet
from flexunet.io.checkpoint import read_checkpoint, read_state_dict
from flexunet.sleap import load_model
from flexunet.io.sleap_nn import load_sleap_nn_model, model_from_sleap_nn_config
from tests.conftest import REFERENCE, TOLERANCE, require_reference

SLEAP_NN = REFERENCE / "sleapnn_models"

# folder -> (outputs in order with shapes for a 1x(C)x192x192 input, input channels, upsampling)
FOLDERS = {
    "minimal_instance_centroid": ({"CentroidConfmapsHead": (1, 48, 48)}, 1, "transposed"),
    "minimal_instance_centered_instance": ({"CenteredInstanceConfmapsHead": (2, 96, 96)}, 1, "transposed"),
    "minimal_instance_bottomup": (
        {"MultiInstanceConfmapsHead": (2, 96, 96), "PartAffinityFieldsHead": (2, 48, 48)}, 1, "transposed"),
    "minimal_instance_multiclass_bottomup": (
        {"MultiInstanceConfmapsHead": (2, 96, 96), "ClassMapsHead": (2, 96, 96)}, 1, "bilinear"),
    "minimal_instance_multiclass_centered_instance": (
        {"CenteredInstanceConfmapsHead": (2, 96, 96), "ClassVectorsHead": (2,)}, 1, "bilinear"),
    "minimal_instance_single_instance": ({"SingleInstanceConfmapsHead": (2, 48, 48)}, 3, "none"),
    "v035_centroid_unet": ({"CentroidConfmapsHead": (1, 96, 96)}, 1, "bilinear"),
}
WITH_REFERENCE = ["minimal_instance_centroid", "minimal_instance_multiclass_bottomup",
                  "minimal_instance_single_instance", "v035_centroid_unet"]


def folder(name: str):
    require_reference()
    return SLEAP_NN / name


def reference_error(outputs: dict, ref) -> dict:
    """Per output: max |ours - ref| / max(1, max |ref|), as the other reference tests measure."""
    names = [str(n) for n in ref["output_names"]]
    assert list(outputs) == names  # sleap-nn's head names, in its order
    return {n: float(np.abs(outputs[n].numpy() - ref[f"y_{i}"]).max() / max(1.0, np.abs(ref[f"y_{i}"]).max()))
            for i, n in enumerate(names)}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_every_sleap_nn_folder_loads_with_its_heads(name):
    expected, channels, upsampling = FOLDERS[name]
    model = load_model(folder(name))
    assert model.in_channels == channels and not model.training
    assert model.backbone.alignment == "sleap_nn" and model.convert_channels
    # sleap-nn wrote its own parameter count into the config it trained from.
    total = yaml.safe_load((folder(name) / "training_config.yaml").read_text())["model_config"]["total_params"]
    assert sum(p.numel() for p in model.parameters()) == total
    with torch.inference_mode():
        out = model(torch.rand(1, channels, 192, 192))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == expected
    assert list(out) == list(expected)
    kinds = {type(m).__name__ for m in model.backbone.modules()}
    assert ("ConvTranspose2dSame" in kinds) == (upsampling == "transposed")
    assert ("Upsample" in kinds) == (upsampling == "bilinear")


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_outputs_equal_sleap_nns(name):
    ref = np.load(folder(name) / "reference_outputs.npz")
    model = load_model(folder(name))
    with torch.inference_mode():
        errors = reference_error(model(torch.from_numpy(ref["x_nchw"])), ref)
    assert max(errors.values()) <= TOLERANCE, errors


def test_keras_alignment_would_be_wrong_for_a_sleap_nn_model():
    """The same weights with Keras' transposed-convolution alignment miss sleap-nn's outputs by far."""
    name = "minimal_instance_centroid"
    ref = np.load(folder(name) / "reference_outputs.npz")
    model = load_model(folder(name))
    keras = flexunet.sleap.SleapModel(
        flexunet.UNet(**{**model.backbone.to_dict(), "alignment": "keras"}), model.head_specs).eval()
    keras.load_state_dict(model.state_dict())
    with torch.inference_mode():
        errors = reference_error(keras(torch.from_numpy(ref["x_nchw"])), ref)
    assert max(errors.values()) > 100 * TOLERANCE, errors


@pytest.mark.parametrize("name", ["minimal_instance_single_instance", "minimal_instance_centroid"])
def test_grayscale_and_rgb_are_converted_as_sleap_nn_does(name):
    model = load_model(folder(name))
    other = 1 if model.in_channels == 3 else 3
    x = torch.rand(2, other, 64, 64)
    if other == 1:
        expected_input = x.repeat(1, 3, 1, 1)
    else:
        expected_input = 0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    with torch.inference_mode():
        got, want = model(x), model(expected_input)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="channel"):
        model(torch.rand(1, 2, 64, 64))


def test_keras_models_do_not_convert_channels(reference):
    model = load_model(reference / "sleap_models" / "minimal_instance.UNet.centroid")
    assert not model.convert_channels
    with pytest.raises(ValueError, match="channel"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["minimal_instance_bottomup", "minimal_instance_multiclass_centered_instance"])
def test_save_load_round_trip_keeps_sleap_nn_numerics(name, tmp_path):
    model = load_model(folder(name))
    flexunet.save(model, tmp_path / "m")
    again = flexunet.load(tmp_path / "m")
    assert again.backbone.alignment == "sleap_nn" and again.convert_channels
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        a, b = model(x), again(x)
        assert all(torch.equal(a[k], b[k]) for k in a)
        rgb = torch.rand(1, 3, 64, 64)
        assert all(torch.equal(model(rgb)[k], again(rgb)[k]) for k in a)


def test_pad_to_stride_and_optimize_for_inference_work_on_sleap_nn_models():
    model = load_model(folder("minimal_instance_bottomup"))
    model.pad_to_stride = True
    x = torch.rand(1, 1, 61, 75)
    with torch.inference_mode():
        out = model(x)
    assert tuple(out["MultiInstanceConfmapsHead"].shape[2:]) == (31, 38)  # ceil(size / 2)
    assert tuple(out["PartAffinityFieldsHead"].shape[2:]) == (16, 19)  # ceil(size / 4)
    model.pad_to_stride = False
    x = torch.rand(2, 1, 96, 96)
    fast = flexunet.optimize_for_inference(model, x, tune_allocator=False)
    with torch.inference_mode():
        a, b = model(x), fast(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ safety


class _Payload:
    """Pickles as a call of `function(*args)`: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {
    "os.system": lambda marker: _Payload(os.system, f"touch {marker}"),
    "builtins.exec": lambda marker: _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    "subprocess.Popen": lambda marker: _Payload(subprocess.Popen, ["touch", str(marker)]),
    "builtins.getattr": lambda marker: _Payload(getattr, _Payload(__import__, "os"), "system"),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_a_checkpoint_that_calls_anything_else_is_refused_and_nothing_runs(kind, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "best.ckpt"
    good = read_state_dict(folder("minimal_instance_centroid") / "best.ckpt")
    torch.save({"state_dict": good, "callbacks": {"x": PAYLOADS[kind](marker)}}, path)
    with pytest.raises(ValueError, match=r"best\.ckpt asks to call \w+\.\w+.*refusing"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_malicious_checkpoint_in_a_model_folder_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centroid"), model_dir)
    marker = tmp_path / "ran"
    state = read_state_dict(model_dir / "best.ckpt")
    torch.save({"state_dict": state, "evil": _Payload(os.system, f"touch {marker}")}, model_dir / "best.ckpt")
    with pytest.raises(ValueError, match=r"model/best\.ckpt asks to call (posix|os|nt)\.system"):
        load_model(model_dir)
    assert not marker.exists()


def test_training_state_is_skipped_and_no_sleap_nn_lightning_or_omegaconf_is_imported():
    """The checkpoints name sleap-nn, OmegaConf and Lightning classes; loading imports none of them."""
    require_reference()
    script = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sleap_nn", "omegaconf", "lightning", "pytorch_lightning"):
            raise ImportError("flexunet must not import " + name)
sys.meta_path.insert(0, Refuse())
import flexunet
from flexunet.io.checkpoint import read_checkpoint
for name in ("minimal_instance_centroid", "v035_centroid_unet"):
    model = flexunet.sleap.load_model({str(SLEAP_NN)!r} + "/" + name)
data = read_checkpoint({str(SLEAP_NN)!r} + "/v035_centroid_unet/best.ckpt")
print(sorted(data), type(data["callbacks"]).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer_states" in result.stdout and "state_dict" in result.stdout


def test_a_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "best.ckpt"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="best.ckpt"):
        read_state_dict(path)


# ------------------------------------------------------------------ configs


def _config(name="minimal_instance_centroid"):
    return yaml.safe_load((folder(name) / "training_config.yaml").read_text())


def _set(path: str, value):
    def change(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


UNET = "model_config.backbone_config.unet"
BAD_CONFIGS = [
    (_set(f"{UNET}.max_stride", KeyError), rf"{UNET}.max_stride is missing"),
    (_set(f"{UNET}.max_stride", 12), rf"{UNET}.max_stride must be a power of two, got 12"),
    (_set(f"{UNET}.filters", "16"), rf"{UNET}.filters must be int, got '16'"),
    (_set(f"{UNET}.up_interpolate", "yes"), rf"{UNET}.up_interpolate must be bool"),
    (_set(f"{UNET}.output_stride", 16), rf"{UNET}.output_stride \(16\) must be <= max_stride \(8\)"),
    (_set(f"{UNET}.stem_stride", 4), rf"{UNET}.stem_stride is 4; .*without a stem"),
    (_set(f"{UNET}.stacks", 2), rf"{UNET}.stacks is 2"),
    (_set("model_config.backbone_config.convnext", {"arch": "tiny"}), "convnext' backbone; .*only 'unet' backbones"),
    (_set("model_config.backbone_config.unet", None), "names no backbone; .*only 'unet' backbones"),
    (_set("model_config.head_configs.centroid", None), "head_configs must set exactly one of"),
    (_set("model_config.head_configs.centroid.confmaps.output_stride", "4"),
     "head_configs.centroid.confmaps.output_stride must be int"),
    (_set("model_config.backbone_config", [1]), "model_config.backbone_config must be a mapping"),
    (_set("model_config", KeyError), "model_config is missing"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_configs_name_the_dotted_path(change, message, tmp_path):
    config = _config()
    change(config)
    with pytest.raises(ValueError, match=message):
        model_from_sleap_nn_config(config, source="training_config.yaml")
    # The same through a folder: the error also names the file.
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centroid"), model_dir)
    (model_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="training_config.yaml"):
        load_model(model_dir)


def test_configs_are_lenient_outside_model_config():
    config = _config()
    config["trainer_config"] = "anything"
    config["data_config"] = {"skeletons": "garbage"}
    config["some_future_section"] = {"x": 1}
    model = model_from_sleap_nn_config(config)
    assert list(model.heads) == ["CentroidConfmapsHead"]


def test_unknown_keys_inside_model_config_warn():
    config = _config()
    config["model_config"]["backbone_config"]["unet"]["new_option"] = 3
    config["model_config"]["head_configs"]["new_model_type"] = None  # unset sections are not news
    with pytest.warns(UserWarning, match=rf"unknown key {UNET}.new_option ignored") as record:
        model_from_sleap_nn_config(config)
    assert not any("new_model_type" in str(w.message) for w in record)


def test_part_names_left_open_come_from_the_skeleton_or_the_weights(tmp_path):
    config = _config("minimal_instance_centered_instance")
    config["model_config"]["head_configs"]["centered_instance"]["confmaps"]["part_names"] = None
    assert model_from_sleap_nn_config(config).head_specs[0].channels == 2  # the skeleton's nodes A, B
    config["data_config"]["skeletons"] = None
    with pytest.raises(ValueError, match="centered_instance.confmaps.part_names is null"):
        model_from_sleap_nn_config(config)
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centered_instance"), model_dir)
    (model_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    assert load_model(model_dir).head_specs[0].channels == 2  # from the checkpoint


@pytest.mark.parametrize("content,message", [
    ("model_config: [unclosed", "is not valid YAML"),
    ("!!python/object/apply:os.system ['true']", "is not valid YAML"),  # safe_load refuses tags
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_malformed_yaml_names_the_file(content, message, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centroid"), model_dir)
    (model_dir / "training_config.yaml").write_text(content)
    with pytest.raises(ValueError, match=f"training_config.yaml.*{message}|{message}.*training_config.yaml"):
        load_model(model_dir)


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centroid"), model_dir)
    config = _config()
    config["model_config"]["backbone_config"]["unet"]["filters"] = 8
    (model_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"(?s)best.ckpt does not match .*training_config.yaml.*mismatched.*stack0_enc0\.conv0"):
        load_model(model_dir)


@pytest.mark.parametrize("files,error,message", [
    (["training_config.yaml"], FileNotFoundError, "has no best.ckpt"),
    (["best.ckpt"], FileNotFoundError, "has no training_config.yaml"),
    ([], FileNotFoundError, "is not a SLEAP model folder"),
])
def test_missing_files_are_named(files, error, message, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in files:
        shutil.copy(folder("minimal_instance_centroid") / name, model_dir / name)
    with pytest.raises(error, match=message):
        load_model(model_dir)


def test_a_folder_with_both_kinds_of_weights_is_ambiguous(reference, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(folder("minimal_instance_centroid"), model_dir)
    shutil.copy(reference / "sleap_models" / "minimal_instance.UNet.centroid" / "best_model.h5", model_dir)
    with pytest.raises(ValueError, match="both a Keras model .*and a sleap-nn checkpoint"):
        load_model(model_dir)


def test_the_direct_loader_equals_the_dispatching_one():
    a = load_sleap_nn_model(folder("v035_centroid_unet"))
    b = load_model(folder("v035_centroid_unet"))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
