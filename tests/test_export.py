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
    assert all("ort_latency_ms_b1" not in rows[name] for name in ("teacher", "student"))
    assert rows["distilled"]["ort_latency_ms_b1"] > 0  # its ONNX export, the baseline the served file must beat
    pruning = read_json(paths.report_json)["pruning"]
    assert pruning["served_speedup_batch"] == round(rows["distilled"]["ort_latency_ms_batch"]
                                                    / pruned["ort_latency_ms_batch"], 3)
    table = paths.report_md.read_text()
    assert "ONNX Runtime CPU ms (batch 1) | ONNX Runtime CPU ms (batch 8)" in table
    pruned_line = next(line for line in table.splitlines() if line.startswith("| pruned |"))
    assert pruned_line.rstrip(" |").endswith(f"{pruned['ort_latency_ms_b1']:.3f} | {pruned['ort_latency_ms_batch']:.2f}")
    assert "top-1 agreement 100.00%" in table


def test_evaluate_needs_the_export(project):
    Paths(project).onnx.unlink()
    with pytest.raises(KdpruneError, match=r"served\.onnx: ONNX model not found; run the export stage"):
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


# ------------------------------------------------------------------------------------------------ INT8
def _ops(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _int8_speed(monkeypatch, speedup: float) -> None:
    """ONNX Runtime timings where INT8 takes 1/speedup of the float file's time (the timing itself is tested in
    test_pruning.py; what is decided from it is tested here)."""
    import kdprune.quantize as q

    def timed(models, *args, **kwargs):
        ms = {"fp32": 1.0, "int8": 1.0 / speedup}
        return {"ms": ms, "cpu_ms": ms}

    monkeypatch.setattr(q, "compare_latency", timed)


def test_int8_is_served_when_not_worse_and_faster(project, monkeypatch):
    paths = Paths(project)
    _int8_speed(monkeypatch, 1.5)
    summary = run_stage("export", config.parse(tiny_params_dict()), paths, device=CPU)
    assert summary["served"] == "int8" and summary["reason"].startswith("INT8 served")
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(paths.onnx)  # the served file is the INT8 one
    assert "QuantizeLinear" not in _ops(paths.float_onnx)
    assert summary["int8_speedup_batch"] == 1.5 and summary["int8_p_worse"] > 0.05
    # what is timed, scored and registered downstream is that file
    report = run_stage("evaluate", config.parse(tiny_params_dict()), paths, device=CPU)
    assert report["served"]["format"] == "int8" and "INT8 served" in paths.report_md.read_text()
    val = torch.load(paths.prepared, weights_only=True)
    from kdprune.serving import served_logits

    int8_accuracy = (served_logits(OrtModel(paths.onnx), val["test_x"]).argmax(1) == val["test_y"]).float().mean()
    assert report["model_metrics"]["served"]["model.test_accuracy"] == round(float(int8_accuracy), 4)


@pytest.mark.parametrize("speedup", [0.8])
def test_a_slower_int8_is_not_served_and_the_reason_says_so(project, monkeypatch, speedup):
    paths = Paths(project)
    _int8_speed(monkeypatch, speedup)
    summary = run_stage("export", config.parse(tiny_params_dict()), paths, device=CPU)
    assert summary["served"] == "fp32" and "INT8 is slower at batch 1 and batch 8" in summary["reason"]
    assert paths.onnx.read_bytes() == paths.float_onnx.read_bytes()


def test_a_significantly_worse_int8_is_not_served(tmp_path, monkeypatch):
    """choose_served with a 'quantized' file that is another, untrained model: it loses many images."""
    from kdprune.export import export_onnx
    from kdprune.quantize import choose_served
    from test_train import separable, tiny_model

    x, y = separable(200, 0)
    good = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with torch.no_grad():  # the bright half decides: left half -> class 0, right half -> class 1
        mask = torch.zeros(8, 8)
        mask[:, :4] = 1
        good[1].weight.copy_(torch.stack([mask.flatten(), 1 - mask.flatten()]) * 10)
        good[1].bias.zero_()
    export_onnx(good, (1, 8, 8), tmp_path / "fp32.onnx")
    export_onnx(tiny_model(seed=3).eval(), (1, 8, 8), tmp_path / "int8.onnx")
    _int8_speed(monkeypatch, 2.0)
    decision = choose_served(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", x, y, (1, 8, 8), 0.05, 8, 2, 1)
    assert decision["fp32_val_accuracy"] > 0.95 and decision["int8_losses"] > decision["int8_wins"]
    assert decision["served"] == "fp32" and "INT8 is significantly worse" in decision["reason"]
    assert decision["int8_p_worse"] <= 0.05


def test_quantize_none_serves_the_float_file(project):
    paths = Paths(project)
    raw = tiny_params_dict(export={"quantize": "none"})
    summary = run_stage("export", config.parse(raw), paths, device=CPU)
    assert summary["served"] == "fp32" and "export.quantize is none" in summary["reason"]
    assert paths.onnx.read_bytes() == paths.float_onnx.read_bytes()


def test_a_failing_quantization_is_one_line_and_leaves_the_served_file(project, monkeypatch):
    import onnxruntime.quantization as ortq

    paths = Paths(project)
    before = paths.onnx.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op\nmore detail")

    monkeypatch.setattr(ortq, "quantize_static", broken)
    with pytest.raises(KdpruneError) as info:
        run_stage("export", config.parse(tiny_params_dict()), paths, device=CPU)
    assert str(info.value).startswith("export.quantize: int8 quantization of") and "\n" not in str(info.value)
    assert "(unsupported op)" in str(info.value)
    assert paths.onnx.read_bytes() == before and leftovers(paths.onnx.parent) == []


def test_the_export_stage_reads_its_calibration_size_and_p_value(project, monkeypatch):
    """export.calibration_images changes the INT8 file's scales; export.max_p_value = 1 calls any INT8 'worse'."""
    paths = Paths(project)
    _int8_speed(monkeypatch, 1.5)
    files = {}
    for n in (512, 2):
        summary = run_stage("export", config.parse(tiny_params_dict(export={"calibration_images": n})), paths, device=CPU)
        assert summary["served"] == "int8"
        files[n] = paths.onnx.read_bytes()
    assert files[512] != files[2]
    strict = run_stage("export", config.parse(tiny_params_dict(export={"max_p_value": 1.0})), paths, device=CPU)
    assert strict["served"] == "fp32" and "significantly worse" in strict["reason"]
