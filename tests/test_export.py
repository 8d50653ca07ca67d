"""ONNX export of the pruned model, its parity check, ONNX Runtime latency and the per-class report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import leftovers, tiny_params_dict
from kdprune import config
from kdprune.checkpoint import load_model
from kdprune.confusion import confusion_matrix, per_class
from kdprune.errors import KdpruneError
from kdprune.export import OrtModel, export_checked
from kdprune.io import read_json
from kdprune.serving import with_normalization
from kdprune.project import Paths
from kdprune.runner import run_stage

CPU = torch.device("cpu")


def test_export_matches_torch_on_any_batch(trained_project):
    paths = Paths(trained_project)
    check = read_json(paths.stage_metrics("export"))
    assert check["images"] == len(torch.load(paths.prepared, weights_only=True)["test_y"])
    assert 0 <= check["max_abs_diff"] <= check["tolerance"] == 1e-3
    assert check["top1_agreement"] == 1.0 and check["opset"] == 18
    model, payload = load_model(paths.model("pruned"))
    served = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"])
    onnx_model = OrtModel(paths.onnx)
    for batch in (1, 5, 300):  # the batch axis is dynamic
        x = torch.rand(batch, *payload["input_shape"])
        assert torch.allclose(onnx_model(x), served(x), atol=1e-4)


def test_export_above_tolerance_fails_and_keeps_the_old_file(project):
    paths = Paths(project)
    before = paths.onnx.read_bytes()
    params = config.parse(tiny_params_dict(export={"tolerance": 1e-12}))
    with pytest.raises(KdpruneError, match=r"pruned\.onnx: ONNX logits differ .*\(export\.tolerance is 1e-12\)"):
        run_stage("export", params, Paths(project), device=CPU)
    assert paths.onnx.read_bytes() == before
    assert leftovers(project) == []


def test_evaluate_reports_onnx_runtime_beside_torch(trained_project):
    paths = Paths(trained_project)
    rows = read_json(paths.report_json)["models"]
    pruned = rows["pruned"]
    assert pruned["ort_latency_ms_b1"] > 0 and pruned["ort_latency_ms_batch"] > 0
    assert pruned["onnx_top1_agreement"] == read_json(paths.stage_metrics("export"))["top1_agreement"]
    assert all("ort_latency_ms_b1" not in rows[name] for name in ("teacher", "student", "distilled"))
    table = paths.report_md.read_text()
    assert "ONNX Runtime CPU ms (batch 1) | ONNX Runtime CPU ms (batch 8)" in table
    pruned_line = next(line for line in table.splitlines() if line.startswith("| pruned |"))
    assert pruned_line.rstrip(" |").endswith(f"{pruned['ort_latency_ms_b1']:.3f} | {pruned['ort_latency_ms_batch']:.2f}")
    assert "top-1 agreement 100.00%" in table


def test_evaluate_needs_the_export(project):
    Paths(project).onnx.unlink()
    with pytest.raises(KdpruneError, match=r"pruned\.onnx: ONNX model not found; run the export stage"):
        run_stage("evaluate", config.parse(tiny_params_dict()), Paths(project), device=CPU)


def test_per_class_report_of_the_pruned_model(trained_project):
    paths = Paths(trained_project)
    prepared = torch.load(paths.prepared, weights_only=True)
    report = read_json(paths.per_class_json)
    matrix = torch.tensor(report["confusion"])
    assert report["class_names"] == prepared["classes"]
    assert matrix.sum(1).tolist() == torch.bincount(prepared["test_y"], minlength=10).tolist()
    # the diagonal is the pruned row's test accuracy (tta is off here)
    test_accuracy = read_json(paths.report_json)["models"]["pruned"]["test_accuracy"]
    assert round(matrix.diag().sum().item() / matrix.sum().item(), 4) == test_accuracy
    assert paths.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths.per_class_md.read_text()
    assert all(f"| {name} | " in text for name in prepared["classes"])


def test_per_class_on_imbalanced_labels():
    """900 images of class a (all right), 100 of b (all wrong): accuracy 0.9, balanced accuracy 0.5."""
    labels = torch.tensor([0] * 900 + [1] * 100 + [2] * 0)
    predicted = torch.zeros(1000, dtype=torch.long)
    matrix = confusion_matrix(labels, predicted, 3)
    assert matrix.tolist() == [[900, 0, 0], [100, 0, 0], [0, 0, 0]]
    report = per_class(matrix, ["a", "b", "c"])
    assert report["classes"]["a"] == {"images": 900, "correct": 900, "accuracy": 1.0}
    assert report["classes"]["b"]["accuracy"] == 0.0 and report["classes"]["c"]["accuracy"] is None
    assert report["balanced_accuracy"] == 0.5
    assert np.isclose(matrix.diag().sum() / matrix.sum(), 0.9)


def test_export_carries_the_flip_tta_of_the_registered_model(trained_project, tmp_path):
    """With prune.finetune.tta the registered model averages mirrored logits; the ONNX graph does the same."""
    paths = Paths(trained_project)
    model, payload = load_model(paths.model("pruned"))
    served = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"], tta=True)
    images = torch.load(paths.prepared, weights_only=True)["test_x"][:64]
    check = export_checked(served, tuple(payload["input_shape"]), images, tmp_path / "tta.onnx", 1e-3)
    assert check["max_abs_diff"] <= 1e-3 and check["top1_agreement"] == 1.0
    x = images.float().div(255)
    plain = with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"])
    mirrored = (plain(x) + plain(x.flip(-1))) / 2
    assert torch.allclose(OrtModel(tmp_path / "tta.onnx")(x), mirrored, atol=1e-4)
    assert not torch.allclose(OrtModel(paths.onnx)(x), mirrored, atol=1e-4)  # the plain export differs
