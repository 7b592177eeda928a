"""SLEAP-trained model folders run in PyTorch with Keras' outputs, heads included."""

import json
import shutil

import numpy as np
import pytest
import torch

import flexunet
from flexunet.sleap import load_model, model_from_training_config
from tests.conftest import SLEAP_FOLDERS, SLEAP_MODELS, TOLERANCE, nchw, relative_error

WITH_OUTPUTS = [f for f in SLEAP_FOLDERS if f in (
    "minimal_robot.UNet.single_instance", "minimal_instance.UNet.centroid", "min_tracks_2node.UNet.topdown_multiclass")]

# folder -> (input channels, [(output name, channels, stride or None for vectors)])
EXPECTED_HEADS = {
    "minimal_robot.UNet.single_instance": (3, [("SingleInstanceConfmapsHead_0", 2, 4)]),
    "minimal_instance.UNet.centroid": (1, [("CentroidConfmapsHead_0", 1, 4), ("OffsetRefinementHead_0", 2, 4)]),
    "minimal_instance.UNet.centered_instance": (1, [("CenteredInstanceConfmapsHead_0", 2, 2),
                                                    ("OffsetRefinementHead_0", 4, 2)]),
    "minimal_instance.UNet.bottomup": (1, [("MultiInstanceConfmapsHead_0", 2, 2), ("PartAffinityFieldsHead_0", 2, 4),
                                           ("OffsetRefinementHead_0", 4, 2)]),
    "min_tracks_2node.UNet.bottomup_multiclass": (1, [("MultiInstanceConfmapsHead_0", 2, 2), ("ClassMapsHead_0", 2, 2)]),
    "min_tracks_2node.UNet.topdown_multiclass": (1, [("CenteredInstanceConfmapsHead", 2, 2), ("ClassVectorsHead", 2, None)]),
}


@pytest.mark.parametrize("folder", WITH_OUTPUTS)
def test_outputs_match_keras(reference, folder):
    model = load_model(SLEAP_MODELS / folder)
    assert not model.training
    data = np.load(SLEAP_MODELS / folder / "reference_outputs.npz")
    with torch.no_grad():
        outputs = model(nchw(data["x_nhwc"]))
    assert list(outputs) == [str(n) for n in data["output_names"]]
    errors = {name: relative_error(outputs[name], data[f"y_{i}"]) for i, name in enumerate(outputs)}
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("folder", SLEAP_FOLDERS)
def test_every_folder_loads_with_its_heads(reference, folder):
    model = load_model(SLEAP_MODELS / folder)
    channels, heads = EXPECTED_HEADS[folder]
    assert model.in_channels == channels
    side = 2 * model.maximum_stride
    with torch.no_grad():
        outputs = model(torch.rand(2, channels, side, side))
    assert list(outputs) == [name for name, _, _ in heads]
    for name, c, stride in heads:
        expected = (2, c) if stride is None else (2, c, side // stride, side // stride)
        assert tuple(outputs[name].shape) == expected
    # Every layer of the Keras file is used: nothing left over, nothing missing.
    keras = flexunet.io.keras.read_keras_weights(SLEAP_MODELS / folder / "best_model.h5")
    assert set(keras) == set(flexunet.io.keras.keras_layers(model))


def test_head_activations_follow_sleap(reference):
    model = load_model(SLEAP_MODELS / "min_tracks_2node.UNet.bottomup_multiclass")
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64) * 10)
    assert ((out["ClassMapsHead_0"] >= 0) & (out["ClassMapsHead_0"] <= 1)).all()  # sigmoid
    model = load_model(SLEAP_MODELS / "min_tracks_2node.UNet.topdown_multiclass")
    with torch.no_grad():
        out = model(torch.rand(3, 1, 64, 64))
    torch.testing.assert_close(out["ClassVectorsHead"].sum(1), torch.ones(3))  # softmax


def test_backbone_output_stride_comes_from_the_heads(reference, tmp_path):
    """`model.backbone.unet.output_stride` is ignored, as in SLEAP: the first head decides."""
    src = SLEAP_MODELS / "minimal_instance.UNet.centroid"
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    config = json.loads((folder / "training_config.json").read_text())
    config["model"]["backbone"]["unet"]["output_stride"] = 1
    (folder / "training_config.json").write_text(json.dumps(config))
    model = load_model(folder)
    assert model.backbone.output_stride == 4


@pytest.mark.parametrize("backbone", ["leap", "hourglass", "resnet", "pretrained_encoder"])
def test_other_backbones_are_refused_by_name(reference, tmp_path, backbone):
    folder = tmp_path / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    config = json.loads((folder / "training_config.json").read_text())
    config["model"]["backbone"] = {"unet": None, backbone: {"filters": 16}}
    (folder / "training_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"'{backbone}' backbone; flexunet supports only 'unet'"):
        load_model(folder)


@pytest.mark.parametrize("missing", ["training_config.json", "best_model.h5"])
def test_missing_files(reference, tmp_path, missing):
    folder = tmp_path / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_malformed_json_names_the_file(reference, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    (folder / "training_config.json").write_text('{"model": {')
    with pytest.raises(ValueError, match="training_config.json is not valid JSON"):
        load_model(folder)


def test_weights_that_disagree_with_the_config_list_the_layers(reference, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(SLEAP_MODELS / "minimal_instance.UNet.centroid", folder)
    config = json.loads((folder / "training_config.json").read_text())
    config["model"]["backbone"]["unet"]["filters"] = 8
    (folder / "training_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="(?s)best_model.h5 does not match.*mismatched.*stack0_enc0_conv0/kernel"):
        load_model(folder)


def test_untrained_model_from_a_training_config(reference):
    config = json.loads((SLEAP_MODELS / "minimal_instance.UNet.bottomup" / "training_config.json").read_text())
    model = model_from_training_config(config)
    assert [h.name for h in model.head_specs] == ["MultiInstanceConfmapsHead_0", "PartAffinityFieldsHead_0",
                                                  "OffsetRefinementHead_0"]
    assert sum(p.numel() for p in model.parameters()) == sum(
        a.size for layer in flexunet.io.keras.read_keras_weights(
            SLEAP_MODELS / "minimal_instance.UNet.bottomup" / "best_model.h5").values() for a in layer.values())


def test_stacked_heads_get_one_output_per_stack():
    config = {"model": {"backbone": {"unet": {"max_stride": 8, "output_stride": 1, "filters": 4, "filters_rate": 2,
                                              "stacks": 2}},
                        "heads": {"single_instance": {"part_names": ["a", "b", "c"], "sigma": 2.5,
                                                      "output_stride": 1, "offset_refinement": False}}}}
    model = model_from_training_config(config)
    out = model(torch.rand(1, 1, 16, 16))
    assert list(out) == ["SingleInstanceConfmapsHead_0", "SingleInstanceConfmapsHead_1"]
    assert all(v.shape == (1, 3, 16, 16) for v in out.values())
