"""The latency table (HALP): per-layer timings on the runtime, and the per-group channel counts they buy."""

from __future__ import annotations

import copy

import pytest
import torch

from kdprune import latency_table as lt
from kdprune.errors import KdpruneError
from kdprune.pruning import count_macs_params
from test_pruning import tiny


def _one_group_table(ms: list[float]) -> dict:
    """A table with one layer whose output group `a` may keep 4, 8, 12 or 16 channels."""
    return {"table": {"conv": {"cin_group": None, "cout_group": "a", "cin": [3], "cout": [4, 8, 12, 16],
                               "ms": [ms]}}}


def test_a_count_slower_than_a_wider_one_is_never_chosen():
    # 4 channels fall off the fast path: slower than 8 (as ONNX Runtime's blocked convolutions do)
    table = _one_group_table([0.9, 0.5, 0.7, 1.0])
    scores = {"a": torch.arange(16, 0, -1).float()}
    assert lt.allocate(table, scores, {"a": 16}, budget_ms=0.6) == {"a": 8}
    with pytest.raises(KdpruneError, match=r"^prune.latency_target: unreachable.* below 50%") as info:
        lt.allocate(table, scores, {"a": 16}, budget_ms=0.45)  # only 4 is left below 8, and it is slower
    assert "\n" not in str(info.value)


def test_the_cheapest_importance_per_millisecond_goes_first():
    """Two groups save the same time; the one whose dropped channels matter less is cut."""
    table = {"table": {
        "x": {"cin_group": None, "cout_group": "a", "cin": [3], "cout": [4, 8], "ms": [[0.5, 1.0]]},
        "y": {"cin_group": None, "cout_group": "b", "cin": [3], "cout": [4, 8], "ms": [[0.5, 1.0]]}}}
    important = torch.tensor([8., 7, 6, 5, 4, 3, 2, 1])
    counts = lt.allocate(table, {"a": important, "b": important / 10}, {"a": 8, "b": 8}, budget_ms=1.5)
    assert counts == {"a": 8, "b": 4}
    counts = lt.allocate(table, {"a": important / 10, "b": important}, {"a": 8, "b": 8}, budget_ms=1.5)
    assert counts == {"a": 4, "b": 8}


def test_a_measured_table_chooses_counts_that_prune_to_a_model_it_predicts():
    model = tiny(width=16, size=16)
    example = torch.randn(1, 1, 16, 16)
    table = lt.measure_table(model, example, "torch-cpu", batch=32, threads=1, repeats=3, round_to=4)
    layers = table["table"]
    assert set(layers) == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    stem = layers["stem.0"]  # the image's channels are fixed; the stem's outputs are a group
    assert stem["cin"] == [1] and stem["cout"] == [4, 8, 12, 16] and len(stem["ms"][0]) == 4
    assert all(ms > 0 for entry in layers.values() for row in entry["ms"] for ms in row)
    full_counts = lt.group_counts(model, example)
    full = lt.estimate_ms(table, full_counts)
    counts = lt.allocate(table, lt.group_scores(model, example), full_counts, 0.7 * full)
    assert lt.estimate_ms(table, counts) <= 0.7 * full
    assert counts == lt.allocate(table, lt.group_scores(model, example), full_counts, 0.7 * full)  # same table
    pruned = lt.prune_to_counts(copy.deepcopy(model), example, counts)
    assert lt.group_counts(pruned, example) == counts
    assert count_macs_params(pruned, example)[0] < count_macs_params(model, example)[0]
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_pruning_to_counts_keeps_the_most_important_channels():
    model = tiny(width=8)
    example = torch.randn(1, 1, 8, 8)
    with torch.no_grad():  # the stem's channels 0 and 5 carry nothing in any layer of their group
        for name in ("stem.0", "blocks.0.conv2"):
            dict(model.named_modules())[name].weight[[0, 5]] = 0
        for name in ("stem.1", "blocks.0.bn2"):
            dict(model.named_modules())[name].weight[[0, 5]] = 0
            dict(model.named_modules())[name].bias[[0, 5]] = 0
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    counts = {**lt.group_counts(model, example), "stem.0": 6}
    pruned = lt.prune_to_counts(copy.deepcopy(model), example, counts)
    assert pruned.stem[0].out_channels == 6
    torch.testing.assert_close(pruned(x), before)  # the two dead channels were the ones removed


def test_the_onnx_runtime_table_times_single_op_graphs():
    pytest.importorskip("onnxruntime")
    model = tiny(width=8)
    example = torch.randn(1, 1, 8, 8)
    table = lt.measure_table(model, example, "onnxruntime", batch=8, threads=1, repeats=2, round_to=4)
    assert table["runtime"] == "onnxruntime" and table["clock"] == "cpu_ms"
    assert table["table"]["head.3"]["cout"] == [10]  # the classes stay whole
    assert all(ms > 0 for entry in table["table"].values() for row in entry["ms"] for ms in row)


def test_candidate_counts_stay_few_and_end_at_full_width():
    assert lt.candidate_counts(8, 4) == [4, 8]
    assert lt.candidate_counts(96, 1) == list(range(24, 96, 12)) + [96]  # 8 options; the floor keeps 15%
    assert lt.candidate_counts(6, 1) == [1, 2, 3, 4, 5, 6]


def test_pruning_to_counts_keeps_the_frozen_whitening_frozen():
    model = tiny("airbench", width=8, channels=3, size=16)
    example = torch.zeros(1, 3, 16, 16)
    counts = lt.group_counts(model, example)
    whiten = "features.0.conv"
    pruned = lt.prune_to_counts(copy.deepcopy(model), example, {**counts, whiten: counts[whiten] // 2})
    kept = pruned.features[0].conv
    assert kept.out_channels == counts[whiten] // 2
    assert not kept.weight.requires_grad and kept.bias.requires_grad
