"""Opt-in activation checkpointing: identical gradients, far fewer activations kept."""

import pytest
import torch
import torch.nn.functional as F

import flexunet


def loss(model, x):
    out = sum(model.forward_stacks(x))  # stacked models: every stack's output (intermediate supervision)
    return F.mse_loss(out, torch.full_like(out, 0.5))


def grads(model, x):
    model.zero_grad(set_to_none=True)
    loss(model, x).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def saved_bytes(model, x):
    """Bytes of the storages autograd keeps for the backward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss(model, x)
    value.backward()
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["block", "stack"])
@pytest.mark.parametrize("kwargs", [
    dict(filters=8, down_blocks=3, up_blocks=3),
    dict(filters=8, stem_blocks=1, down_blocks=2, up_blocks=2, stacks=2, up_interpolate=True),
])
def test_checkpointing_gives_identical_gradients_and_keeps_less(mode, kwargs):
    torch.manual_seed(0)
    model = flexunet.UNet(**kwargs).train()
    x = torch.rand(2, 1, 32, 32)
    plain, full = grads(model, x), saved_bytes(model, x)
    model.set_checkpointing(mode)
    checkpointed = grads(model, x)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7)
    assert saved_bytes(model, x) < 0.6 * full  # at least 40% fewer activations kept for backward


def test_checkpointing_is_off_in_eval_and_validated():
    model = flexunet.UNet(filters=4, down_blocks=2, up_blocks=2).set_checkpointing("block").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 16, 16)).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="checkpointing mode must be None, 'block' or 'stack'"):
        model.set_checkpointing("layers")
