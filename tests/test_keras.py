"""`load_keras_weights`: both Keras file layouts, strict matching, all-or-nothing."""

import shutil

import h5py
import pytest
import torch

import flexunet
from tests.conftest import BACKBONES, TOLERANCE, load_backbone_case, nchw, relative_error

TINY = dict(filters=8, filters_rate=2, down_blocks=4, up_blocks=4)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_whole_model_file_loads(reference):
    model = flexunet.load_keras_weights(flexunet.UNet(**TINY), BACKBONES / "tiny_reference.h5")
    assert isinstance(model, flexunet.UNet)


def test_save_weights_layout_loads_the_same(reference, tmp_path):
    """A `model.save_weights` file keeps the layer groups at the root instead of under model_weights/."""
    meta, data = load_backbone_case("tiny_reference")
    path = tmp_path / "weights.h5"
    with h5py.File(BACKBONES / "tiny_reference.h5", "r") as src, h5py.File(path, "w") as dst:
        group = src["model_weights"]
        for key, value in group.attrs.items():
            dst.attrs[key] = value
        for name in group:
            group.copy(name, dst)
    model = flexunet.load_keras_weights(flexunet.UNet(**TINY), path).eval()
    with torch.no_grad():
        assert relative_error(model(nchw(data["x_nhwc"])), data["y_0"]) <= TOLERANCE


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        flexunet.load_keras_weights(flexunet.UNet(filters=4), "nope.h5")


@pytest.mark.parametrize("content", [b"not an hdf5 file", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b""])
def test_not_hdf5(tmp_path, content):
    path = tmp_path / "model.h5"
    path.write_bytes(content)
    model = flexunet.UNet(filters=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model.h5"):
        flexunet.load_keras_weights(model, path)
    assert_unchanged(model, before)


def test_wrong_architecture_lists_every_layer_and_changes_nothing(reference):
    model = flexunet.UNet(filters=16, down_blocks=3, up_blocks=3)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        flexunet.load_keras_weights(model, BACKBONES / "tiny_reference.h5")
    message = str(err.value)
    assert "tiny_reference.h5" in message
    assert "missing from the file" in message and "stack0_enc4_middle_expand_conv0" in message
    assert "not in the model" in message and "stack0_dec3_s2_to_s1_trans_conv" in message
    assert "mismatched" in message and "stack0_enc0_conv0/kernel" in message
    assert_unchanged(model, before)


def test_shape_mismatch_is_reported_in_keras_layout(reference):
    model = flexunet.UNet(filters=16, down_blocks=4, up_blocks=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"stack0_enc0_conv0/kernel: file has \(3, 3, 1, 8\), model needs \(3, 3, 1, 16\)"):
        flexunet.load_keras_weights(model, BACKBONES / "tiny_reference.h5")
    assert_unchanged(model, before)


def test_deleted_weight_is_a_mismatch(reference, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copy(BACKBONES / "tiny_reference.h5", path)
    with h5py.File(path, "r+") as f:
        group = f["model_weights/stack0_enc1_conv0/stack0_enc1_conv0"]
        del group["bias:0"]
        names = [n for n in f["model_weights/stack0_enc1_conv0"].attrs["weight_names"] if "bias" not in str(n)]
        f["model_weights/stack0_enc1_conv0"].attrs["weight_names"] = names
    model = flexunet.UNet(**TINY)
    before = snapshot(model)
    with pytest.raises(ValueError, match="stack0_enc1_conv0: weights \\['kernel'\\], expected \\['bias', 'kernel'\\]"):
        flexunet.load_keras_weights(model, path)
    assert_unchanged(model, before)


def test_batch_norm_weights_load_into_the_running_statistics(tmp_path):
    spec = flexunet.SimpleConvBlock(pool=False, num_convs=1, filters=3, batch_norm=True)
    block = torch.nn.ModuleDict({"enc0": spec.make_block(2, "enc0")})
    values = {"gamma:0": [1.0, 2.0, 3.0], "beta:0": [0.1, 0.2, 0.3], "moving_mean:0": [4.0, 5.0, 6.0],
              "moving_variance:0": [7.0, 8.0, 9.0]}
    path = tmp_path / "bn.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"enc0_conv0", b"enc0_bn0"]
        conv = f.create_group("enc0_conv0")
        conv.attrs["weight_names"] = [b"enc0_conv0/kernel:0", b"enc0_conv0/bias:0"]
        conv["enc0_conv0/kernel:0"] = torch.randn(3, 3, 2, 3).numpy()
        conv["enc0_conv0/bias:0"] = torch.randn(3).numpy()
        bn = f.create_group("enc0_bn0")
        bn.attrs["weight_names"] = [f"enc0_bn0/{k}".encode() for k in values]
        for k, v in values.items():
            bn[f"enc0_bn0/{k}"] = v
    flexunet.load_keras_weights(block, path)
    bn = block["enc0"].bn0
    assert bn.weight.tolist() == [1, 2, 3] and bn.running_var.tolist() == [7, 8, 9]
    assert torch.allclose(bn.bias, torch.tensor([0.1, 0.2, 0.3])) and bn.running_mean.tolist() == [4, 5, 6]
