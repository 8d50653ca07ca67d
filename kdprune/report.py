"""The pipeline's report: what pruning requested and achieved, and the Markdown table of every model.

Pure functions of the evaluate stage's rows; the stage writes what they return.
"""

from __future__ import annotations

import torch

from kdprune.metrics import layer_channels
from kdprune.registry import mcnemar_p, paired_counts

KD_SIGNIFICANCE = 0.05  # the one-sided McNemar p below which a run says distillation paid (or cost)


def kd_gain(distilled_correct: torch.Tensor, student_correct: torch.Tensor, method: str) -> dict:
    """Distilled student vs the student trained alone (same seed, schedule and initial weights) on the same test
    images: images won and lost, the gain in images and points, and exact one-sided McNemar p-values for "better"
    and "worse" (the registry gate's test), with a one-line verdict."""
    counts = paired_counts(distilled_correct.tolist(), student_correct.tolist())
    wins, losses, n = counts["wins"], counts["losses"], counts["images"]
    p_better, p_worse = mcnemar_p(wins, losses), mcnemar_p(losses, wins)
    if p_better <= KD_SIGNIFICANCE:
        verdict = "distillation paid"
    elif p_worse <= KD_SIGNIFICANCE:
        verdict = "distillation cost accuracy"
    else:
        verdict = "no significant difference"
    return {"method": method, "images": n, "wins": wins, "losses": losses, "gain": wins - losses,
            "gain_points": round(100 * (wins - losses) / n, 2) if n else 0.0,
            "p_better": round(p_better, 6), "p_worse": round(p_worse, 6),
            "verdict": f"{verdict} ({method}: {wins - losses:+d} of {n} test images, won {wins}, lost {losses}, "
                       f"p = {min(p_better, p_worse):.3g})"}


def pruning_summary(distilled: torch.nn.Module, pruned: torch.nn.Module, rows: dict, prune_params,
                    clock: str = "cpu_latency_ms") -> dict:
    """Requested vs achieved reduction, measured speed-up, speed-up efficiency (speed-up / MACs ratio) and the
    channels of every layer before and after pruning. Latencies from `clock`: wall ("cpu_latency_ms") or process
    CPU time ("cpu_time_ms", the steadier one with one thread on a shared CPU)."""
    d, q = rows["distilled"], rows["pruned"]
    macs_ratio = d["macs"] / q["macs"]
    out = {"requested_macs_reduction": None if prune_params.latency_target is not None else prune_params.target,
           "requested_latency_reduction": prune_params.latency_target, "latency_clock": clock,
           "achieved_macs_reduction": round(1 - q["macs"] / d["macs"], 4), "macs_ratio": round(macs_ratio, 3)}
    for suffix in ("b1", "batch"):
        key = f"{clock}_{suffix}"
        speedup = d[key] / q[key]
        out[f"achieved_latency_reduction_{suffix}"] = round(1 - q[key] / d[key], 4)
        out[f"speedup_{suffix}"] = round(speedup, 3)
        out[f"speedup_efficiency_{suffix}"] = round(speedup / macs_ratio, 3)
    if "ort_latency_ms_b1" in d:  # where it is served: the distilled student's ONNX vs the served file, ONNX Runtime
        for suffix in ("b1", "batch"):
            speedup = d[f"ort_latency_ms_{suffix}"] / q[f"ort_latency_ms_{suffix}"]
            out[f"served_speedup_{suffix}"] = round(speedup, 3)
            out[f"served_speedup_efficiency_{suffix}"] = round(speedup / macs_ratio, 3)
    after = layer_channels(pruned)
    out["channels"] = {name: [n, after[name]] for name, n in layer_channels(distilled).items()}
    return out


