"""Structured channel pruning with torch-pruning, to a MACs target (a latency target: kdprune/latency_table.py).

torch-pruning tracks the dependencies (residual adds, batch norms, the next layer's inputs), so a pruned model is
a smaller dense model. How many channels go is *searched*: each candidate is a one-shot prune of a copy of the
model at a pruning ratio, its cost (MACs relative to the unpruned model) is compared with the goal, and a scan
then bisection on the ratio finds the smallest ratio that reaches the goal. Channel counts move in steps (whole channels, multiples of `round_to`), so the result lands at the target or just past it; the
achieved figure is returned, never assumed.

Two ways to rank channels (`method`):
- magnitude: the L2 norm of each channel group of the trained model; every layer loses the same fraction.
  Frozen layers (airbench's patch whitening) are pruned too, their outputs ranked by the learned layers that
  read them: on the CPU that wide, full-resolution layer is most of the quick student's latency.
- sparse (learned sparsity): training first adds a group-sparsity penalty (torch-pruning's GroupNormPruner,
  lambda * group L2 norms, strongest on the weakest groups) while distilling from the teacher, so the data decides
  which groups fade; the groups driven down are then removed with one global ranking, so layers lose what they
  learned they can spare.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from kdprune.errors import KdpruneError

# No layer loses more than this fraction of its channels. Above it torch-pruning skips layers whose count would
# round to zero, so the cost stops falling with the ratio and bisection would no longer hold.
MAX_LAYER_RATIO = 0.85
SCAN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, MAX_LAYER_RATIO)
BISECTIONS = 7  # within a 0.1 scan step: ratio to 1/1280, finer than a channel of these layers


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs of one forward pass on `example` (torch-pruning's counter) and the number of parameters."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    model.train(was_training)
    return int(macs), int(params)


def default_round_to(runtime: str) -> int:
    """Channel multiple by deployment runtime: 8 on CUDA (tensor cores); 1 on the CPU (torch or ONNX Runtime),
    where rounding a 6-channel layer overshoots a MACs target; a latency target's table finds the CPU's steps."""
    return 8 if runtime == "cuda" else 1


def _frozen(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(layer, (nn.Conv2d, nn.Linear)) and weight is not None and not weight.requires_grad


class LearnedMagnitudeImportance(tp.importance.GroupMagnitudeImportance):
    """Group L2 norm over the layers that learn. A frozen layer's filter norms say nothing of importance (airbench's
    patch whitening: they are 1/sqrt(eigenvalue), largest for the noisiest directions), so its output channels are
    ranked by how much the layers that read them use them."""

    def __call__(self, group):
        learned = tp.dependency.Group()
        learned._DG = group._DG
        learned._group = [item for item in group._group if not _frozen(item.dep.layer)]
        return super().__call__(learned if learned._group else group)


def _ignored(model: nn.Module) -> list[nn.Module]:
    """The classifier's outputs are the classes: they stay whole."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


def _pruner(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int, global_ranking: bool,
            cls=tp.pruner.MetaPruner, **kwargs) -> tp.pruner.MetaPruner:
    return cls(model, example, importance=LearnedMagnitudeImportance(p=2), pruning_ratio=ratio,
               global_pruning=global_ranking, max_pruning_ratio=MAX_LAYER_RATIO, ignored_layers=_ignored(model),
               round_to=round_to if round_to > 1 else None, **kwargs)


