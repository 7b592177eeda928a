"""Native save/load: config.json + model.safetensors, bit-identical outputs, clear failures."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexunet
from flexunet.sleap import load_model
from tests.conftest import SLEAP_FOLDERS, SLEAP_MODELS


def outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, dict) else {"y": y} if torch.is_tensor(y) else dict(enumerate(y))


@pytest.mark.parametrize("kwargs", [dict(filters=4, down_blocks=3, up_blocks=2),
                                    dict(filters=4, stacks=2, down_blocks=2, up_blocks=2, up_interpolate=True,
                                         in_channels=3)])
def test_unet_round_trip_is_bit_identical(tmp_path, kwargs):
    model = flexunet.UNet(**kwargs).eval()
    flexunet.save(model, tmp_path / "m")
    loaded = flexunet.load(tmp_path / "m")
    assert isinstance(loaded, flexunet.UNet) and loaded.to_dict() == model.to_dict()
    x = torch.rand(2, kwargs.get("in_channels", 1), 32, 32)
    a, b = outputs(model, x), outputs(loaded, x)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("folder", SLEAP_FOLDERS)
def test_sleap_model_round_trip_is_bit_identical(reference, tmp_path, folder):
    model = load_model(SLEAP_MODELS / folder)
    flexunet.save(model, tmp_path / "m")
    loaded = flexunet.load(tmp_path / "m")
    x = torch.rand(2, model.in_channels, 2 * model.maximum_stride, 3 * model.maximum_stride)
    a, b = outputs(model, x), outputs(loaded, x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_only_flexunet_architectures_are_saved_with_a_format_version(tmp_path):
    from flexunet.nn.heads import HeadSpec
    from flexunet.sleap import SleapModel

    class BNNet(flexunet.EncoderDecoder):
        def __init__(self):
            super().__init__()
            self.build()

        encoder_stack = property(lambda self: [flexunet.SimpleConvBlock(batch_norm=True, filters=4)])
        decoder_stack = property(lambda self: [])

    with pytest.raises(TypeError, match="UNet and SleapModel"):
        flexunet.save(BNNet(), tmp_path / "x")
    model = SleapModel(flexunet.UNet(filters=4, down_blocks=2, up_blocks=1), [
        HeadSpec("CentroidConfmapsHead", "CentroidConfmapsHead_0", 1, 2)])
    flexunet.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format_version"] == flexunet.io.serialization.FORMAT_VERSION == 3


def test_newer_format_version_is_refused(tmp_path):
    flexunet.save(flexunet.UNet(filters=4), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99, newer than this flexunet reads"):
        flexunet.load(tmp_path / "m")


def test_missing_tensors_are_listed(tmp_path):
    flexunet.save(flexunet.UNet(filters=4), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    del state["blocks.stack0_enc1.conv0.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing tensors \\(1\\): blocks.stack0_enc1.conv0.bias"):
        flexunet.load(tmp_path / "m")


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(unet={**c["unet"], "filter": 3}), "did you mean 'filters'"),
    (lambda c: c.update(extra=1), "unknown key 'extra'"),
    (lambda c: c.update(architecture="ResNet"), "architecture must be 'UNet' or 'SleapModel'"),
])
def test_bad_configs_are_refused(tmp_path, change, match):
    flexunet.save(flexunet.UNet(filters=4), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        flexunet.load(tmp_path / "m")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        flexunet.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        flexunet.load(tmp_path / "empty")


def test_version_1_files_still_load(tmp_path):
    """Files written before `alignment` existed load as Keras-aligned models."""
    model = flexunet.UNet(filters=4, down_blocks=2, up_blocks=2)
    flexunet.save(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 1
    del config["unet"]["alignment"]
    path.write_text(json.dumps(config))
    loaded = flexunet.load(tmp_path / "m")
    assert loaded.alignment == "keras"
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_pad_to_stride_is_saved_and_restored(tmp_path):
    model = flexunet.UNet(filters=4, down_blocks=2, up_blocks=2).eval()
    model.pad_to_stride = True
    flexunet.save(model, tmp_path / "m")
    loaded = flexunet.load(tmp_path / "m")
    assert loaded.pad_to_stride is True
    x = torch.rand(1, 1, 30, 37)  # not a multiple of the stride: only runs with pad_to_stride
    assert torch.equal(outputs(model, x)["y"], outputs(loaded, x)["y"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["pad_to_stride"] = "yes"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pad_to_stride must be true or false"):
        flexunet.load(tmp_path / "m")


def test_load_model_reads_every_kind_from_its_folder_or_a_file_in_it(reference, tmp_path):
    keras = SLEAP_MODELS / "minimal_instance.UNet.centroid"
    sleap_nn = reference / "sleapnn_models" / "minimal_instance_centroid"
    native = tmp_path / "native"
    flexunet.save(load_model(keras), native)
    x = torch.rand(1, 1, 64, 64)
    for path, names in [(keras, ["CentroidConfmapsHead_0", "OffsetRefinementHead_0"]),
                        (keras / "best_model.h5", None), (keras / "training_config.json", None),
                        (sleap_nn, ["CentroidConfmapsHead"]), (sleap_nn / "best.ckpt", None),
                        (native, ["CentroidConfmapsHead_0", "OffsetRefinementHead_0"]), (native / "config.json", None)]:
        model = flexunet.load_model(path)
        assert isinstance(model, flexunet.SleapModel)
        if names is not None:
            assert model.output_names == names
    assert torch.equal(outputs(flexunet.load_model(native), x)["CentroidConfmapsHead_0"],
                       outputs(load_model(keras), x)["CentroidConfmapsHead_0"])
    with pytest.raises(FileNotFoundError, match="holds no model"):
        flexunet.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        flexunet.load_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a model file"):
        flexunet.load_model(tmp_path / "notes.txt")
