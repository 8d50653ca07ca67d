#!/usr/bin/env python
"""Benchmark: the pruned model in torch vs its ONNX export in ONNX Runtime, on the CPU, measured interleaved.

Run inside a project after `kdprune run` (or `dvc repro`): it reads models/pruned.pt and models/served.onnx and
times the registered form of the model (kdprune.serving, as exported) against the ONNX file on the same random
input, one intra-op thread each (--threads), turn about in every repeat (so load from other jobs on a shared
machine slows both alike), after a warm-up. Prints the median and the fastest pass per batch size.

    python bench/onnx_latency.py                       # batches 1 and evaluate.latency_batch of params.yaml
    python bench/onnx_latency.py --batches 1 64 512 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdprune import config
from kdprune.export import OrtModel
from kdprune.project import Paths
from kdprune.serving import served_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    params = config.load(args.params, args.overrides)
    paths = Paths(Path("."))
    torch.set_num_threads(args.threads)
    served, payload = served_pruned(params, paths)
    models = {"torch": served, "onnxruntime": OrtModel(paths.onnx, threads=args.threads)}
    shape = tuple(payload["input_shape"])
    print(f"pruned model, input {shape}, {args.threads} thread(s), {args.repeats} interleaved repeats, "
          f"tta={params.prune.finetune.tta}")
    print("| batch | torch ms (median / min) | ONNX Runtime ms (median / min) | torch / ORT (median) |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches or [1, params.evaluate.latency_batch]:
        x = torch.rand(batch, *shape)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():
                for _ in range(3):
                    model(x)
            for r in range(args.repeats):
                for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    start = time.perf_counter()
                    models[name](x)
                    times[name].append((time.perf_counter() - start) * 1000)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {batch} | {med['torch']:.3f} / {min(times['torch']):.3f} | "
              f"{med['onnxruntime']:.3f} / {min(times['onnxruntime']):.3f} | {med['torch'] / med['onnxruntime']:.2f} |")


if __name__ == "__main__":
    main()
