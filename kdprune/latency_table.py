"""Runtime-aware channel choice: a latency table per layer, and the per-layer counts it buys.

HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) measures, once per runtime and
input shape, what every prunable layer costs at each candidate (input, output) channel count, then keeps the
channels worth the most importance per millisecond within a latency budget. A runtime's fast paths are steps, not
a line (ONNX Runtime's blocked convolutions pad channel counts to the SIMD width), so a count that is slower than a
wider one simply never pays in the table and is never chosen.

- `measure_table`: each conv / linear layer alone, at the serving batch, on the runtime (ONNX Runtime single-op
  graphs, or torch), every (in, out) pair of candidate counts, timed with the project's one latency estimator
  (`metrics.compare_latency`: interleaved, median, process CPU time at one thread). A JSON dict, cached by the
  prune stage as a DVC output and reused while its key (architecture, runtime, batch, threads) holds.
- `allocate`: greedy knapsack from the full widths: each step removes, from one channel group, the least important
  channels per millisecond the table says it saves, until the table's total is within the budget. Deterministic
  given the table and the weights, so reruns choose the same architecture.
- `prune_to_counts`: removes each group's least important channels with torch-pruning.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from kdprune.errors import KdpruneError
from kdprune.pruning import MAX_LAYER_RATIO, LearnedMagnitudeImportance, _ignored, frozen_stays_frozen

MAX_OPTIONS = 8  # candidate counts per group: the table is options^2 timings per layer
TABLE_VERSION = 1


@dataclass
class Layer:
    name: str
    module: nn.Module
    cin_group: str | None  # the channel group its input channels belong to (None: fixed, e.g. the image)
    cout_group: str | None  # ... and its output channels (None: fixed, e.g. the classes)
    in_hw: tuple[int, ...]  # input spatial size at batch 1 (empty for a linear layer)


def _groups(model: nn.Module, example: torch.Tensor):
    """torch-pruning's channel groups keyed by the name of their root layer, and each conv/linear layer's groups."""
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example)
    names = {m: n for n, m in model.named_modules()}
    groups, cin, cout = {}, {}, {}
    for group in dg.get_all_groups(ignored_layers=_ignored(model), root_module_types=[nn.Conv2d, nn.Linear]):
        key = names[group[0].dep.target.module]
        groups[key] = group
        for item in group:
            module = item.dep.target.module
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                side = cout if item.dep.handler.__name__ == "prune_out_channels" else cin
                side[names[module]] = key
    hw: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):
            hw.setdefault(name, tuple(inputs[0].shape[2:]))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    layers = [Layer(n, m, cin.get(n), cout.get(n), hw[n]) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and n in hw]
    return dg, groups, layers


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "in" else module.out_channels
    return module.in_features if side == "in" else module.out_features


def candidate_counts(full: int, round_to: int) -> list[int]:
    """Counts a group may keep: multiples of a step (round_to, coarser for wide groups so a layer's table stays
    small) from the floor MAX_LAYER_RATIO leaves up to the full count, which is always a candidate."""
    step = round_to * max(1, math.ceil(full / (MAX_OPTIONS * round_to)))
    floor = max(1, math.ceil(full * (1 - MAX_LAYER_RATIO)))
    counts = [k for k in range(step, full, step) if k >= floor]
    return counts + [full]


def _conv_onnx(layer: Layer, cin: int, cout: int, path: Path) -> None:
    """A one-node ONNX graph (conv + bias + ReLU, as ORT fuses them; or Gemm for a linear layer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, g = layer.module, torch.Generator().manual_seed(0)
    if isinstance(m, nn.Conv2d):
        w = torch.randn(cout, cin // m.groups, *m.kernel_size, generator=g)
        pads = list(m.padding) * 2
        node = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(m.kernel_size),
                                strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=m.groups)
        shape = ["n", cin, *layer.in_hw]
    else:
        w = torch.randn(cout, cin, generator=g)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["c"], transB=1)
        shape = ["n", cin]
    relu = helper.make_node("Relu", ["c"], ["y"])
    graph = helper.make_graph(
        [node, relu], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.numpy(), "w"), numpy_helper.from_array(torch.zeros(cout).numpy(), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


class _OrtLayer(nn.Module):
    def __init__(self, path: Path, threads: int):
        super().__init__()
        from kdprune.export import session

        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])


def _torch_layer(layer: Layer, cin: int, cout: int) -> nn.Module:
    m = layer.module
    if isinstance(m, nn.Conv2d):
        op = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias=True)
    else:
        op = nn.Linear(cin, cout)
    return nn.Sequential(op, nn.ReLU())


def table_key(model: nn.Module, example: torch.Tensor, runtime: str, batch: int, threads: int,
              round_to: int, layers: list[Layer] | None = None) -> dict:
    """What a table is valid for: the layers' full shapes, the runtime, batch, threads and channel step."""
    layers = layers if layers is not None else _groups(model, example)[2]
    return {"version": TABLE_VERSION, "runtime": runtime, "batch": batch, "threads": threads, "round_to": round_to,
            "input_shape": list(example.shape[1:]),
            "layers": {l.name: [_width(l.module, "in"), _width(l.module, "out"), list(l.in_hw)] for l in layers}}


