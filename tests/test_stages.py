"""Every stage in-process on digits with tiny params and a NullTracker; promotion logic."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import CORE_STAGES, deep_update, leftovers, tiny_params_dict
from kdprune import config
from kdprune.checkpoint import load_model
from kdprune.errors import KdpruneError
from kdprune.io import read_json
from kdprune.project import Paths
from kdprune.report import format_table
from kdprune.runner import STAGES, run_stage
from kdprune.stages import MODEL_NAMES
from kdprune.serving import with_normalization
from kdprune.tracking import NullTracker

CPU = torch.device("cpu")


def test_core_stages_are_registered():
    assert set(CORE_STAGES) <= set(STAGES)


def test_all_outputs_exist(trained_project):
    paths = Paths(trained_project)
    assert paths.prepared.is_file()
    for name in MODEL_NAMES:
        assert paths.model(name).is_file(), name
        assert paths.stage_metrics(name).is_file(), name
        assert paths.curve(name).is_file(), name
    assert paths.report_json.is_file() and paths.report_md.is_file()
    assert leftovers(trained_project) == []


def test_report_has_every_model(trained_project):
    report = read_json(Paths(trained_project).report_json)
    assert set(report["models"]) == set(MODEL_NAMES)
    for name, row in report["models"].items():
        for key in ("test_accuracy", "val_accuracy", "params", "macs", "cpu_latency_ms_b1", "cpu_latency_ms_batch",
                    "size_kb"):
            assert key in row, (name, key)
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["params"] > 0 and row["macs"] > 0 and row["cpu_latency_ms_b1"] > 0
        assert row["latency_batch"] == 8
    assert report["dataset"]["source"] == "digits" and report["dataset"]["classes"] == 10
    models = report["models"]
    assert models["teacher"]["params"] > models["student"]["params"]
    assert models["student"]["params"] == models["distilled"]["params"]
    assert models["pruned"]["macs"] <= 0.5 * models["distilled"]["macs"]
    assert models["teacher"]["test_accuracy"] > 0.5  # ten classes: chance is 0.1


def test_dvc_metrics_are_the_report_without_its_timings(trained_project):
    """reports/metrics.json (DVC's metrics) carries accuracies, costs and the KD gain; the measured times stay in
    reports/report.json, so `dvc metrics diff` does not list the latency noise of unchanged models."""
    paths = Paths(trained_project)
    metrics, report = read_json(paths.metrics_json), read_json(paths.report_json)

    def keys(tree, prefix=""):
        for k, v in tree.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    timing = {k for k in keys(report) if any(w in k.rsplit(".", 1)[-1] for w in ("latency", "seconds", "speedup",
                                                                                    "time_ms"))}
    assert {"models.pruned.cpu_latency_ms_b1", "models.pruned.ort_latency_ms_batch", "pruning.speedup_b1",
            "pruning.served_speedup_batch"} <= timing
    assert set(keys(metrics)) == set(keys(report)) - timing
    assert metrics["models"]["pruned"]["test_accuracy"] == report["models"]["pruned"]["test_accuracy"]
    assert metrics["kd_gain"] == report["kd_gain"] and metrics["pruning"]["achieved_macs_reduction"] > 0


def test_report_accuracy_matches_the_saved_model(trained_project):
    """The report's test accuracy is the saved model's accuracy on the prepared test split."""
    paths = Paths(trained_project)
    prepared = torch.load(paths.prepared, weights_only=True)
    report = read_json(paths.report_json)
    for name in MODEL_NAMES:
        model, payload = load_model(paths.model(name))
        x = (prepared["test_x"].float() / 255 - prepared["mean"][None, :, None, None]) / prepared["std"][None, :, None, None]
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == prepared["test_y"]).float().mean().item()
        assert report["models"][name]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
        assert payload["extra"]["dataset_id"] == report["dataset"]["dataset_id"]


def test_report_states_the_paired_kd_gain_of_the_saved_models(trained_project):
    """distilled vs student alone, image by image on the test split, as the registry gate compares."""
    paths = Paths(trained_project)
    prepared = torch.load(paths.prepared, weights_only=True)
    x = (prepared["test_x"].float() / 255 - prepared["mean"][None, :, None, None]) / prepared["std"][None, :, None, None]
    correct = {}
    for name in ("distilled", "student"):
        model, _ = load_model(paths.model(name))
        with torch.no_grad():
            correct[name] = model(x).argmax(1) == prepared["test_y"]
    wins = int((correct["distilled"] & ~correct["student"]).sum())
    losses = int((correct["student"] & ~correct["distilled"]).sum())
    gain = read_json(paths.report_json)["kd_gain"]
    assert (gain["wins"], gain["losses"], gain["gain"], gain["images"]) == (wins, losses, wins - losses, len(x))
    assert gain["method"] == "hinton" and f"won {wins}, lost {losses}" in paths.report_md.read_text()


@pytest.mark.parametrize("wins, losses, verdict", [(20, 2, "distillation paid"), (2, 20, "distillation cost accuracy"),
                                                    (6, 4, "no significant difference")])
def test_kd_gain_verdict_follows_the_mcnemar_test(wins, losses, verdict):
    from kdprune.report import kd_gain

    distilled = torch.tensor([True] * wins + [False] * losses + [True] * 50 + [False] * 5)
    student = torch.tensor([False] * wins + [True] * losses + [True] * 50 + [False] * 5)
    gain = kd_gain(distilled, student, "dkd")
    assert gain["verdict"].startswith(verdict) and gain["gain"] == wins - losses
    assert gain["gain_points"] == round(100 * (wins - losses) / len(student), 2)
    assert gain["p_better"] == pytest.approx(sum(math.comb(wins + losses, k) for k in range(wins, wins + losses + 1))
                                             / 2 ** (wins + losses), abs=1e-6)


def test_curves_and_stage_metrics(trained_project):
    paths = Paths(trained_project)
    expected_epochs = {"teacher": 2, "student": 2, "distilled": 2, "pruned": 1}
    for name, epochs in expected_epochs.items():
        rows = list(csv.DictReader(paths.curve(name).open()))
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
        summary = read_json(paths.stage_metrics(name))
        assert summary["epochs"] == epochs
        assert summary["val_accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]))
    pruned = read_json(paths.stage_metrics("pruned"))
    assert pruned["macs_reduction"] >= 0.5
    assert pruned["macs_before"] == read_json(paths.stage_metrics("distilled"))["macs"]


def test_table_has_a_row_per_model(trained_project):
    paths = Paths(trained_project)
    table = paths.report_md.read_text()
    # the JSON is written with sorted keys, so compare the rows regardless of their order
    assert sorted(table.splitlines()) == sorted(format_table(read_json(paths.report_json)).splitlines())
    for name in MODEL_NAMES:
        assert sum(line.startswith(f"| {name} |") for line in table.splitlines()) == 1


def test_register_without_tracking_registers_nothing(project, tiny_params):
    result = run_stage("register", tiny_params, Paths(project), NullTracker(), CPU)
    assert result["version"] is None and result["promoted"] is False
    written = read_json(Paths(project).registration)
    assert written["promoted"] is False and written["model_name"] == "kdprune-test"
    report = read_json(Paths(project).report_json)
    assert written["val_accuracy"] == report["models"]["pruned"]["val_accuracy"]


def test_normalized_model_takes_unit_range_pixels(trained_project):
    paths = Paths(trained_project)
    model, payload = load_model(paths.model("pruned"))
    served = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"])
    prepared = torch.load(paths.prepared, weights_only=True)
    pixels = prepared["val_x"][:4].float() / 255
    mean = torch.tensor(payload["extra"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(payload["extra"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(served(pixels), model((pixels - mean) / std), atol=1e-6)


def test_unknown_stage(tiny_params, tmp_path):
    with pytest.raises(KdpruneError, match="unknown stage 'tain'") as info:
        run_stage("tain", tiny_params, Paths(tmp_path), NullTracker(), CPU)
    assert "teacher" in str(info.value)


@pytest.mark.parametrize("stage, missing", [("teacher", "prepared.pt"), ("evaluate", "prepared.pt")])
def test_stage_without_its_inputs(tiny_params, tmp_path, stage, missing):
    with pytest.raises(KdpruneError, match=missing):
        run_stage(stage, tiny_params, Paths(tmp_path), NullTracker(), CPU)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_distill_needs_the_teacher(project, tiny_params):
    (project / "models" / "teacher.pt").unlink()
    before = (project / "models" / "distilled.pt").stat().st_mtime_ns
    with pytest.raises(KdpruneError, match="teacher.pt"):
        run_stage("distill", tiny_params, Paths(project), NullTracker(), CPU)
    assert (project / "models" / "distilled.pt").stat().st_mtime_ns == before


def test_diverging_stage_writes_nothing(project):
    params = config.parse(tiny_params_dict(teacher={"model": {"arch": "resnet", "width": 8},
                                                    "train": {"epochs": 2, "lr": 1e30, "warmup_epochs": 0}}))
    (project / "models" / "teacher.pt").unlink()
    (project / "metrics" / "teacher.json").unlink()
    with pytest.raises(KdpruneError, match=r"teacher.*epoch 1"):
        run_stage("teacher", params, Paths(project), NullTracker(), CPU)
    assert not (project / "models" / "teacher.pt").exists()
    assert not (project / "metrics" / "teacher.json").exists()
    assert leftovers(project) == []


def test_prepare_summary(tmp_path, tiny_params):
    summary = run_stage("prepare", tiny_params, Paths(tmp_path), NullTracker(), CPU)
    assert summary["train"] + summary["val"] + summary["test"] == 1797
    assert summary["channels"] == 1 and summary["image_size"] == 8
    assert json.loads(json.dumps(summary)) == summary  # JSON-friendly: MLflow and Prefect log it


@pytest.mark.parametrize("method", ["dkd", "fitnets"])
def test_distill_and_prune_stages_with_each_method(project, method):
    """distill.method reaches both KD stages; FitNets' adapter and hooks stay out of the saved models."""
    params = config.parse(tiny_params_dict(distill={"method": method, "temperature": 4.0, "alpha": 0.9}))
    saved = {}
    for stage, name in (("distill", "distilled"), ("prune", "pruned")):
        before = Paths(project).model(name).read_bytes()
        summary = run_stage(stage, params, Paths(project), NullTracker(), CPU)
        assert 0.0 <= summary["val_accuracy"] <= 1.0
        assert Paths(project).model(name).read_bytes() != before
        saved[name], _ = load_model(Paths(project).model(name))
    for model in saved.values():
        assert not any(m._forward_hooks for m in model.modules())
        assert not any("adapter" in key for key in model.state_dict())


def test_report_states_requested_and_achieved_pruning(trained_project):
    report = read_json(Paths(trained_project).report_json)
    pruning, models = report["pruning"], report["models"]
    assert pruning["requested_macs_reduction"] == 0.5 and pruning["requested_latency_reduction"] is None
    # a 4-channel stem moves in 25% steps: 56.6% is the closest either ranking gets to 50% from above
    assert 0.5 <= pruning["achieved_macs_reduction"] <= 0.57
    assert pruning["achieved_macs_reduction"] == read_json(Paths(trained_project).stage_metrics("pruned"))["macs_reduction"]
    assert pruning["latency_clock"] == "cpu_time_ms"  # one thread on the CPU: process CPU time, immune to other jobs
    speedup = models["distilled"]["cpu_time_ms_batch"] / models["pruned"]["cpu_time_ms_batch"]
    assert pruning["speedup_batch"] == pytest.approx(speedup, rel=0.01)
    assert pruning["speedup_efficiency_batch"] == pytest.approx(speedup / pruning["macs_ratio"], rel=0.01)
    assert pruning["channels"]["stem.0"][0] == 4 and pruning["channels"]["stem.0"][1] < 4
    assert pruning["channels"]["head.3"] == [10, 10]
    assert models["pruned"]["latency_threads"] == 1
    table = Paths(trained_project).report_md.read_text()
    assert "speed-up efficiency" in table and "| stem.0 | 4 |" in table


def test_prune_stage_sparse_in_rounds(project, tiny_raw, capsys):
    """method sparse trains under the penalty first; steps 2 prunes in two rounds with a KD fine-tune between them."""
    raw = deep_update(tiny_raw, {"prune": {"method": "sparse", "steps": 2, "target": 0.4, "sensitivity": [0.3],
                                           "sparsity": {"reg": 0.01, "epochs": 1}}})
    summary = run_stage("prune", config.parse(raw), Paths(project), NullTracker(), CPU)
    err = capsys.readouterr().err  # fit's epoch lines (no progress bar under pytest)
    assert "prune (sparse training) epoch 1/1" in err and "prune round 1/2 epoch 1/1" in err
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [r["goal"] for r in summary["rounds"]] == pytest.approx([0.8, 0.6])
    assert summary["method"] == "sparse" and 0.4 <= summary["macs_reduction"] <= 0.5
    separation = summary["sparsity"]  # the penalty's effect on the channel groups, reported
    assert separation["weak_share_after"] < separation["weak_share_before"]
    assert [row["target"] for row in summary["sensitivity"]] == [0.3]
    assert Paths(project).sensitivity_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_json(Paths(project).stage_metrics("pruned"))["rounds"] == summary["rounds"]
    assert leftovers(project) == []


def test_prune_stage_spends_its_latency_target_with_the_runtimes_table(project, tiny_raw, capfd):
    """prune.latency_target drives the pruner, not prune.target: per-layer counts bought with ONNX Runtime's latency
    table (written as a DVC output), the reduction reached re-measured on ONNX Runtime; a rerun reuses the table
    and chooses the same channels."""
    raw = deep_update(tiny_raw, {"prune": {"target": 0.01, "latency_target": 0.2, "latency_batch": 256,
                                           "latency_repeats": 5, "tolerance": 0.5, "sensitivity": [0.1]}})
    paths = Paths(project)
    summary = run_stage("prune", config.parse(raw), paths, NullTracker(), CPU)
    assert (summary["target_unit"], summary["target"], summary["runtime"]) == ("latency", 0.2, "onnxruntime")
    table = read_json(paths.latency_table)
    assert table["runtime"] == "onnxruntime" and table["batch"] == 256 and table["table"]
    assert "latency table of" in capfd.readouterr().err
    chosen = summary["rounds"][-1]
    assert chosen["cost"] <= 0.8  # the table's prediction is within the budget
    pruned, _ = load_model(paths.model("pruned"))
    from kdprune.latency_table import group_counts
    assert group_counts(pruned, torch.zeros(1, 1, 8, 8)) == chosen["counts"]  # what the table chose is what was saved
    assert summary["macs_reduction"] > 0.02  # prune.target would have removed 1% of the MACs
    assert summary["target_reached"] == summary["latency_reduction_b256"]
    assert [row["target"] for row in summary["sensitivity"]] == [0.1]  # the curve is cut with the table too
    again = run_stage("prune", config.parse(raw), paths, NullTracker(), CPU)
    assert "latency table of" not in capfd.readouterr().err  # read, not re-measured
    assert again["rounds"][-1]["counts"] == chosen["counts"] and again["channels"] == summary["channels"]


def test_an_unreachable_latency_target_is_one_line_and_keeps_the_pruned_model(project, capfd, monkeypatch):
    from kdprune.cli import main

    monkeypatch.chdir(project)
    before = Paths(project).model("pruned").read_bytes()
    assert main(["stage", "prune", "--no-tracking", "-S", "prune.latency_target=0.95",
                 "-S", "prune.latency_repeats=2"]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("kdprune: error")]
    assert len(err) == 1 and err[0].startswith("kdprune: error: prune.latency_target: unreachable")
    assert Paths(project).model("pruned").read_bytes() == before


def test_a_runtime_that_is_not_installed_is_one_line(project, tiny_raw, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    raw = deep_update(tiny_raw, {"prune": {"latency_target": 0.3, "runtime": "onnxruntime"}})
    with pytest.raises(KdpruneError, match="^prune.runtime: onnxruntime, but the onnxruntime package is not"):
        run_stage("prune", config.parse(raw), Paths(project), NullTracker(), CPU)


def test_latency_target_on_missing_cuda_is_one_line(project, tiny_raw):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    raw = deep_update(tiny_raw, {"prune": {"latency_target": 0.3, "runtime": "cuda"}})
    with pytest.raises(KdpruneError, match="prune.runtime") as info:
        run_stage("prune", config.parse(raw), Paths(project), NullTracker(), CPU)
    assert "\n" not in str(info.value)


def test_the_report_requests_the_target_the_prune_stage_used(project, tiny_raw):
    """A Pareto search's point replaces prune.target; the report's "requested" is that target, not params.yaml's."""
    paths = Paths(project)
    paths.search_dir.mkdir(exist_ok=True)
    paths.search_best("student").write_text(json.dumps({"enabled": True, "point": {"prune_target": 0.3}}))
    paths.search_best("teacher").write_text(json.dumps({"enabled": False}))
    params = config.parse(deep_update(tiny_raw, {"search": {"enabled": True}}))
    report = run_stage("evaluate", params, paths, NullTracker(), CPU)
    assert report["pruning"]["requested_macs_reduction"] == pytest.approx(0.3)  # params.yaml says 0.5
    off = run_stage("evaluate", config.parse(tiny_raw), paths, NullTracker(), CPU)
    assert off["pruning"]["requested_macs_reduction"] == pytest.approx(0.5)
