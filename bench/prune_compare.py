#!/usr/bin/env python
"""Pruning methods side by side: magnitude vs learned sparsity at the same target and the same epoch budget.

Trains (or reuses) the teacher and the distilled student under ROOT, runs the prune stage once per method (the
magnitude run fine-tunes for sparsity.epochs + finetune.epochs, so both spend the same epochs after distillation),
then measures every model's test accuracy, MACs and latency. Latency: kdprune.metrics.compare_latency, all models
interleaved in one process at batch 1 and the latency batch, median of the repeats, the recorded thread count.

    python bench/prune_compare.py /tmp/digits                                   # params.yaml (digits)
    python bench/prune_compare.py /tmp/quick -p profiles/cifar10-cpu-quick.yaml \\
        -S data.path=/work/shared/data/cifar10-jpg.tar.gz -S prune.latency_target=0.5
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from kdprune import config, project, runner
from kdprune import data as data_mod
from kdprune.checkpoint import load_model
from kdprune.metrics import compare_latency
from kdprune.pruning import count_macs_params
from kdprune.train import Split, evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="project folder for data and models (reused when present)")
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "sparse"])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved latency repeats")
    args = parser.parse_args(argv)
    params = config.load(args.params, args.overrides)
    paths = project.Paths(args.root)
    device = torch.device("cpu")
    for name, model in (("prepare", paths.prepared), ("teacher", paths.model("teacher")),
                        ("distill", paths.model("distilled"))):
        if not Path(model).exists():
            runner.run_stage(name, params, paths, device=device)
    p = params.prune
    summaries = {}
    for method in args.methods:
        epochs = p.finetune.epochs + (p.sparsity.epochs if method == "magnitude" and "sparse" in args.methods else 0)
        run = params.model_copy(update={"prune": p.model_copy(update={
            "method": method, "finetune": p.finetune.model_copy(update={"epochs": epochs})})})
        summaries[method] = runner.run_stage("prune", run, paths, device=device)
        shutil.copy(paths.model("pruned"), paths.model(f"pruned-{method}"))
        shutil.copy(paths.sensitivity_plot, paths.sensitivity_plot.with_name(f"sensitivity-{method}.png"))

    prepared = data_mod.load_prepared(paths.prepared)
    test = Split.from_prepared(prepared, "test", device)
    models, rows = {}, {}
    for name in ["distilled"] + [f"pruned-{m}" for m in args.methods]:
        model, payload = load_model(paths.model(name))
        tta = p.finetune.tta if name.startswith("pruned") else params.student.train.tta
        shape = tuple(payload["input_shape"])
        rows[name] = {"test_accuracy": evaluate(model, test, tta=tta)["accuracy"],
                      "macs": count_macs_params(model, torch.zeros(1, *shape))[0]}
        models[name] = model
    for batch in (1, p.latency_batch):
        measured = compare_latency(models, shape, batch, args.repeats, threads=p.latency_threads)
        for name in models:  # wall time, and the steadier process CPU time (one thread)
            rows[name][f"ms_b{batch}"] = measured["ms"][name]
            rows[name][f"cpu_ms_b{batch}"] = measured["cpu_ms"][name]
    base = rows["distilled"]
    print(f"latency: median of {args.repeats} interleaved repeats, {measured['threads']} thread(s), CPU; "
          f"target {p.latency_target or p.target} of {'latency' if p.latency_target else 'MACs'}", file=sys.stderr)
    b = p.latency_batch
    print(f"| model | test acc | MACs | wall ms b1 | wall ms b{b} | CPU ms b1 | CPU ms b{b} | speed-up b1 (CPU) | "
          f"speed-up b{b} (CPU) | MACs ratio | efficiency b{b} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        macs_ratio = base["macs"] / r["macs"]
        speedup = base[f"cpu_ms_b{b}"] / r[f"cpu_ms_b{b}"]
        r.update(macs_ratio=macs_ratio, speedup_b1=base["cpu_ms_b1"] / r["cpu_ms_b1"], speedup_batch=speedup,
                 efficiency=speedup / macs_ratio)
        print(f"| {name} | {r['test_accuracy']:.2%} | {r['macs']:,} | {r['ms_b1']:.3f} | {r[f'ms_b{b}']:.2f} | "
              f"{r['cpu_ms_b1']:.3f} | {r[f'cpu_ms_b{b}']:.2f} | {r['speedup_b1']:.2f}x | {speedup:.2f}x | "
              f"{macs_ratio:.2f}x | {r['efficiency']:.2f} |")
    (args.root / "prune_compare.json").write_text(json.dumps({"rows": rows, "prune": summaries}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
