"""What the tracking runs log, by one vocabulary: each model's run (trained, or skipped by resume) carries the same
`model.*` metrics, so MLflow's Compare view lines them up; a stage's summary and the evaluate report become flat
metrics the same way for every driver (the CLI behind dvc.yaml, the Prefect flow, the DVC parent run)."""

from __future__ import annotations

from kdprune.lineage import file_hash
from kdprune.project import Paths

# The stage whose run made each model; "served" is the ONNX file that is registered and served.
MODEL_STAGES = {"teacher": "teacher", "student": "student", "distilled": "distill", "pruned": "prune",
                "served": "export"}
MODEL_METRICS = ("model.test_accuracy", "model.val_accuracy", "model.macs", "model.params", "model.size_kb",
                 "model.latency_ms_b1", "model.latency_ms_batch", "model.latency_batch")


TRAINED = ("teacher", "student", "distill", "distilled", "prune", "pruned")  # training stages and their models


def summary_metrics(stage: str, summary: dict) -> dict:
    """A stage's summary as run metrics, named alike whether the stage trained or was skipped by resume: a training
    stage's end values are `final_*` (the plain names hold the per-epoch curves). `stage`: its name or its model's."""
    if stage in TRAINED:
        return {f"final_{k}": v for k, v in summary.items()}
    if stage == "evaluate":
        return report_metrics(summary)
    return {k: v for k, v in summary.items() if not isinstance(v, dict)}


def report_metrics(report: dict) -> dict:
    """The evaluate report as flat run metrics (the evaluate run's, and the pipeline's parent run's): each model's
    row as `MODEL.KEY`, the pruning summary as `pruning.KEY`, the paired KD gain as `kd_gain.KEY`."""
    flat = {f"{name}.{k}": v for name, row in report.get("models", {}).items() for k, v in row.items()}
    for section in ("pruning", "kd_gain"):
        flat.update({f"{section}.{k}": v for k, v in report.get(section, {}).items()})
    return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


TIMING_WORDS = ("latency", "seconds", "speedup", "time_ms")  # in the report's keys: measured times and their ratios


def without_timings(report: dict) -> dict:
    """The report without measured times, speed-ups and latency settings (they stay in reports/report.json)."""
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in report.items()
            if not any(word in k for word in TIMING_WORDS)}


def log_on_model_runs(report: dict, paths: Paths, tracker) -> None:
    """Put the report's MODEL_METRICS on the run that made each model: the latest run that wrote that file, trained
    or skipped by resume (the runner calls this again when evaluate itself is skipped)."""
    for name, stage in MODEL_STAGES.items():
        path = paths.onnx if name == "served" else paths.model(name)
        run_id = tracker.run_for_output(stage, file_hash(path))
        if run_id and name in report.get("model_metrics", {}):
            tracker.log_metrics_to(run_id, report["model_metrics"][name])
