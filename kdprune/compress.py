"""The one pruner: a distilled student's channels removed to `prune`'s MACs or latency target, with KD.

The prune stage and the Pareto search's trials both call `prune_with_kd`, so the front a user picks from is
measured with the pruner that will build the chosen point: the same method (magnitude, or learned sparsity first),
the same rounds with KD fine-tunes between them, the same channel rounding. A trial runs it on a shorter schedule
(`fraction` of every epoch count, as its training is).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kdprune.config import Params
from kdprune.errors import KdpruneError
from kdprune.pruning import SparsityPenalty, default_round_to, group_norms, macs_cost, prune_in_rounds, weak_share
from kdprune.train import Split, fit


def runtime_device(runtime: str) -> torch.device:
    """Where `prune.runtime` measures latency."""
    if runtime == "cuda" and not torch.cuda.is_available():
        raise KdpruneError("prune.runtime: cuda, but this machine has no CUDA device")
    return torch.device("cuda" if runtime == "cuda" else "cpu")


def scaled(epochs: int, fraction: float) -> int:
    """An epoch count on a trial's shorter schedule (0 stays 0)."""
    return 0 if epochs == 0 else max(1, round(epochs * fraction))


@dataclass
class Pruned:
    model: nn.Module  # pruned, not yet fine-tuned
    ranked: nn.Module  # the model whose channels were ranked: the distilled one, or its sparse-trained copy
    rounds: list[dict]
    cost: Callable[[nn.Module], float]  # relative to the distilled model (1.0 = no saving)
    unit: str  # "MACs" or "latency"
    target: float
    round_to: int
    global_ranking: bool
    kd: Callable[..., nn.Module]  # kd(model, epochs, stage): a KD fine-tune with prune.finetune's schedule
    separation: dict | None = None  # method sparse: the weakest-quarter norm share before and after the penalty


def prune_with_kd(distilled: nn.Module, teacher: nn.Module, params: Params, train: Split, val: Split,
                  example: torch.Tensor, fraction: float = 1.0, stage: str = "prune") -> Pruned:
    """Prune a copy of `distilled` to `params.prune`'s target (method, rounds, rounding, runtime), KD fine-tuning
    between rounds (and, for `method: sparse`, KD training under the group penalty first). Raises KdpruneError
    naming the option when the target cannot be reached."""
    p = params.prune
    runtime = runtime_device(p.runtime)
    round_to = p.round_to or default_round_to(p.runtime)

    def kd(model: nn.Module, epochs: int, name: str, after_backward=None) -> nn.Module:
        epochs = scaled(epochs, fraction)
        schedule = p.finetune.model_copy(update={"epochs": epochs,
                                                 "warmup_epochs": min(p.finetune.warmup_epochs, epochs)})
        model, _ = fit(model, train, val, schedule, stage=name, seed=params.seed, teacher=teacher,
                       distill=params.distill, after_backward=after_backward)
        return model.cpu().eval()

    distilled.eval()
    ranked, separation = copy.deepcopy(distilled), None
    if p.method == "sparse":
        before = weak_share(group_norms(ranked, example))
        penalty = SparsityPenalty(ranked, example, p.sparsity.reg, p.sparsity.alpha)
        ranked = kd(ranked, p.sparsity.epochs, f"{stage} (sparse training)", after_backward=penalty)
        separation = {"weak_share_before": before, "weak_share_after": weak_share(group_norms(ranked, example))}
    if p.latency_target is not None:
        from kdprune.metrics import latency_cost  # metrics imports pruning: imported here

        unit, target, what = "latency", p.latency_target, "prune.latency_target"
        cost = latency_cost(distilled, tuple(example.shape[1:]), p.latency_batch, p.latency_repeats, runtime,
                            p.latency_threads)
    else:
        unit, target, what = "MACs", p.target, "prune.target"
        cost = macs_cost(example, distilled)
    global_ranking = p.method == "sparse"
    model, rounds = prune_in_rounds(ranked, example, cost, target, p.steps, round_to, global_ranking, p.tolerance,
                                    between=lambda m, i: kd(m, p.round_epochs, f"{stage} round {i}/{p.steps}"),
                                    what=what)
    return Pruned(model, ranked, rounds, cost, unit, target, round_to, global_ranking, kd, separation)
