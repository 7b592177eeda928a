"""Every model traces whole: ONNX (onnxruntime), torch.export and torch.compile(fullgraph=True)."""

import numpy as np
import pytest
import torch

import flexunet
from flexunet.sleap import load_model
from tests.conftest import SLEAP_MODELS

onnxruntime = pytest.importorskip("onnxruntime")


def models():
    yield "transposed", lambda: flexunet.UNet(filters=4, down_blocks=3, up_blocks=3)
    yield "bilinear_stacked", lambda: flexunet.UNet(filters=4, down_blocks=2, up_blocks=2, up_interpolate=True, stacks=2)
    yield "stem_os4", lambda: flexunet.UNet(filters=4, stem_blocks=1, stem_kernel_size=7, down_blocks=2, up_blocks=1)
    yield "sleap_bottomup", lambda: load_model(SLEAP_MODELS / "minimal_instance.UNet.bottomup")
    yield "sleap_topdown_classes", lambda: load_model(SLEAP_MODELS / "min_tracks_2node.UNet.topdown_multiclass")


MODELS = dict(models())


def build(name, reference_needed=True):
    if name.startswith("sleap"):
        from tests.conftest import require_reference

        require_reference()
    torch.manual_seed(0)
    return MODELS[name]().eval()


def as_list(y):
    if isinstance(y, dict):
        return list(y.values())
    return list(y) if isinstance(y, (list, tuple)) else [y]


def channels(model):
    return model.in_channels


@pytest.mark.parametrize("name", ["transposed", "bilinear_stacked", "sleap_bottomup"])
def test_onnx_runs_at_two_sizes(tmp_path, name):
    model = build(name)
    s = model.maximum_stride
    example = torch.rand(1, channels(model), 2 * s, 2 * s)
    path = flexunet.export_onnx(model, tmp_path / "m.onnx", example)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == flexunet.export.output_names(model)
    for shape in [(2, channels(model), 3 * s, 2 * s), (1, channels(model), 5 * s, 4 * s)]:
        x = torch.rand(*shape)
        got = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = as_list(model(x))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            assert np.abs(g - w.numpy()).max() <= 1e-4 * max(1.0, float(w.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_with_dynamic_height_and_width(name):
    model = build(name)
    s = model.maximum_stride
    program = flexunet.export_program(model, torch.rand(2, channels(model), 2 * s, 2 * s))
    for shape in [(3, channels(model), 3 * s, 5 * s), (1, channels(model), 2 * s, 2 * s)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            got, want = as_list(program.module()(x)), as_list(model(x))
        assert len(got) == len(want)
        assert len(got) == len(want)
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-5) for g, w in zip(got, want))


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_has_no_graph_breaks(name):
    """`backend="eager"` traces with Dynamo exactly as inductor would, without code generation."""
    torch._dynamo.reset()
    model = build(name)
    x = torch.rand(2, channels(model), 2 * model.maximum_stride, 2 * model.maximum_stride)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, want = as_list(compiled(x)), as_list(model(x))
    # Eager runs flexunet's CPU fast paths, the traced graph plain convolutions: equal to rounding.
    assert len(got) == len(want)
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-5) for g, w in zip(got, want))


def test_compile_with_inductor_matches_eager():
    torch._dynamo.reset()
    model = build("transposed")
    x = torch.rand(2, 1, 32, 32)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_input_validation_survives_tracing():
    """The traced program still refuses sizes that are not multiples of the maximum stride."""
    model = build("transposed")
    program = flexunet.export_program(model, torch.rand(1, 1, 16, 16))
    # The exported program's own guard (torch.export raises AssertionError for guards).
    with pytest.raises(AssertionError, match=r"size\(\)\[2\] % 8 == 0"):
        program.module()(torch.rand(1, 1, 20, 16))
    # Compiled without fullgraph, Dynamo falls back to eager and the ValueError is the user's;
    # with fullgraph=True it is wrapped, but its sentence is kept.
    with pytest.raises(ValueError, match="multiple of the maximum stride 8"):
        torch.compile(model, backend="eager")(torch.rand(1, 1, 20, 16))
    # (Dynamo wraps it where the graph holds flexunet's operators, on CPUs with the native kernels.)
    with pytest.raises((ValueError, torch._dynamo.exc.TorchDynamoException),
                       match="multiple of the maximum stride 8, got 20"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.rand(1, 1, 20, 16))