def format_table(report: dict) -> str:
    """The report as Markdown: one row per model, then what pruning requested and achieved, layer by layer."""
    rows = report["models"]
    first = next(iter(rows.values()))
    batch = first["latency_batch"]
    lines = [
        f"Dataset: {report['dataset']['source']} ({report['dataset']['train']} train / {report['dataset']['val']} val / "
        f"{report['dataset']['test']} test, {report['dataset']['classes']} classes, id {report['dataset']['dataset_id']})",
        "",
        f"| model | test acc | val acc | params | MACs | size (KB) | CPU ms (batch 1) | CPU ms (batch {batch}) |"
        f"{' CPU-time ms (batch 1) | CPU-time ms (batch ' + str(batch) + ') |' if 'cpu_time_ms_b1' in first else ''}"
        f" ONNX Runtime CPU ms (batch 1) | ONNX Runtime CPU ms (batch {batch}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if "cpu_time_ms_b1" in first else "") + "---:|---:|",
    ]
    for name, r in rows.items():
        ort = (f"{r['ort_latency_ms_b1']:.3f} | {r['ort_latency_ms_batch']:.2f}" if "ort_latency_ms_b1" in r
               else "- | -")
        lines.append(f"| {name} | {r['test_accuracy']:.2%} | {r['val_accuracy']:.2%} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['size_kb']:,} | {r['cpu_latency_ms_b1']:.3f} | {r['cpu_latency_ms_batch']:.2f} |"
                     + (f" {r['cpu_time_ms_b1']:.3f} | {r['cpu_time_ms_batch']:.2f} |" if "cpu_time_ms_b1" in r else "")
                     + f" {ort} |")
    pruned = rows.get("pruned", {})
    served = report.get("served")
    if served:
        lines += ["", f"Served file {served['file']} ({served['format']}, the ONNX Runtime rows of pruned): "
                      f"{served['reason']}."]
    if pruned.get("onnx_max_abs_diff") is not None:
        lines += ["", f"ONNX export of pruned (models/pruned.onnx): max |logit difference| vs torch "
                      f"{pruned['onnx_max_abs_diff']:.2g}, top-1 agreement {pruned['onnx_top1_agreement']:.2%} "
                      f"(test split); balanced test accuracy {pruned['balanced_test_accuracy']:.2%}."]
    if "latency_threads" in first:
        lines += ["", f"CPU ms: wall time; CPU-time ms: the process's CPU time (with one thread on a shared CPU, the "
                      f"better estimate of an idle core). ONNX Runtime ms: the served file and the distilled student's ONNX (each "
                      f"with the flip TTA of its evaluation, when on), timed side by side on the pruning summary's clock. All: {first['latency_statistic']} of "
                      f"interleaved repeats "
                      f"across the models, {first['latency_threads']} thread(s), after warm-up."]
    gain = report.get("kd_gain")
    if gain:
        lines += ["", f"Distillation ({gain['method']}) vs the student alone, paired on the {gain['images']} test images: "
                      f"won {gain['wins']}, lost {gain['losses']}, gain {gain['gain']:+d} images "
                      f"({gain['gain_points']:+.2f} points); exact one-sided McNemar p = {gain['p_better']:.3g} "
                      f"(better), {gain['p_worse']:.3g} (worse): {gain['verdict'].split(' (')[0]}."]
    pruning = report.get("pruning")
    if pruning:
        def pct(v):
            return "-" if v is None else f"{v:.1%}"

        clock = "CPU time" if pruning.get("latency_clock") == "cpu_time_ms" else "wall time"
        lines += ["", f"| pruned vs distilled (latency: {clock}) | requested | achieved |", "|---|---:|---:|",
                  f"| MACs reduction | {pct(pruning['requested_macs_reduction'])} | {pct(pruning['achieved_macs_reduction'])} |",
                  f"| latency reduction (batch {batch}) | {pct(pruning['requested_latency_reduction'])} | "
                  f"{pct(pruning['achieved_latency_reduction_batch'])} |",
                  f"| latency reduction (batch 1) | | {pct(pruning['achieved_latency_reduction_b1'])} |",
                  f"| speed-up (batch {batch} / batch 1) | | {pruning['speedup_batch']:.2f}x / {pruning['speedup_b1']:.2f}x |",
                  f"| speed-up efficiency = speed-up / MACs ratio ({pruning['macs_ratio']:.2f}x) | | "
                  f"{pruning['speedup_efficiency_batch']:.2f} / {pruning['speedup_efficiency_b1']:.2f} |",
                  *([f"| where served (ONNX Runtime CPU, served file vs distilled ONNX): speed-up (batch {batch} / "
                     f"batch 1) | | {pruning['served_speedup_batch']:.2f}x / {pruning['served_speedup_b1']:.2f}x |",
                     f"| where served: speed-up efficiency | | {pruning['served_speedup_efficiency_batch']:.2f} / "
                     f"{pruning['served_speedup_efficiency_b1']:.2f} |"] if "served_speedup_b1" in pruning else []),
                  "", "| layer | channels before | after |", "|---|---:|---:|"]
        lines += [f"| {name} | {a} | {b} |" for name, (a, b) in pruning["channels"].items()]
    return "\n".join(lines) + "\n"
