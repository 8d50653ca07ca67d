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


# ------------------------------------------------------------------------------------- the seed's own models
SEED_LAYERS = {
    # the seed document's section 4, layer for layer: (module, weight shape)
    "seed_large": [("conv1", (64, 3, 3, 3)), ("conv2", (128, 64, 3, 3)), ("conv3", (256, 128, 3, 3)),
                   ("conv4", (512, 256, 3, 3)), ("conv5", (1024, 512, 3, 3)),
                   ("fc1", (1024, 1024)), ("fc2", (512, 1024)), ("fc3", (10, 512))],
    "seed_small": [("conv1", (32, 3, 3, 3)), ("conv2", (64, 32, 3, 3)), ("conv3", (128, 64, 3, 3)),
                   ("fc1", (128, 128)), ("fc2", (10, 128))],
}


@pytest.mark.parametrize("arch, n_params", [("seed_large", 7_850_122), ("seed_small", 111_050)])
def test_seed_models_are_the_seeds_layer_lists(arch, n_params):
    model = build(spec(arch), 3, 32, 10)
    layers = [(name, tuple(m.weight.shape)) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers == SEED_LAYERS[arch]
    assert all(m.bias is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(p.numel() for p in model.parameters()) == n_params  # 7.85 M / 111 k
    assert model.pools == [True] * (4 if arch == "seed_large" else 2)  # 2x2 max-pool after the first 4 / 2 convs


@pytest.mark.parametrize("arch", ["seed_large", "seed_small"])
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 64, 100), (1, 5, 3), (3, 1, 2)])
def test_seed_models_adapt_to_other_data(arch, channels, size, classes):
    model = build(spec(arch), channels, size, classes).eval()
    assert model.conv1.in_channels == channels
    assert (model.fc3 if arch == "seed_large" else model.fc2).out_features == classes
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


def test_seed_models_skip_the_pools_a_small_image_cannot_take():
    assert build(spec("seed_large"), 1, 4, 2).pools == [True, True, False, False]  # 4 -> 2 -> 1
    assert build(spec("seed_large"), 1, 64, 2).pools == [True] * 4


def test_seed_knowledge_transfer_cannot_work():
    """The seed's "knowledge transfer" loads the large model's state dict into the small one: different keys and
    shapes, so it fails, strict or not; distillation (a loss between the outputs) replaces it."""
    large, small = build(spec("seed_large"), 3, 32, 10), build(spec("seed_small"), 3, 32, 10)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        small.load_state_dict(large.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        small.load_state_dict(large.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        small.load_state_dict(large.state_dict(), strict=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_names_its_stages_shallow_to_deep(arch):
    """`model.stages` name 4-D feature maps, shallow to deep; the last is the map the head pools."""
    model = build(spec(arch), 3, 32, 10).eval()
    maps = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: maps.__setitem__(name, o))
             for name in model.stages]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(model.stages) >= 3 and list(maps) == list(model.stages)
    sides = [maps[name].shape[-1] for name in model.stages]
    assert all(maps[name].ndim == 4 for name in model.stages)
    assert sides == sorted(sides, reverse=True)
