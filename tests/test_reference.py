"""Parity with SLEAP's Keras UNet on the reference backbones (random weights and inputs)."""

import pytest
import torch

import flexunet
from flexunet.summary import summarize
from tests.conftest import BACKBONE_CASES, BACKBONES, TOLERANCE, load_backbone_case, nchw, relative_error


def build(meta) -> flexunet.UNet:
    h, w, c = meta["input_hwc"]
    if meta["params"] is not None:
        return flexunet.UNet(**meta["params"], in_channels=c)
    return flexunet.UNet.from_config(flexunet.UNetConfig.from_dict(meta["config"]), in_channels=c)


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_outputs_and_intermediate_features_match_keras(case):
    meta, data = load_backbone_case(case)
    model = flexunet.load_keras_weights(build(meta), BACKBONES / f"{case}.h5").eval()
    with torch.no_grad():
        outputs, stacks = model.forward_intermediates(nchw(data["x_nhwc"]))
    ours = list(outputs) + [f.tensor for stack in stacks for f in stack]
    refs = [data[f"y_{i}"] for i in range(len(data.files) - 1)]
    assert len(ours) == len(refs) == meta["n_outputs"] + sum(map(len, meta["intermediate_strides"]))
    errors = [relative_error(a, b) for a, b in zip(ours, refs)]
    assert max(errors) <= TOLERANCE, errors
    assert [[f.stride for f in stack] for stack in stacks] == meta["intermediate_strides"]


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_parameter_count_and_strides_match_keras(case):
    meta, _ = load_backbone_case(case)
    model = build(meta)
    assert sum(p.numel() for p in model.parameters()) == meta["param_count"]
    assert model.num_params_from_specs() == meta["param_count"]
    assert 2 * len(flexunet.io.keras.keras_layers(model)) == meta["n_trainable_weights"]
    assert sorted(flexunet.io.keras.keras_layers(model)) == sorted(meta["weight_names"])
    assert model.encoder_features_stride == meta["encoder_features_stride"]
    assert model.decoder_features_stride == meta["decoder_features_stride"]
    assert model.stacks == meta["stacks"]


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_layer_output_shapes_match_keras(case):
    meta, _ = load_backbone_case(case)
    rows = {r.name: list(r.output_shape) for r in summarize(build(meta), input_shape=tuple(meta["input_hwc"])).rows}
    assert {name: rows.get(name) for name in meta["layer_shapes"]} == meta["layer_shapes"]


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_actual_tensor_shapes_match_keras_layer_shapes(case):
    """Hooks on the built modules see the same shapes Keras recorded, layer by layer."""
    meta, data = load_backbone_case(case)
    model = build(meta).eval()
    seen = {}
    layers = flexunet.io.keras.keras_layers(model)
    for name, module in layers.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, list(o.shape[2:]) + [o.shape[1]]))
    with torch.no_grad():
        model(nchw(data["x_nhwc"]))
    assert seen == {k: v for k, v in meta["layer_shapes"].items() if k in layers}
