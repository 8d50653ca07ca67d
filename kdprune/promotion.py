"""The promotion flow of the `register` stage: log the served model, score the champion on this run's validation
images, register a version and move the alias only when the gate (kdprune/registry.py) says so.
"""

from __future__ import annotations

import json
import sys

import torch

from kdprune import data as data_mod, registry
from kdprune.config import Params
from kdprune.io import json_field, read_json, write_json
from kdprune.lineage import file_hash, lineage_tags
from kdprune.project import Paths, stage_outputs
from kdprune.errors import KdpruneError
from kdprune.export import OrtModel
from kdprune.serving import served_logits, served_pruned
from kdprune.tracking import NullTracker


def _score_champion(tracker, champion: dict, candidate: dict, val_x: torch.Tensor, val_y: torch.Tensor) -> str | None:
    """Put the champion's per-image results on the candidate's validation images into `champion['correct']`;
    return why that is impossible instead (other classes / input shape, or it cannot be loaded)."""
    champion["classes"] = json.loads(champion["classes"]) if champion.get("classes") else None
    champion["input_shape"] = json.loads(champion["input_shape"]) if champion.get("input_shape") else None
    why = registry.incompatibility(candidate, champion)
    if why:
        return why
    try:
        logits = served_logits(tracker.load_registered(champion["uri"]), val_x)
    except Exception as error:  # noqa: BLE001 - a foreign, broken or unreachable model: never promote blindly
        return (f"champion v{champion['version']} could not be scored on this validation split "
                f"({error.__class__.__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                f"alias left on it")
    if logits.shape[:1] != val_y.shape:
        return f"champion v{champion['version']} gives outputs of another shape; alias left on it"
    champion["correct"] = (logits.argmax(1) == val_y).tolist()
    return None


def register(params: Params, paths: Paths, tracker=NullTracker()) -> dict:
    """Register the pruned model; move the alias to it only if it beats the champion (kdprune/registry.py).

    Reading the champion, registering and moving the alias happen under the registry lock, so concurrent runs
    decide one after the other, each against the champion of that moment.
    """
    _, payload = served_pruned(params, paths)
    if not paths.onnx.is_file():
        raise KdpruneError(f"{paths.onnx}: the served ONNX model is missing; run the export stage first")
    served = OrtModel(paths.onnx)  # the file that is registered and served is the one the gate scores
    where = paths.report_json
    report = read_json(where, "the evaluate stage's report")
    prepared = data_mod.load_prepared(paths.prepared)
    val_x, val_y = prepared["val_x"], prepared["val_y"]
    logits = served_logits(served, val_x)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise KdpruneError(f"{paths.onnx}: non-finite logits on {bad} of {len(val_x)} validation images; "
                           f"not registered")
    correct = (logits.argmax(1) == val_y).tolist()
    slower = (registry.slower_than_parent(report.get("pruning") or {},
                                            json_field(where, report, "models", "pruned", "latency_batch", kind=int),
                                            params.registry.speed_tolerance)
              if params.registry.require_faster else None)
    if slower:  # a compressed model that is slower where it is served is never registered
        result = {"model_name": params.registry.model_name, "version": None, "alias": params.registry.alias,
                  "promoted": False, "reason": slower, "champion_before": None, "gate": {}}
        write_json(paths.registration, result)
        tracker.set_tags({"promotion": slower, "promoted": "false", "registered_version": "None"})
        print(f"register: {slower}", file=sys.stderr)
        return result
    row = ("models", "pruned")
    candidate = {"val_accuracy": round(sum(correct) / len(correct), 4),
                 "test_accuracy": json_field(where, report, *row, "test_accuracy"),
                 "macs": json_field(where, report, *row, "macs", kind=int),
                 "cpu_latency_ms_b1": json_field(where, report, *row, "cpu_latency_ms_b1"),
                 "dataset_id": prepared["dataset_id"], "tta": params.prune.finetune.tta,
                 "classes": list(payload["classes"]), "input_shape": list(payload["input_shape"])}
    name, alias = params.registry.model_name, params.registry.alias
    run_ids = {stage: tracker.run_for_output(stage, file_hash(path)) for stage, path in stage_outputs(paths).items()
               if stage not in ("register", "student") and path.is_file()}
    run_ids["register"] = tracker.run_id
    tags = {**{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in candidate.items()},
            **lineage_tags(params, paths.root, prepared["dataset_id"], run_ids)}
    model = tracker.log_model(paths.onnx, "model", val_x[:2].float().div(255).numpy(),
                              metadata={"classes": list(payload["classes"])})
    try:
        with tracker.registry_lock(name):
            champion = tracker.champion(name, alias)
            why_not = _score_champion(tracker, champion, candidate, val_x, val_y) if champion else None
            if why_not:
                decision = registry.Decision(False, why_not, {"champion_version": champion["version"]})
            else:
                decision = registry.decide({**candidate, "correct": correct}, champion, params.registry)
            version = (tracker.register(model, name, {**tags, "promotion": decision.reason[:5000]}, decision.promote)
                       if model else None)
            promote, reason = decision.promote, decision.reason
            if version is None:
                promote, reason = False, ("tracking is off: nothing registered" if tracker.not_logged() is None
                                          else "the tracking store failed: nothing registered")
            elif promote:
                tracker.set_alias(name, alias, version)
    except KdpruneError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow, HTTP and SQL errors alike, when the store is what failed
        if not tracker.store_failed(error):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise KdpruneError(f"register: the tracking store failed ({first}); {paths.onnx} is saved, the alias was not "
                           f"moved: run `kdprune stage register` again when the store is back") from None
    result = {"model_name": name, "version": version, "alias": alias, "promoted": promote, "reason": reason,
              "champion_before": champion["version"] if champion else None, "gate": decision.numbers,
              **{k: v for k, v in candidate.items() if k not in ("classes", "input_shape")}}
    write_json(paths.registration, result)
    tracker.log_metrics({"promoted": int(promote), **{f"gate.{k}": v for k, v in decision.numbers.items()}})
    tracker.set_tags({"promotion": reason, "promoted": str(promote).lower(), "registered_version": str(version),
                      **{f"gate.{k}": v for k, v in decision.numbers.items()}})
    return result
