"""The one pruner: a distilled student's channels removed to `prune`'s MACs or latency target, with KD.

The prune stage and the Pareto search's trials both call `prune_with_kd`, so the front a user picks from is
measured with the pruner that will build the chosen point: the same method (magnitude, or learned sparsity first),
the same rounds with KD fine-tunes between them, the same channel rounding. A trial runs it on a shorter schedule
(`fraction` of every epoch count, as its training is).

A MACs target (`prune.target`) is searched as a pruning ratio (kdprune/pruning.py). A latency target
(`prune.latency_target`) is spent with the runtime's latency table (kdprune/latency_table.py, HALP): per-layer
channel counts chosen by importance per millisecond, so the table, not a noisy re-measurement, decides.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdprune import latency_table as lt
from kdprune.config import Params
from kdprune.errors import KdpruneError
from kdprune.io import write_json
from kdprune.pruning import (SparsityPenalty, default_round_to, group_norms, macs_cost, prune_in_rounds, round_goals,
                              search_within, weak_share)
from kdprune.train import Split, fit


def runtime_device(runtime: str) -> torch.device:
    """Where `prune.runtime` measures latency; a runtime this machine lacks is one line naming the option."""
    if runtime == "cuda" and not torch.cuda.is_available():
        raise KdpruneError("prune.runtime: cuda, but this machine has no CUDA device")
    if runtime == "onnxruntime":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise KdpruneError("prune.runtime: onnxruntime, but the onnxruntime package is not installed "
                               "(pip install 'kdprune[pipeline]')")
    return torch.device("cuda" if runtime == "cuda" else "cpu")


def scaled(epochs: int, fraction: float) -> int:
    """An epoch count on a trial's shorter schedule (0 stays 0)."""
    return 0 if epochs == 0 else max(1, round(epochs * fraction))


@dataclass
class Pruned:
    model: nn.Module  # pruned, not yet fine-tuned
    ranked: nn.Module  # the model whose channels were ranked: the distilled one, or its sparse-trained copy
    rounds: list[dict]
    cut: Callable[[float], tuple[nn.Module, float]]  # cut(target): `ranked` pruned one-shot, and its cost reached
    unit: str  # "MACs" or "latency"
    target: float
    round_to: int
    global_ranking: bool
    kd: Callable[..., nn.Module]  # kd(model, epochs, stage): a KD fine-tune with prune.finetune's schedule
    separation: dict | None = None  # method sparse: the weakest-quarter norm share before and after the penalty


def latency_table_for(model: nn.Module, example: torch.Tensor, params: Params, round_to: int,
                      path: Path | None) -> dict:
    """The runtime's latency table for `model`'s layers: read from `path` while its key still holds (same
    architecture, runtime, batch, threads, channel step), else measured and written there."""
    p = params.prune
    key = lt.table_key(model, example, p.runtime, p.latency_batch, p.latency_threads, round_to)
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}
        if {k: cached.get(k) for k in key} == key:
            return cached
    start = time.perf_counter()
    table = lt.measure_table(model, example, p.runtime, p.latency_batch, p.latency_threads, p.latency_repeats,
                             round_to)
    print(f"prune: latency table of {len(table['table'])} layers measured on {p.runtime} at batch "
          f"{p.latency_batch} in {time.perf_counter() - start:.0f} s" + (f" -> {path}" if path else ""),
          file=sys.stderr)
    if path is not None:
        write_json(path, table)
    return table


def prune_by_table(model: nn.Module, example: torch.Tensor, table: dict, target: float, steps: int,
                   between: Callable[[nn.Module, int], nn.Module] | None = None,
                   what: str = "prune.latency_target") -> tuple[nn.Module, list[dict]]:
    """`prune_in_rounds` for a latency target: each round keeps, per group, the counts the table buys within that
    round's share of the budget (importance from the current weights). Costs are the table's, relative to it at
    full width."""
    full = lt.estimate_ms(table, lt.group_counts(model, example))
    rounds = []
    for i, goal in enumerate(round_goals(target, steps), start=1):
        scores = lt.group_scores(model, example)
        counts = lt.allocate(table, scores, {g: len(s) for g, s in scores.items()}, goal * full, what)
        model = lt.prune_to_counts(copy.deepcopy(model), example, counts)
        rounds.append({"round": i, "goal": round(goal, 4), "cost": round(lt.estimate_ms(table, counts) / full, 4),
                       "counts": counts})
        if between is not None and i < steps:
            model = between(model, i)
    return model, rounds


def prune_with_kd(distilled: nn.Module, teacher: nn.Module, params: Params, train: Split, val: Split,
                  example: torch.Tensor, fraction: float = 1.0, stage: str = "prune",
                  table_path: Path | None = None) -> Pruned:
    """Prune a copy of `distilled` to `params.prune`'s target (method, rounds, rounding, runtime), KD fine-tuning
    between rounds (and, for `method: sparse`, KD training under the group penalty first). A latency target uses
    the latency table cached at `table_path`. Raises KdpruneError naming the option when the target cannot be
    reached."""
    p = params.prune
    runtime_device(p.runtime)  # a runtime this machine lacks fails here, before any training
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
    between = lambda m, i: kd(m, p.round_epochs, f"{stage} round {i}/{p.steps}")  # noqa: E731
    global_ranking = p.method == "sparse"
    if p.latency_target is not None:
        unit, target, what = "latency", p.latency_target, "prune.latency_target"
        table = latency_table_for(distilled, example, params, round_to, table_path)
        model, rounds = prune_by_table(ranked, example, table, target, p.steps, between, what)

        def cut(goal_target: float) -> tuple[nn.Module, float]:
            pruned, rows = prune_by_table(ranked, example, table, goal_target, 1, what="prune.sensitivity")
            return pruned, rows[-1]["cost"]
    else:
        unit, target, what = "MACs", p.target, "prune.target"
        cost = macs_cost(example, distilled)
        model, rounds = prune_in_rounds(ranked, example, cost, target, p.steps, round_to, global_ranking,
                                        p.tolerance, between=between, what=what)

        def cut(goal_target: float) -> tuple[nn.Module, float]:
            found = search_within(ranked, example, cost, 1 - goal_target, round_to, global_ranking, p.tolerance,
                                  "prune.sensitivity")
            return found.model, found.cost
    return Pruned(model, ranked, rounds, cut, unit, target, round_to, global_ranking, kd, separation)