@contextmanager
def frozen_stays_frozen(model: nn.Module):
    """torch-pruning re-creates pruned parameters as trainable: frozen ones (patch whitening) are frozen again."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    yield model
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def prune_at_ratio(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int = 1,
                   global_ranking: bool = False) -> nn.Module:
    """Remove `ratio` of the prunable channels in one step, in place (per layer, or ranked across layers)."""
    if ratio > 0:
        model.eval()
        with frozen_stays_frozen(model):
            _pruner(model, example, ratio, round_to, global_ranking).step()
    return model


@dataclass
class Search:
    """The outcome of a search: the pruned model, the ratio used, and the cost of each candidate tried."""

    model: nn.Module
    ratio: float
    cost: float
    tried: list[tuple[float, float]] = field(default_factory=list)


def search_ratio(model: nn.Module, example: torch.Tensor, cost: Callable[[nn.Module], float], goal: float,
                 round_to: int = 1, global_ranking: bool = False, what: str = "prune.target") -> Search:
    """The smallest pruning ratio whose pruned copy has `cost(copy) <= goal`; the input model is left untouched.

    `cost` is relative to the unpruned model (1.0 = no saving). A coarse scan finds the first ratio that reaches
    the goal (the cost is not monotone near the top, where layers stop being pruned), then bisection between it
    and the scan point before it.
    """
    def attempt(ratio: float) -> tuple[nn.Module, float]:
        candidate = prune_at_ratio(copy.deepcopy(model), example, ratio, round_to, global_ranking)
        value = cost(candidate)
        tried.append((round(ratio, 4), round(value, 4)))
        return candidate, value

    tried: list[tuple[float, float]] = []
    low, best = 0.0, None
    for ratio in SCAN:
        candidate, value = attempt(ratio)
        if value <= goal:
            best = (ratio, candidate, value)
            break
        low = ratio
    if best is None:
        lowest = min(value for _, value in tried)
        raise KdpruneError(f"{what}: unreachable: the most pruned model tried keeps {lowest:.0%} of the cost "
                           f"(goal {goal:.0%})")
    high, best_model, best_cost = best
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        candidate, value = attempt(mid)
        if value <= goal:
            high, best_model, best_cost = mid, candidate, value
        else:
            low = mid
    return Search(best_model, high, best_cost, tried)


def search_within(model: nn.Module, example: torch.Tensor, cost: Callable[[nn.Module], float], goal: float,
                  round_to: int = 1, global_ranking: bool = False, tolerance: float = 1.0,
                  what: str = "prune.target") -> Search:
    """`search_ratio` with the preferred ranking; if it cannot reach the goal, or lands more than `tolerance` past
    it (a small layer's channel steps are coarse), the other ranking too: the closer of the two wins."""
    try:
        found = search_ratio(model, example, cost, goal, round_to, global_ranking, what)
        if goal - found.cost <= tolerance:
            return found
    except KdpruneError:
        found = None
    try:
        other = search_ratio(model, example, cost, goal, round_to, not global_ranking, what)
    except KdpruneError:
        if found is None:
            raise
        return found
    return other if found is None or other.cost > found.cost else found


def macs_cost(example: torch.Tensor, base: nn.Module) -> Callable[[nn.Module], float]:
    """MACs of a model as a fraction of `base`'s."""
    base_macs, _ = count_macs_params(base, example)
    return lambda model: count_macs_params(model, example)[0] / base_macs


def prune_to_target(model: nn.Module, example: torch.Tensor, target: float, round_to: int | None = 1,
                    global_ranking: bool = False, tolerance: float = 0.05) -> nn.Module:
    """A pruned copy of `model` whose MACs are at least `target` (0..1) lower, within `tolerance` where channel
    steps allow."""
    return search_within(model, example, macs_cost(example, model), 1.0 - target, round_to or 1, global_ranking,
                         tolerance).model


def round_goals(target: float, steps: int) -> list[float]:
    """Cost goals (fraction of the unpruned cost) of `steps` gradual rounds: equal cuts reaching `target`."""
    return [1.0 - target * (i + 1) / steps for i in range(steps)]


def prune_in_rounds(model: nn.Module, example: torch.Tensor, cost: Callable[[nn.Module], float], target: float,
                    steps: int, round_to: int = 1, global_ranking: bool = False, tolerance: float = 1.0,
                    between: Callable[[nn.Module, int], nn.Module] | None = None,
                    what: str = "prune.target") -> tuple[nn.Module, list[dict]]:
    """Prune to `target` (a fraction of the cost to remove) in `steps` rounds; `between(model, round)` (e.g. a KD
    fine-tune) runs after every round but the last. `cost` is relative to the original model throughout.

    Returns the pruned model and one row per round: goal, achieved cost and the ratio used in that round.
    """
    rounds = []
    for i, goal in enumerate(round_goals(target, steps), start=1):
        found = search_within(model, example, cost, goal, round_to, global_ranking, tolerance, what)
        model = found.model
        rounds.append({"round": i, "goal": round(goal, 4), "cost": round(found.cost, 4), "ratio": round(found.ratio, 4)})
        if between is not None and i < steps:
            model = between(model, i)
    return model, rounds


class SparsityPenalty:
    """Group-sparsity regulariser (torch-pruning's GroupNormPruner): after each backward pass, adds
    `reg` * gamma * w to the gradient of every channel group, gamma growing up to `alpha` for the weakest groups,
    so the groups the task needs least are driven toward zero. Call it as fit's `after_backward` hook."""

    def __init__(self, model: nn.Module, example: torch.Tensor, reg: float, alpha: float = 4.0):
        self.pruner = _pruner(model, example, 0.0, 1, True, cls=tp.pruner.GroupNormPruner, reg=reg, alpha=alpha)
        self.model = model

    def __call__(self, model: nn.Module) -> None:
        self.pruner.regularize(self.model, alpha=self.pruner.alpha)


def group_norms(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """L2 norm of each prunable channel group, keyed by the name of the group's first conv/linear layer."""
    dg = tp.DependencyGraph().build_dependency(model.eval(), example)
    names = {m: n for n, m in model.named_modules()}
    importance = LearnedMagnitudeImportance(p=2, normalizer=None)
    out = {}
    for group in dg.get_all_groups(ignored_layers=_ignored(model), root_module_types=[nn.Conv2d, nn.Linear]):
        out[names[group[0].dep.target.module]] = importance(group).sqrt()
    return out


def weak_share(norms: dict[str, torch.Tensor]) -> float:
    """How far the weakest quarter of each layer's channel groups has fallen: their mean norm over the layer's
    strongest, averaged over layers. A penalty that separates the groups drives it down; about 0.8 is untouched."""
    shares = [n.sort().values[: max(1, len(n) // 4)].mean() / n.max() for n in norms.values() if n.max() > 0]
    return round(float(torch.stack(shares).mean()), 4) if shares else 1.0
