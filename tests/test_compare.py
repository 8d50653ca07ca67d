"""The optional compare stage: defaults vs searched at the same wall-clock training budget, over seeds."""

from __future__ import annotations

import json

import torch

from search_fixtures import GOOD_POINT, prepared_digits, search_raw, search_root  # noqa: F401
from kdprune import compare as compare_mod, config
from kdprune.project import Paths
from kdprune.runner import run_stage
from kdprune.tracking import NullTracker

CPU = torch.device("cpu")
STEP_SECONDS = 1 / 64  # exact in binary: the budget arithmetic below has no rounding


class FakeClock:
    """Training time proportional to optimizer steps, so the test does not depend on a busy machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_each_recipe_gets_the_same_wall_clock_budget_and_several_seeds(search_root, monkeypatch):
    raw = search_raw({"compare": {"enabled": True, "seconds": 1.25, "seeds": 3}})
    for role in ("teacher", "student"):
        raw[role]["train"]["batch_size"] = 64
    params = config.parse(raw)
    paths = Paths(search_root)
    paths.search_dir.mkdir()
    searched = {**GOOD_POINT, "batch_size": 128}  # half the steps per epoch of the defaults' 64
    for role in ("teacher", "student"):
        point = {**searched, **({"temperature": 2.0, "alpha": 0.5} if role == "student" else {})}
        paths.search_best(role).write_text(json.dumps({"enabled": True, "point": point}))
    run_stage("teacher", params, paths, NullTracker(), CPU)

    clock, calls, real = FakeClock(), [], compare_mod.train_new

    def timed(model, train_params, prepared, train, *args, **kwargs):
        clock.now += train_params.epochs * (len(train) // train_params.batch_size) * STEP_SECONDS
        calls.append((train_params.batch_size, train_params.epochs, kwargs["seed"]))
        return real(model, train_params, prepared, train, *args, **kwargs)

    monkeypatch.setattr(compare_mod, "time", clock)
    monkeypatch.setattr(compare_mod, "train_new", timed)
    result = run_stage("compare", params, paths, NullTracker(), CPU)

    n_train = len(torch.load(paths.prepared, weights_only=True)["train_y"])
    epochs = {batch: int(1.25 // ((n_train // batch) * STEP_SECONDS)) for batch in (64, 128)}
    assert epochs[128] > epochs[64]  # the same seconds buy the larger batch more epochs
    rows = {(r["model"], r["recipe"]): r for r in result["rows"]}
    assert set(rows) == {(m, r) for m in ("teacher", "distilled") for r in ("defaults", "searched")}
    for (model, recipe), row in rows.items():
        batch = 64 if recipe == "defaults" else 128
        assert row["epochs"] == epochs[batch], (model, recipe)
        assert row["train_seconds_mean"] <= 1.25
        assert len(row["test_accuracies"]) == 3 and 0 < row["test_accuracy_mean"] <= 1
        trained = [c for c in calls if c[0] == batch and c[1] == row["epochs"]]
        assert {seed for _, _, seed in trained} >= {0, 1, 2}  # seed, seed + 1, seed + 2
    assert json.loads(paths.compare_json.read_text())["rows"] == result["rows"]
    report = (paths.search_dir / "compare.md").read_text()
    assert "±" in report and "searched - defaults" in report
    for model in ("teacher", "distilled"):  # single mode: the same model, so the same cost, and no cost remark
        assert rows[model, "defaults"]["macs"] == rows[model, "searched"]["macs"] > 0
    assert f"{rows['teacher', 'defaults']['macs']:,}" in report and "x the MACs" not in report


def test_a_narrower_searched_student_is_reported_at_its_cost():
    row = {"epochs": 3, "seeds": 2, "train_seconds_mean": 1.0, "test_accuracy_std": 0.01}
    rows = [{**row, "model": "distilled", "recipe": "defaults", "arch": "airbench w6", "macs": 2_000_000,
             "test_accuracy_mean": 0.6, "test_accuracies": [0.59, 0.61]},
            {**row, "model": "distilled", "recipe": "searched", "arch": "airbench w5", "macs": 1_000_000,
             "test_accuracy_mean": 0.5, "test_accuracies": [0.49, 0.51]}]
    report = compare_mod.format_table(rows, 60)
    assert "| distilled | searched | airbench w5 | 1,000,000 |" in report
    assert "searched - defaults = -10.00%, larger than twice the larger seed spread (1.00%); the searched model " \
           "has 0.50x the MACs" in report