def measure_table(model: nn.Module, example: torch.Tensor, runtime: str, batch: int, threads: int, repeats: int,
                  round_to: int) -> dict:
    """Milliseconds of every prunable layer alone at each candidate (in, out) count, on `runtime`
    ("onnxruntime", "torch-cpu" or "cuda"), at `batch`. Returns `table_key`'s fields plus "clock" and
    {"table": {layer: {"cin_group", "cout_group", "cin": [...], "cout": [...], "ms": [[ms per cout] per cin]}}}."""
    from kdprune.metrics import compare_latency, pruner_clock

    device = torch.device("cuda" if runtime == "cuda" else "cpu")
    clock = pruner_clock(device, threads)
    _, _, layers = _groups(model, example)
    key = table_key(model, example, runtime, batch, threads, round_to, layers)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            cins = candidate_counts(_width(layer.module, "in"), round_to) if layer.cin_group else \
                [_width(layer.module, "in")]
            couts = candidate_counts(_width(layer.module, "out"), round_to) if layer.cout_group else \
                [_width(layer.module, "out")]
            ms = []
            for cin in cins:  # one input shape per call: the candidates that read it are timed interleaved
                ops = {}
                for cout in couts:
                    if runtime == "onnxruntime":
                        path = Path(tmp) / f"{cin}x{cout}.onnx"
                        _conv_onnx(layer, cin, cout, path)
                        ops[str(cout)] = _OrtLayer(path, threads)
                    else:
                        ops[str(cout)] = _torch_layer(layer, cin, cout)
                shape = (cin, *layer.in_hw)
                measured = compare_latency(ops, shape, batch, repeats, device, threads)[clock]
                ms.append([round(measured[str(c)], 5) for c in couts])
            out[layer.name] = {"cin_group": layer.cin_group, "cout_group": layer.cout_group,
                               "cin": cins, "cout": couts, "ms": ms}
    return {**key, "clock": clock, "table": out}


def _lookup(entry: dict, counts: dict[str, int]) -> float:
    cin = counts[entry["cin_group"]] if entry["cin_group"] else entry["cin"][0]
    cout = counts[entry["cout_group"]] if entry["cout_group"] else entry["cout"][0]
    return entry["ms"][entry["cin"].index(cin)][entry["cout"].index(cout)]


def estimate_ms(table: dict, counts: dict[str, int]) -> float:
    """The table's latency of a model with these group counts: the sum of its layers' entries."""
    return sum(_lookup(entry, counts) for entry in table["table"].values())


def _scores(groups: dict) -> dict[str, torch.Tensor]:
    # sum-normalised: a channel's share of its own group, so a narrow group is not emptied (mean normalisation cut
    # a 6-channel group to 1 on the quick profile)
    importance = LearnedMagnitudeImportance(p=2, normalizer="sum")
    return {name: importance(group).detach().cpu() for name, group in groups.items()}


def group_scores(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each channel group's importance per channel (L2 norm over the learned layers, as a share of the group's
    total), keyed like the table; a group's count is its length."""
    return _scores(_groups(model, example)[1])


def group_counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    return {name: len(group[0].idxs) for name, group in _groups(model, example)[1].items()}


def allocate(table: dict, scores: dict[str, torch.Tensor], counts: dict[str, int], budget_ms: float,
             what: str = "prune.latency_target") -> dict[str, int]:
    """Per-group counts whose table latency is within `budget_ms`, starting from `counts` and greedily dropping,
    each step, the channels that cost the least importance per millisecond saved (steps that save nothing are
    never taken). Raises KdpruneError naming `what` when even the smallest counts stay above the budget."""
    options = {}
    for entry in table["table"].values():
        for side in ("cin", "cout"):
            if entry[f"{side}_group"]:
                options[entry[f"{side}_group"]] = entry[side]
    ranked = {g: s.sort(descending=True).values for g, s in scores.items()}
    counts = dict(counts)
    current = estimate_ms(table, counts)
    full = estimate_ms(table, {g: opts[-1] for g, opts in options.items()})
    while current > budget_ms:
        best = None
        for g in sorted(options):
            for k in options[g]:
                if k >= counts[g]:
                    break
                saved = current - estimate_ms(table, {**counts, g: k})
                if saved <= 0:
                    continue
                lost = float(ranked[g][k:counts[g]].sum())
                if best is None or lost / saved < best[0]:
                    best = (lost / saved, g, k, current - saved)
        if best is None:
            raise KdpruneError(f"{what}: unreachable on this runtime: no smaller channel count saves time below "
                               f"{current / full:.0%} of the latency in the table (goal {budget_ms / full:.0%})")
        _, g, k, current = best
        counts[g] = k
    return counts


def prune_to_counts(model: nn.Module, example: torch.Tensor, counts: dict[str, int]) -> nn.Module:
    """Keep `counts[group]` channels of each group, the most important ones, in place."""
    dg, groups, _ = _groups(model, example)
    scores = _scores(groups)
    with frozen_stays_frozen(model):
        for name, group in groups.items():
            drop = len(group[0].idxs) - counts[name]
            if drop > 0:
                root = group[0].dep
                dg.get_pruning_group(root.target.module, root.handler, scores[name].argsort()[:drop].tolist()).prune()
    return model.eval()
