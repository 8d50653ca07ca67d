"""Structured pruning reaches the MACs target and leaves a smaller dense model that still runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdprune.errors import KdpruneError
from kdprune.models import MODEL_BUILDERS, build
from kdprune.pruning import count_macs_params, prune_to_target


def conv_linear_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers, counted independently with forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(example)
    for h in handles:
        h.remove()
    return total


def tiny(arch: str = "resnet", width: int = 8, channels: int = 1, size: int = 8, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = build({"arch": arch, "width": width, "depth": 1, "dropout": 0.0}, channels, size, classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, channels, size, size))  # batch-norm statistics, data-dependent init
    return model.eval()


def test_macs_counter_agrees_with_hooks():
    model = tiny()
    example = torch.randn(1, 1, 8, 8)
    macs, params = count_macs_params(model, example)
    assert params == sum(p.numel() for p in model.parameters())
    own = conv_linear_macs(model, example)
    assert own <= macs <= 1.2 * own  # torch-pruning also counts norms and activations


def test_count_keeps_training_mode():
    model = tiny().train()
    count_macs_params(model, torch.randn(1, 1, 8, 8))
    assert model.training


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_prune_reaches_target_and_runs(arch, target):
    model = tiny(arch)
    example = torch.randn(1, 1, 8, 8)
    before, params_before = count_macs_params(model, example)
    own_before = conv_linear_macs(model, example)
    pruned = prune_to_target(model, example, target)
    after, params_after = count_macs_params(pruned, example)
    assert after <= (1 - target) * before
    assert params_after < params_before
    assert conv_linear_macs(pruned, example) <= (1 - target + 0.05) * own_before
    out = pruned(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert pruned(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_classifier_outputs_are_never_pruned():
    model = prune_to_target(tiny(classes=7), torch.randn(1, 1, 8, 8), 0.7)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 7


def test_round_to_keeps_channel_multiples():
    model = prune_to_target(tiny(width=16), torch.randn(1, 1, 8, 8), 0.5, round_to=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 4 == 0 for m in convs)
    assert count_macs_params(model, torch.randn(1, 1, 8, 8))[0] > 0


def test_pruned_model_still_trains():
    model = prune_to_target(tiny(), torch.randn(1, 1, 8, 8), 0.5).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_unreachable_target_is_a_one_line_error():
    # the classifier is never pruned: a model that is almost all classifier cannot lose 99% of its MACs
    model = tiny(width=1, classes=1000)  # about half its MACs are the 4 -> 1000 classifier
    with pytest.raises(KdpruneError, match="prune.target") as info:
        prune_to_target(model, torch.randn(1, 1, 8, 8), 0.99, increments=3)
    assert "\n" not in str(info.value)
