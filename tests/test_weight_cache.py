"""The eval-mode weight cache of the MP layers cannot go stale (issue 25, item 6): outside a sampling loop
(`reusing_weights()`) every forward normalizes the parameters as they are, whichever way they were changed; inside
it, they are normalized once."""

import pytest
import torch

from mpdit.model.dit import build_model
from mpdit.nn.primitives import WeightNormBank

X, T, Y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])


def model_pair(stack: bool):
    """Two MP models with different random weights (gains moved off zero, so every layer matters) and the same
    buffers, in eval mode."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=10, mp="all",
                            conditioning="scale-rotation-gate").eval()
        model.stack_weights = stack
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "gain" in name:
                    p.add_(torch.randn_like(p))
        models.append(model)
    for name, buffer in models[1].named_buffers():  # fixed random tables (Fourier features) alike: weights differ
        buffer.copy_(models[0].get_buffer(name))
    return models


def copy_data(model, other):
    for name, p in model.named_parameters():
        p.data.copy_(other.get_parameter(name).data)


def fill_data(model, other):
    """.data.fill_(0.5) of every parameter, in both models."""
    for name, p in model.named_parameters():
        p.data.fill_(0.5)
        other.get_parameter(name).data.fill_(0.5)


def load_state(model, other):
    model.load_state_dict(other.state_dict())


def load_state_assign(model, other):
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)


def optimizer_step_in_train_mode(model, other):
    """train(), an optimizer step that moves the weights to other's, eval() again."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for name, p in model.named_parameters():
        p.grad = p.detach() - other.get_parameter(name).detach()
    optimizer.step()
    model.eval()


WAYS = [copy_data, fill_data, load_state, load_state_assign, optimizer_step_in_train_mode]


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("change", WAYS, ids=[way.__name__ for way in WAYS])
def test_a_forward_after_any_weight_change_uses_the_new_weights(change, stack):
    model, other = model_pair(stack)
    with torch.no_grad():
        model(X, T, Y), model(X, T, Y)  # two eval-mode forwards: where a cache would be filled and used
    change(model, other)
    if change is not optimizer_step_in_train_mode:
        model.eval()
    with torch.no_grad():
        assert torch.allclose(model(X, T, Y), other(X, T, Y), atol=1e-5)


def test_reusing_weights_normalizes_once_and_forgets_on_exit(monkeypatch):
    model, other = model_pair(stack=True)
    calls = []
    real = WeightNormBank.row_scale
    monkeypatch.setattr(WeightNormBank, "row_scale",
                        lambda self, i: (calls.append(i) if self is model.weight_norm else None) or real(self, i))
    with torch.no_grad():
        with model.reusing_weights():
            first = model(X, T, Y)
            per_forward = len(calls)
            assert torch.equal(model(X, T, Y), first) and len(calls) == per_forward  # reused
        copy_data(model, other)  # after the loop: seen
        assert torch.allclose(model(X, T, Y), other(X, T, Y), atol=1e-5) and len(calls) == 2 * per_forward
        model(X, T, Y)
        assert len(calls) == 3 * per_forward  # outside the loop: normalized at every forward
