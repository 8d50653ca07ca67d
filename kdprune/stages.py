"""The pipeline's stages: plain functions of (params, paths, tracker, device), called by both drivers.

The DVC driver calls them through `kdprune stage NAME`; the Prefect driver through tasks/; both through
`kdprune.runner.run_stage`. Each writes its outputs under `paths` (atomically) and returns a small summary dict.
The report's formatting lives in kdprune/report.py, the registration's promotion flow in kdprune/promotion.py.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdprune import compare as compare_mod, data as data_mod, distributed, promotion, search as search_mod
from kdprune.checkpoint import load_model, save_model
from kdprune.config import ModelParams, Params, TrainParams
from kdprune.confusion import confusion_matrix, format_per_class, per_class, plot_confusion
from kdprune.errors import KdpruneError
from kdprune.io import read_json, write_json, write_text
from kdprune.compress import prune_with_kd, runtime_device
from kdprune.metrics import compare_latency, layer_channels, model_costs, pruner_clock
from kdprune.plots import sensitivity_plot
from kdprune.project import Paths, effective_params, input_spec, resolve_device, make_splits, train_new
from kdprune.pruning import count_macs_params
from kdprune.report import format_table, kd_gain, pruning_summary
from kdprune.run_metrics import MODEL_METRICS, MODEL_STAGES, log_on_model_runs, report_metrics, summary_metrics, \
    without_timings
from kdprune.serving import served_pruned
from kdprune.tracking import NullTracker
from kdprune.train import Split, evaluate as evaluate_split, predict_logits

MODEL_NAMES = ("teacher", "student", "distilled", "pruned")


# --------------------------------------------------------------------------------------------- helpers
def _write_curve(path: Path, history: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, out.getvalue())


def _splits(paths: Paths, device: torch.device) -> tuple[dict, Split, Split]:
    prepared = data_mod.load_prepared(paths.prepared)
    return prepared, *make_splits(prepared, device)


def _train_and_save(name: str, model: ModelParams | torch.nn.Module, spec: dict, train_params: TrainParams,
                    params: Params, paths: Paths, tracker, device: torch.device,
                    teacher: torch.nn.Module | None = None, extra: dict | None = None, splits=None) -> dict:
    """The shared body of every training stage: (seed, build,) fit, then save the model, curve and metrics."""
    prepared, train, val = splits or _splits(paths, device)
    tracker.log_params({"model": spec, "train": train_params.model_dump(), "seed": params.seed,
                        "dataset_id": prepared["dataset_id"], **({"distill": params.distill.model_dump()} if teacher is not None else {})})
    started = time.perf_counter()
    # the same seed for student and distilled: both start from the same weights
    model, history = train_new(model, train_params, prepared, train, val, stage=name, seed=params.seed,
                               teacher=teacher, distill=params.distill,
                               on_epoch=lambda row: tracker.log_metrics(row, step=row["epoch"]))
    seconds = time.perf_counter() - started
    input_shape, _ = input_spec(prepared)
    macs, n_params = count_macs_params(model.cpu(), torch.zeros(1, *input_shape))
    summary = {"val_accuracy": history[-1]["val_accuracy"], "val_loss": history[-1]["val_loss"],
               "train_seconds": round(seconds, 2), "epochs": len(history), "macs": macs, "params": n_params,
               **(extra or {})}
    if not distributed.is_main():  # under torchrun every rank trained the same weights; rank 0 writes them
        return summary
    save_model(paths.model(name), model, spec, input_shape, prepared["classes"],
               extra={"val_accuracy": summary["val_accuracy"], "dataset_id": prepared["dataset_id"],
                      "mean": prepared["mean"].tolist(), "std": prepared["std"].tolist()})
    _write_curve(paths.curve(name), history)
    write_json(paths.stage_metrics(name), summary)
    tracker.log_metrics(summary_metrics(name, summary))
    tracker.log_artifact(paths.model(name))
    return summary


def _role_stage(name: str, role_name: str, params: Params, paths: Paths, tracker, device, teacher=None) -> dict:
    params = effective_params(params, paths)
    role = getattr(params, role_name)
    return _train_and_save(name, role.model, role.model.model_dump(), role.train, params, paths, tracker, device,
                           teacher=teacher)


# ---------------------------------------------------------------------------------------------- stages
def prepare(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Read the configured source; write the prepared uint8 splits."""
    tracker.log_params({"data": params.data.model_dump(), "seed": params.seed})
    prepared = data_mod.prepare(params.data, params.seed)
    data_mod.save_prepared(prepared, paths.prepared)
    summary = data_mod.describe(prepared)
    tracker.log_params({"dataset_id": summary["dataset_id"]})
    tracker.log_metrics({k: v for k, v in summary.items() if k in ("classes", "train", "val", "test")})
    return summary


