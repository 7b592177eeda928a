"""Introspection: per-layer table, receptive field, FLOPs and memory."""

import pytest
import torch

import flexunet
from flexunet import UNet
from flexunet.summary import receptive_field, summarize


def test_default_unet_summary_figures():
    s = summarize(UNet())
    assert s.total_params == 34_512_128
    assert round(s.flops / 1e9, 1) == 57.1  # GFLOP per 192x192 image, 2 per multiply-add
    assert (s.encoder_stride, s.output_stride) == (16, 1)
    assert s.output_shapes == [(192, 192, 64)]
    assert s.param_bytes == 4 * 34_512_128
    text = str(s)
    assert "34,512,128" in text and "stack0_dec3_s2_to_s1_refine_conv1" in text and "receptive field" in text


def test_flops_scale_with_the_input_area():
    model = UNet(filters=8)
    assert summarize(model, (1, 128, 256)).flops == 2 * summarize(model, (1, 128, 128)).flops


def test_activation_memory_matches_the_tensors_the_layers_produce():
    model = UNet(filters=4, down_blocks=2, up_blocks=2).eval()
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel() * 4

    layers = flexunet.io.keras.keras_layers(model)
    weightless = [m for block in model.blocks.values() for m in block.modules()
                  if isinstance(m, (torch.nn.MaxPool2d, flexunet.nn.layers.MaxPool2dSame, flexunet.nn.layers.Upsample))]
    for m in list(layers.values()) + weightless:
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, 32, 32))
    concat = sum(4 * r.output_shape[0] * r.output_shape[1] * r.output_shape[2]
                 for r in summarize(model, (1, 32, 32)).rows if r.kind == "Concatenate")
    assert summarize(model, (1, 32, 32)).activation_bytes == total + concat


def empirical_receptive_field(model, size: int) -> int:
    """Widest span of input columns that move one output pixel, with all paths monotone."""
    torch.manual_seed(0)
    model = model.double()  # float32 would absorb the faint influence at the field's edge
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) * 0.1 + 0.01)  # positive weights: ReLUs open, max pools pass a bump
        height = 2 * model.maximum_stride  # a band: horizontal paths need no more rows
        batch = torch.full((size + 1, model.in_channels, height, size), 0.5, dtype=torch.float64)
        for c in range(size):  # image c has a bump in column c; the last image stays flat
            batch[c, :, height // 2, c] += 100.0
        out = model(batch)  # the last stack's output
        diff = (out[:-1] - out[-1:]).abs().sum(1)  # (size, H_out, W_out)
        diff = diff > 1e-13 * diff.max()
    row = model.maximum_stride // model.output_stride
    centre, period = diff.shape[-1] // 2, model.maximum_stride // model.output_stride
    widest = 0
    for col in range(centre - period, centre + period):  # every alignment to the strides
        hits = torch.nonzero(diff[:, row, col]).flatten()
        widest = max(widest, int(hits.max() - hits.min() + 1))
    return widest


@pytest.mark.parametrize("kwargs", [
    dict(filters=2, down_blocks=2, up_blocks=2),
    dict(filters=2, down_blocks=2, up_blocks=2, up_interpolate=True),
    dict(filters=2, down_blocks=2, up_blocks=1, kernel_size=5),
    dict(filters=2, down_blocks=2, up_blocks=2, kernel_size=4),
    dict(filters=2, stem_blocks=1, stem_kernel_size=7, down_blocks=1, up_blocks=1),
    dict(filters=2, down_blocks=1, up_blocks=1, stacks=2),
    dict(filters=1, down_blocks=4, up_blocks=4),  # the default layout: 220 px
])
def test_receptive_field_matches_the_measured_one(kwargs):
    model = UNet(**kwargs).eval()
    rf = receptive_field(model)
    stride = model.maximum_stride
    size = stride * ((2 * (rf + stride)) // stride + 1)
    assert empirical_receptive_field(model, size) == rf


def test_summary_of_a_sleap_model_lists_heads():
    from flexunet.nn.heads import HeadSpec
    from flexunet.sleap import SleapModel

    model = SleapModel(UNet(filters=4, down_blocks=3, up_blocks=2), [
        HeadSpec("CentroidConfmapsHead", "CentroidConfmapsHead_0", 1, 2),
        HeadSpec("ClassVectorsHead", "ClassVectorsHead", 3, 8, activation="softmax", num_fc_layers=2, num_fc_units=5),
    ])
    s = summarize(model, (1, 64, 64))
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert "CentroidConfmapsHead_0" in str(s) and "32x32x1" in str(s) and "ClassVectorsHead" in str(s)


def test_shapes_nchw_chw_and_the_sleap_alias_agree():
    model = UNet(filters=8, down_blocks=2, up_blocks=2)
    a, b = summarize(model, (2, 1, 64, 96)), summarize(model, (1, 64, 96))
    c = summarize(model, input_shape=(64, 96, 1))  # SLEAP's (H, W, C)
    assert a.flops == b.flops == c.flops and a.input_shape == c.input_shape == (64, 96, 1)
    with pytest.raises(ValueError, match="channels"):
        summarize(model, (64, 96, 1))  # read as C=64
    with pytest.raises(TypeError, match="not both"):
        summarize(model, (1, 64, 96), input_shape=(64, 96, 1))
