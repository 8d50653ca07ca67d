"""Structured channel pruning with torch-pruning, to a MACs-reduction target."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from kdprune.errors import KdpruneError


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs of one forward pass on `example` (torch-pruning's counter) and the number of parameters."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    model.train(was_training)
    return int(macs), int(params)


def prune_to_target(model: nn.Module, example: torch.Tensor, target: float, round_to: int = 1,
                    increments: int = 50) -> nn.Module:
    """Remove whole channels (smallest L2 norm per dependency group) until MACs drop by `target` (0..1).

    torch-pruning tracks the dependencies (residual adds, batch norms, the next layer's inputs), so the pruned
    model is a smaller dense model that really runs faster. Channels are removed in `increments` small rounds,
    stopping at the first round that reaches the target; the classifier's outputs are never pruned.
    """
    model.eval()
    base_macs, _ = count_macs_params(model, example)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    # frozen layers (airbench's patch whitening: filter norms there are 1/sqrt(eigenvalue), not importance) stay whole
    frozen = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.95, iterative_steps=increments, ignored_layers=classifier + frozen,
        round_to=round_to if round_to > 1 else None,
    )
    for _ in range(increments):
        pruner.step()
        macs, _ = count_macs_params(model, example)
        if macs <= (1.0 - target) * base_macs:
            return model
    raise KdpruneError(f"prune.target: could not remove {target:.0%} of MACs (reached {1 - macs / base_macs:.0%})")