def teacher(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Train the teacher on the labels."""
    return _role_stage("teacher", "teacher", params, paths, tracker, device or resolve_device())


def student(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Train the student alone, on the distillation's schedule: the baseline that KD must beat."""
    return _role_stage("student", "student", params, paths, tracker, device or resolve_device())


def distill(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Train the student from the teacher with the KD loss of `distill.method`."""
    teacher_model, _ = load_model(paths.model("teacher"))
    return _role_stage("distilled", "student", params, paths, tracker, device or resolve_device(), teacher=teacher_model)


def prune(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Remove the distilled student's channels to the MACs or latency target (kdprune/compress.py, the one pruner
    the Pareto search's trials call too), then fine-tune it with KD. Also writes the accuracy-vs-target plot."""
    device = device or resolve_device()
    params = effective_params(params, paths)
    p = params.prune
    runtime = runtime_device(p.runtime)
    splits = _splits(paths, device)
    _, train, val = splits
    distilled, payload = load_model(paths.model("distilled"))
    teacher_model, _ = load_model(paths.model("teacher"))
    input_shape = tuple(payload["input_shape"])
    example = torch.zeros(1, *input_shape)
    pruned = prune_with_kd(distilled, teacher_model, params, train, val, example,
                           table_path=paths.latency_table if p.latency_target is not None else None)
    if not paths.latency_table.exists():  # a DVC output: a MACs target measures no table, and says so
        write_json(paths.latency_table, {"table": None, "why": "prune.target (MACs) needs no latency table"})
    model, rounds, unit, target, round_to = pruned.model, pruned.rounds, pruned.unit, pruned.target, pruned.round_to
    tracker.log_params({"prune": p.model_dump(exclude={"finetune"}), "prune.round_to_used": round_to})
    before_finetune = evaluate_split(model.to(device), val)["accuracy"]
    model.cpu()

    macs_before, params_before = count_macs_params(distilled, example)
    macs_after, _ = count_macs_params(model, example)
    clock = pruner_clock(runtime, p.latency_threads)
    latency = {"latency_clock": clock}
    with tempfile.TemporaryDirectory() as tmp:  # timed on the runtime: ONNX Runtime times the exported files
        timed = {"distilled": distilled, "pruned": model}
        if p.runtime == "onnxruntime":
            from kdprune.export import ort_twins
            timed = ort_twins(timed, input_shape, Path(tmp), p.latency_threads)
        for batch in (1, p.latency_batch):
            measured = compare_latency(timed, input_shape, batch, p.latency_repeats, runtime,
                                       p.latency_threads)[clock]
            latency[f"latency_reduction_b{batch}"] = round(1 - measured["pruned"] / measured["distilled"], 4)
    distilled.cpu(), model.cpu()
    # what was reached, as the stage reports it: MACs exactly; latency as re-measured beside the distilled model
    searched = round(1 - rounds[-1]["cost"], 4)
    reached = searched if unit == "MACs" else latency[f"latency_reduction_b{p.latency_batch}"]
    if abs(reached - target) > p.tolerance:  # a miss on either side is said, not only an overshoot
        source = "the search measured" if unit == "MACs" else "the latency table predicted"
        why = ("the channel steps of these layers are too coarse" if reached > target else
               f"{source} {searched:.1%}; the layers alone do not add up to the model here, or timing noise "
               "(raise prune.latency_repeats)")
        print(f"prune: {unit} reduction {reached:.1%} {'exceeds' if reached > target else 'falls short of'} the "
              f"target {target:.0%} by more than prune.tolerance ({p.tolerance:.0%}): {why}", file=sys.stderr)
    channels_after = layer_channels(model)
    extra = {
        "method": p.method, "steps": p.steps, "rounds": rounds, "round_to": round_to, "runtime": p.runtime,
        "target_unit": unit, "target": target, "tolerance": p.tolerance,
        "macs_before": macs_before, "params_before": params_before,
        "macs_target": p.target if p.latency_target is None else None,
        "macs_reduction": round(1 - macs_after / macs_before, 4),
        "latency_target": p.latency_target, "latency_batch": p.latency_batch, **latency,
        "channels": {name: [n, channels_after[name]] for name, n in layer_channels(distilled).items()},
        "val_accuracy_before_finetune": before_finetune,
        "target_reached": reached, "within_tolerance": abs(reached - target) <= p.tolerance,
        **({"sparsity": pruned.separation} if pruned.separation else {}),
    }
    summary = _train_and_save("pruned", model, payload["spec"], p.finetune, params, paths, tracker, device,
                              teacher=teacher_model, extra=extra, splits=splits)
    summary["sensitivity"] = _sensitivity(pruned.cut, p, unit, pruned.kd, val, device,
                                          distilled_accuracy=evaluate_split(distilled.to(device), val)["accuracy"],
                                          chosen={"target": target, "val_accuracy": summary["val_accuracy"]},
                                          path=paths.sensitivity_plot)
    write_json(paths.stage_metrics("pruned"), summary)
    tracker.log_artifact(paths.sensitivity_plot)
    return summary


def _sensitivity(cut, p, unit, kd, val, device, distilled_accuracy, chosen, path) -> list[dict]:
    """Validation accuracy of the model pruned (one-shot) to each of `p.sensitivity`'s targets, plotted."""
    label = (f"after a {p.sensitivity_epochs}-epoch KD fine-tune" if p.sensitivity_epochs else "right after pruning")
    rows = []
    for target in p.sensitivity:
        try:
            found, cost = cut(target)  # the pruner's own choice at this target (one shot)
        except KdpruneError as error:  # a point past what pruning can reach is left off the curve, and said so
            print(f"prune: sensitivity point {target:.0%} left out: {error}", file=sys.stderr)
            continue
        model = kd(found, p.sensitivity_epochs, f"sensitivity {target:.0%}") if p.sensitivity_epochs else found
        rows.append({"target": target, "achieved": round(1 - cost, 4), "label": label,
                     "val_accuracy": evaluate_split(model.to(device), val)["accuracy"]})
    sensitivity_plot(rows, path, unit, distilled_accuracy,
                     {**chosen, "label": f"chosen, after the {p.finetune.epochs}-epoch fine-tune"})
    return [{k: v for k, v in r.items() if k != "label"} for r in rows]


def export(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """The pruned model, as registered and served, to ONNX (written only if its logits match torch's on the test
    split), then with `export.quantize: int8` its static INT8 version, served where it is not worse and is faster
    (kdprune/quantize.py). Writes models/pruned.onnx (float) and models/served.onnx (the one served)."""
    from kdprune.export import export_checked
    from kdprune.io import atomic_path
    from kdprune.quantize import calibration_sample, choose_served, quantize_int8

    served, payload = served_pruned(params, paths)  # what is registered: with the evaluation's TTA when on
    prepared = data_mod.load_prepared(paths.prepared)
    input_shape = tuple(payload["input_shape"])
    x = params.export
    summary = export_checked(served, input_shape, prepared["test_x"], paths.float_onnx, x.tolerance)
    summary.update(quantize=x.quantize, served="fp32", reason="float served: export.quantize is none")
    with tempfile.TemporaryDirectory() as tmp:
        chosen = paths.float_onnx
        if x.quantize == "int8":
            int8 = Path(tmp) / "int8.onnx"
            quantize_int8(paths.float_onnx, int8, calibration_sample(prepared["train_x"], x.calibration_images,
                                                                     params.seed))
            e = params.evaluate
            summary.update(choose_served(paths.float_onnx, int8, prepared["val_x"], prepared["val_y"], input_shape,
                                         x.max_p_value, e.latency_batch, e.latency_repeats, e.latency_threads))
            chosen = int8 if summary["served"] == "int8" else chosen
        with atomic_path(paths.onnx) as out:
            shutil.copyfile(chosen, out)
    print(f"export: {summary['reason']}", file=sys.stderr)
    write_json(paths.stage_metrics("export"), summary)
    tracker.log_params({"export": {"opset": summary["opset"], **x.model_dump()}})
    tracker.log_metrics({f"onnx_{k}": v for k, v in summary.items() if k in ("max_abs_diff", "top1_agreement")})
    tracker.log_metrics({k: v for k, v in summary.items() if k.startswith("int8_")})
    tracker.set_tags({"served": summary["served"], "served_reason": summary["reason"]})
    tracker.log_artifact(paths.onnx)
    return summary


def _onnx_model(paths: Paths, threads: int | None) -> torch.nn.Module:
    """The export stage's ONNX file in an ONNX Runtime session, timed beside the torch models."""
    from kdprune.export import OrtModel

    if not paths.onnx.is_file():
        raise KdpruneError(f"{paths.onnx}: ONNX model not found; run the export stage first")
    return OrtModel(paths.onnx, threads=threads)


def _parent_onnx(model: torch.nn.Module, prepared: dict, folder: Path, threads: int | None,
                 tta: bool) -> torch.nn.Module:
    """`model` as it would be served (normalising, with the flip TTA its evaluation used, ONNX, ONNX Runtime CPU):
    the baseline the served file must beat (which carries prune.finetune.tta's TTA the same way)."""
    from kdprune.export import OrtModel, export_onnx
    from kdprune.serving import with_normalization

    path = folder / "parent.onnx"
    export_onnx(with_normalization(model.cpu(), prepared["mean"].tolist(), prepared["std"].tolist(), tta),
                tuple(prepared["train_x"].shape[1:]), path)
    return OrtModel(path, threads=threads)


def _per_class_report(model: torch.nn.Module, split: Split, tta: bool, classes: list[str], paths: Paths,
                      tracker) -> dict:
    """Per-class test accuracy and the confusion matrix of the pruned (registered) model: JSON, Markdown, PNG."""
    predicted = predict_logits(model, split, tta=tta).argmax(1)
    matrix = confusion_matrix(split.y, predicted, len(classes))
    report = per_class(matrix, classes)
    write_json(paths.per_class_json, report)
    write_text(paths.per_class_md, format_per_class(report, "Pruned model, test split, per class"))
    plot_confusion(matrix, classes, paths.confusion_png, "pruned model, test split")
    tracker.log_metrics({"pruned.balanced_accuracy": report["balanced_accuracy"],
                         **{f"pruned.class_accuracy.{name}": row["accuracy"] for name, row in report["classes"].items()
                            if row["accuracy"] is not None}})
    for path in (paths.per_class_json, paths.per_class_md, paths.confusion_png):
        tracker.log_artifact(path)
    return report


def evaluate(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Test accuracy and costs of every model (ONNX Runtime's beside torch's for the pruned one): metrics JSON (DVC
    metrics), a Markdown table, and the pruned model's per-class accuracy and confusion matrix."""
    device = device or resolve_device()
    prepared = data_mod.load_prepared(paths.prepared)
    splits = {s: Split.from_prepared(prepared, s, device) for s in ("val", "test")}
    tta = {"teacher": params.teacher.train.tta, "student": params.student.train.tta,
           "distilled": params.student.train.tta, "pruned": params.prune.finetune.tta}
    rows, models, test_correct = {}, {}, {}
    for name in MODEL_NAMES:
        model, payload = load_model(paths.model(name))
        model.to(device)
        input_shape = tuple(payload["input_shape"])
        test_logits = predict_logits(model, splits["test"], tta=tta[name])
        test_correct[name] = (test_logits.argmax(1) == splits["test"].y).cpu()
        rows[name] = {
            "test_accuracy": round(test_correct[name].float().mean().item(), 4),
            "val_accuracy": round(evaluate_split(model, splits["val"], tta=tta[name])["accuracy"], 4),
            **model_costs(model, input_shape, paths.model(name)),
        }
        if name == "pruned":
            rows[name]["balanced_test_accuracy"] = _per_class_report(
                model, splits["test"], tta[name], prepared["classes"], paths, tracker)["balanced_accuracy"]
        models[name] = model.cpu()
    # all four models and the pruned one's ONNX export measured side by side (interleaved), so their latencies compare
    e = params.evaluate
    export_check = read_json(paths.stage_metrics("export")) if paths.onnx.is_file() else {}
    clock = "cpu_time_ms" if pruner_clock(torch.device("cpu"), e.latency_threads) == "cpu_ms" else "cpu_latency_ms"
    rows["pruned"].update(onnx_max_abs_diff=export_check.get("max_abs_diff"),
                          onnx_top1_agreement=export_check.get("top1_agreement"))
    for suffix, batch in (("b1", 1), ("batch", e.latency_batch)):  # the torch models, side by side
        measured = compare_latency(models, input_shape, batch, e.latency_repeats, threads=e.latency_threads)
        for name in models:
            rows[name][f"cpu_latency_ms_{suffix}"] = round(measured["ms"][name], 3)  # wall
            rows[name][f"cpu_time_ms_{suffix}"] = round(measured["cpu_ms"][name], 3)  # process CPU time
    with tempfile.TemporaryDirectory() as tmp:
        # Where it is served: the served file beside its parent, the distilled student exported the same way, both
        # on ONNX Runtime. Timed apart from the torch models, in sessions opened together just before: a session
        # opened before the torch work measured 1.5x slower at batch 1 than one opened after it.
        distilled_onnx = _parent_onnx(models["distilled"], prepared, Path(tmp), e.latency_threads, tta["distilled"])
        served = _onnx_model(paths, e.latency_threads)
        for suffix, batch in (("b1", 1), ("batch", e.latency_batch)):
            measured = compare_latency({"pruned": served, "distilled": distilled_onnx}, input_shape, batch,
                                       e.latency_repeats, threads=e.latency_threads)
            for name, ms in measured["cpu_ms" if clock == "cpu_time_ms" else "ms"].items():
                rows[name][f"ort_latency_ms_{suffix}"] = round(ms, 3)
    for row in rows.values():
        row.update(latency_batch=e.latency_batch, latency_threads=measured["threads"], latency_statistic=measured["statistic"])
    report = {"dataset": data_mod.describe(prepared), "models": rows,
              "model_metrics": _model_metrics(rows, paths, prepared, served, clock),
              # the target the prune stage used: a Pareto search's point replaces prune.target
              "pruning": pruning_summary(models["distilled"], models["pruned"], rows,
                                         effective_params(params, paths).prune, clock),
              "kd_gain": kd_gain(test_correct["distilled"], test_correct["student"], params.distill.method
                                 + ("" if params.distill.mix == "none" else f"+{params.distill.mix}")),
              "served": {"file": str(paths.onnx.relative_to(paths.root)), "format": export_check.get("served", "fp32"),
                         "reason": export_check.get("reason", "")}}
    # the model metrics repeat the rows under MLflow's names: in the summary (resume keeps it), not in DVC's metrics
    write_json(paths.report_json, {k: v for k, v in report.items() if k != "model_metrics"})
    write_json(paths.metrics_json, without_timings({k: v for k, v in report.items() if k != "model_metrics"}))
    table = format_table(report)
    write_text(paths.report_md, table)
    tracker.log_metrics(report_metrics(report))
    tracker.set_tags({"kd_gain": report["kd_gain"]["verdict"]})
    tracker.log_text(table, "table.md")
    log_on_model_runs(report, paths, tracker)
    return report


def _model_metrics(rows: dict, paths: Paths, prepared: dict, served: torch.nn.Module, clock: str) -> dict[str, dict]:
    """MODEL_METRICS of each model: the same names for all, so MLflow's Compare view lines them up. Latency is on
    each model's runtime, on one clock (`clock`, the report's): torch on the CPU, ONNX Runtime for the served file
    (whose accuracy is measured on it, with `served`, the session evaluate timed)."""
    from kdprune.serving import served_logits

    accuracy = {s: round(float((served_logits(served, prepared[f"{s}_x"]).argmax(1) == prepared[f"{s}_y"])
                               .float().mean()), 4) for s in ("test", "val")}
    pruned = rows["pruned"]
    numbers = {name: (row["test_accuracy"], row["val_accuracy"], row["macs"], row["params"], row["size_kb"],
                      row[f"{clock}_b1"], row[f"{clock}_batch"], row["latency_batch"])
               for name, row in rows.items()}
    numbers["served"] = (accuracy["test"], accuracy["val"], pruned["macs"], pruned["params"],
                         round(paths.onnx.stat().st_size / 1024, 1), pruned["ort_latency_ms_b1"],
                         pruned["ort_latency_ms_batch"], pruned["latency_batch"])
    return {name: dict(zip(MODEL_METRICS, numbers[name])) for name in MODEL_STAGES}


def register(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Register the pruned model; move the alias to it only if it beats the champion (kdprune/promotion.py)."""
    return promotion.register(params, paths, tracker)


def search_teacher(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None,
                   run_workers=None) -> dict:
    """The teacher's study (meta-optimization / meta-regularization); writes search/teacher.json."""
    return search_mod.search("teacher", params, paths, tracker, device, run_workers=run_workers or search_mod.run_in_threads)


def search_student(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None,
                   run_workers=None) -> dict:
    """The student's study, distilling from the trained teacher; writes search/student.json."""
    return search_mod.search("student", params, paths, tracker, device, run_workers=run_workers or search_mod.run_in_threads)


def compare(params: Params, paths: Paths, tracker=NullTracker(), device: torch.device | None = None) -> dict:
    """Defaults vs searched at the same wall-clock budget, over seeds (optional: search.compare.enabled)."""
    return compare_mod.compare(params, paths, tracker, device or resolve_device())
