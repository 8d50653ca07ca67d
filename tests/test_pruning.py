"""Structured pruning reaches the MACs target and leaves a smaller dense model that still runs."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from kdprune.config import TrainParams
from kdprune.errors import KdpruneError
from kdprune.metrics import compare_latency
from kdprune.models import MODEL_BUILDERS, build
from kdprune.pruning import (SparsityPenalty, count_macs_params, group_norms, macs_cost, prune_at_ratio,
                             prune_in_rounds, prune_to_target, round_goals, search_within, weak_share)
from kdprune.train import Split, fit


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
        prune_to_target(model, torch.randn(1, 1, 8, 8), 0.99)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ targets, rounds, learned sparsity
@pytest.mark.parametrize("arch", ["resnet", "airbench"])
@pytest.mark.parametrize("round_to", [1, 2])
def test_macs_target_is_reached_within_tolerance(arch, round_to):
    model = tiny(arch, width=16, size=16)
    example = torch.randn(1, 1, 16, 16)
    before, _ = count_macs_params(model, example)
    after, _ = count_macs_params(prune_to_target(model, example, 0.5, round_to=round_to, tolerance=0.05), example)
    assert 0.5 <= 1 - after / before <= 0.55


@pytest.mark.parametrize("steps", [1, 3])
def test_steps_sets_the_number_of_rounds(steps):
    model = tiny(width=16)
    example = torch.randn(1, 1, 8, 8)
    between = []
    pruned, rounds = prune_in_rounds(model, example, macs_cost(example, model), 0.6, steps,
                                     between=lambda m, i: between.append(i) or m)
    assert [r["round"] for r in rounds] == list(range(1, steps + 1))
    assert between == list(range(1, steps))  # a fine-tune between rounds, none after the last
    assert [r["goal"] for r in rounds] == pytest.approx(round_goals(0.6, steps))
    assert all(r["cost"] <= r["goal"] for r in rounds)
    assert rounds[-1]["cost"] >= 0.4 - 0.05


def _synthetic_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (x[:, 0, :4].float().mean((1, 2)) > x[:, 0, 4:].float().mean((1, 2))).long()  # top half brighter?
    return Split(x, y, torch.full((1, 1, 1, 1), 127.5), torch.full((1, 1, 1, 1), 74.0))


def test_sparsity_penalty_drives_groups_down_and_those_are_removed():
    train, val = _synthetic_split(512, 0), _synthetic_split(128, 1)
    schedule = TrainParams(epochs=4, batch_size=32, lr=0.05, warmup_epochs=0, weight_decay=0.0,
                           augment={"flip": False, "translate": 0, "cutout": 0})
    example = torch.zeros(1, 1, 8, 8)
    trained = {}
    for reg in (0.0, 0.05):
        model = tiny(width=8, classes=2)
        hook = SparsityPenalty(model, example, reg=reg) if reg else None
        trained[reg], _ = fit(model, train, val, schedule, stage="sparse", after_backward=hook)
    plain, sparse = (group_norms(trained[r].eval(), example) for r in (0.0, 0.05))

    assert weak_share(sparse) < 0.5 * weak_share(plain)

    pruned = prune_at_ratio(copy.deepcopy(trained[0.05]), example, 0.5, global_ranking=True)
    layers, original = dict(pruned.named_modules()), dict(trained[0.05].named_modules())
    assert sum(layers[name].weight.shape[0] < len(norms) for name, norms in sparse.items()) >= 2
    for name, norms in sparse.items():
        # a channel is identified by its batch norm's statistics (its conv's weights also lose input columns)
        bn = name[:-1] + "1" if name.endswith(".0") else name.replace("conv", "bn")
        kept = layers[bn].running_var.shape[0]
        expected = norms.argsort(descending=True)[:kept].sort().values  # the strongest groups survive, in order
        assert torch.equal(layers[bn].running_var, original[bn].running_var[expected]), name


def test_frozen_whitening_is_pruned_by_its_readers_and_stays_frozen():
    """airbench's patch whitening is frozen: its outputs go by how much the next (learned) conv reads them."""
    model = tiny("airbench", width=8, channels=3, size=16)
    whiten, reader = model.features[0].conv, model.features[2]
    with torch.no_grad():
        reader.weight.normal_()  # distinct norms (the dirac init ties them)
    readers_norm = reader.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    pruned = prune_at_ratio(copy.deepcopy(model), torch.zeros(1, 3, 16, 16), 0.5)
    kept_whiten = pruned.features[0].conv
    assert kept_whiten.out_channels == whiten.out_channels // 2
    assert not kept_whiten.weight.requires_grad and kept_whiten.bias.requires_grad
    expected = readers_norm.argsort(descending=True)[: kept_whiten.out_channels].sort().values
    assert torch.equal(kept_whiten.weight, whiten.weight[expected])


def test_no_model_is_timed_on_the_caches_its_predecessor_left():
    """A model whose first call after another model is slow (cold caches) is timed on a warm call."""
    state = {"last": None}

    class Model(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            if state["last"] not in (None, self.name):  # first call after the other model: 20 ms of CPU
                end = time.process_time() + 0.02
                while time.process_time() < end:
                    pass
            state["last"] = self.name
            return x

    measured = compare_latency({"a": Model("a"), "b": Model("b")}, (1, 2, 2), batch=1, repeats=5, threads=1)
    assert max(measured["cpu_ms"].values()) < 5
