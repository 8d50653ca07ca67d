"""Every model builder adapts to the data's channels, size and classes; pruned shapes rebuild from a state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdprune.models import MODEL_BUILDERS, build, resize_to_state_dict
from kdprune.pruning import prune_to_target

ARCHS = sorted(MODEL_BUILDERS)


def spec(arch: str, width: int = 4) -> dict:
    return {"arch": arch, "width": width, "depth": 1, "dropout": 0.0}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("classes", [2, 10, 13])
def test_builds_for_data_shape(arch, channels, size, classes):
    torch.manual_seed(0)
    model = build(spec(arch), channels, size, classes)
    x = torch.randn(3, channels, size, size)
    model.train()
    assert model(x).shape == (3, classes)  # train mode (batch statistics, whitening from the batch)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_trainable_parameter(arch):
    torch.manual_seed(0)
    model = build(spec(arch), 1, 8, 4).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_width_changes_size():
    small = sum(p.numel() for p in build(spec("resnet", 4), 3, 32, 10).parameters())
    large = sum(p.numel() for p in build(spec("resnet", 16), 3, 32, 10).parameters())
    assert large > small


def test_unknown_arch_raises():
    with pytest.raises(KeyError):
        build(spec("nope"), 1, 8, 2)


def _trained_a_little(model: nn.Module, channels: int, size: int) -> nn.Module:
    """One train-mode forward so that batch-norm statistics (and any data-dependent init) are not defaults."""
    model.train()
    with torch.no_grad():
        model(torch.randn(16, channels, size, size))
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_resize_to_state_dict_after_pruning_reproduces_outputs(arch):
    torch.manual_seed(0)
    model = _trained_a_little(build(spec(arch, 8), 1, 8, 5), 1, 8)
    original_shapes = {k: v.shape for k, v in model.state_dict().items()}
    model = prune_to_target(model, torch.randn(1, 1, 8, 8), target=0.4)
    state = model.state_dict()
    assert any(state[k].shape != original_shapes[k] for k in state), "pruning changed no shape"

    fresh = build(spec(arch, 8), 1, 8, 5)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)  # the unpruned model does not fit the pruned tensors ...
    resize_to_state_dict(fresh, state)
    fresh.load_state_dict(state)  # ... the resized one does, strictly
    fresh.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_resize_to_state_dict_leaves_matching_layers_alone():
    model = build(spec("resnet"), 1, 8, 3)
    layers_before = dict(model.named_modules())
    resize_to_state_dict(model, build(spec("resnet"), 1, 8, 3).state_dict())
    assert all(layers_before[name] is module for name, module in model.named_modules())
