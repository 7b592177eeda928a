"""Property test over UNet's configuration space.

The parameter count is checked against a closed form written here from the
hyperparameters alone (SLEAP's filter rule and skip rule), independently of
flexunet's specs; shapes and strides against what the hyperparameters imply.
"""

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flexunet import UNet


def closed_form_params(p: dict) -> tuple[int, int]:
    """(parameters, output channels) of a UNet, from its hyperparameters only."""
    S, D, U, cpb = p["stem_blocks"], p["down_blocks"], p["up_blocks"], p["convs_per_block"]

    def f(e):
        return int(p["filters"] * p["filters_rate"] ** e)

    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total, c = 0, p["in_channels"]
    for b in range(S):
        for _ in range(cpb):
            total, c = total + conv(p["stem_kernel_size"], c, f(b)), f(b)
    stem_channels = c if S else None
    k = p["kernel_size"]
    for _ in range(p["stacks"]):
        sources = {}  # stride exponent -> channels; the first source at a stride wins
        if S:
            sources[S] = stem_channels
        for b in range(D):
            for _ in range(cpb):
                total, c = total + conv(k, c, f(b + S)), f(b + S)
            sources.setdefault(S + b, c)
        if p["middle_block"]:
            if cpb > 1:
                for _ in range(cpb - 1):
                    total, c = total + conv(k, c, f(S + D)), f(S + D)
            out = f(S + D - 1) if p["block_contraction"] else f(S + D)
            total, c = total + conv(k, c, out), out
        top = S + max(D, 1)
        for u in range(U):
            first = f(S + D - 1 - u)
            last = f(S + D - 2 - u) if p["block_contraction"] else first
            if not p["up_interpolate"]:
                total, c = total + conv(k, c, first), first
            target = top - u - 1
            if target in sources:
                c += sources[target]
            for i in range(cpb):
                out = first if i == 0 else last
                total, c = total + conv(k, c, out), out
    return total, c


unet_params = st.fixed_dictionaries({
    "filters": st.integers(1, 6),
    "filters_rate": st.sampled_from([0.75, 1, 1.5, 2, 2.5]),
    "kernel_size": st.integers(1, 4),
    "stem_kernel_size": st.integers(1, 5),
    "convs_per_block": st.integers(1, 3),
    "stem_blocks": st.integers(0, 2),
    "down_blocks": st.integers(0, 3),
    "middle_block": st.booleans(),
    "up_interpolate": st.booleans(),
    "block_contraction": st.booleans(),
    "stacks": st.integers(1, 2),
    "in_channels": st.integers(1, 3),
    "up_fraction": st.floats(0, 1),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unet_params)
def test_unet_counts_shapes_and_strides_follow_the_hyperparameters(params):
    params = dict(params)
    if params["stacks"] > 1:
        params["down_blocks"] = max(params["down_blocks"], 1)  # stacks need a decoder back to the stem
    depth = params["stem_blocks"] + params["down_blocks"]
    params["up_blocks"] = round(params.pop("up_fraction") * depth)
    if params["stacks"] > 1:
        params["up_blocks"] = params["down_blocks"]
    try:
        model = UNet(**params)
    except ValueError as err:
        assert "channels" in str(err)  # only a filters/filters_rate combination rounding to 0 channels
        assume(False)
    expected_params, expected_channels = closed_form_params(params)
    assert sum(p.numel() for p in model.parameters()) == expected_params == model.num_params_from_specs()

    S, D, U = params["stem_blocks"], params["down_blocks"], params["up_blocks"]
    max_stride = 2 ** (S + max(D, 1))
    assert model.maximum_stride == max_stride
    assert model.output_stride == max_stride // 2**U
    x = torch.randn(1, params["in_channels"], max_stride, 2 * max_stride)
    with torch.no_grad():
        outs, feats = model.forward_intermediates(x)
    assert len(outs) == len(feats) == params["stacks"]
    for o, fs in zip(outs, feats):
        assert tuple(o.shape) == (1, expected_channels, max_stride // model.output_stride, 2 * max_stride // model.output_stride)
        assert [f.stride for f in fs] == [max_stride // 2**u for u in range(U)]
        assert all(f.tensor.shape[-1] == 2 * max_stride // f.stride for f in fs)
