"""What a model costs: parameters, MACs, size on disk and measured latency.

This module is the project's one latency estimator (the stages, the pruner's latency target and bench/ use it).
Models that are compared are measured side by side: a fixed number of intra-op threads (recorded), a warm-up,
then repeats that take turns across the models (a different model first each round), so a burst of load from other
jobs on a shared machine slows all of them alike; each timed call follows an untimed call of the same model, so no
model pays for the caches its predecessor left. The statistic is the median of the repeats.

Two clocks: wall time (what a user waits) and the process's CPU time. With one thread on a CPU shared with other
jobs, CPU time is the better estimate of the wall time on an idle core: it does not count the time the scheduler
gives to others. The pruner's latency target uses it in that case (`pruner_clock`).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from kdprune.pruning import count_macs_params

STATISTIC = "median"
WARMUP = 3


@contextmanager
def _threads(threads: int | None):
    """Run with exactly `threads` intra-op threads (None: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int, repeats: int,
                    device: torch.device = torch.device("cpu"), threads: int | None = 1) -> dict:
    """Milliseconds of one forward pass of `batch` images for each model, measured interleaved.

    Returns {"ms": {name: median wall ms}, "cpu_ms": {name: median process CPU ms}, "threads": n, "batch": batch,
    "repeats": repeats, "statistic": "median", "device": str}. On CUDA the models run as they train there
    (channels_last, bf16 autocast), synchronised.
    """
    cuda = device.type == "cuda"
    x = torch.randn(batch, *input_shape, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    prepared = {}
    for name, model in models.items():
        model = model.eval().to(device)
        prepared[name] = model.to(memory_format=torch.channels_last) if cuda else model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times: dict[str, list[float]] = {name: [] for name in prepared}
    cpu_times: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    with _threads(None if cuda else threads) as used, autocast:
        for name in names:
            for _ in range(WARMUP):
                prepared[name](x)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                # an untimed call first: right after another model, the caches hold that model's weights and code
                # (measured: an ONNX Runtime model timed right after a torch one took 2x its back-to-back time),
                # and a served model answers calls back to back
                prepared[name](x)
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                prepared[name](x)
                sync()
                times[name].append((time.perf_counter() - start) * 1000)
                cpu_times[name].append((time.process_time() - cpu_start) * 1000)
    return {"ms": {name: statistics.median(t) for name, t in times.items()},
            "cpu_ms": {name: statistics.median(t) for name, t in cpu_times.items()}, "threads": used, "batch": batch,
            "repeats": repeats, "statistic": STATISTIC, "device": str(device)}


def pruner_clock(device: torch.device, threads: int | None) -> str:
    """"cpu_ms" (process CPU time) for one thread on the CPU, where it is immune to other jobs; else "ms" (wall)."""
    return "cpu_ms" if device.type == "cpu" and threads == 1 else "ms"


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int,
               device: torch.device = torch.device("cpu"), threads: int | None = 1) -> float:
    """Median wall time of one forward pass of `batch` images of one model, in milliseconds (after warm-up)."""
    return compare_latency({"model": model}, input_shape, batch, repeats, device, threads)["ms"]["model"]


def model_costs(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> dict:
    """Params, MACs (per image) and file size; latency is measured across models with `compare_latency`."""
    model = model.cpu().eval()
    macs, params = count_macs_params(model, torch.randn(1, *input_shape))
    return {"params": params, "macs": macs, "size_kb": round(Path(path).stat().st_size / 1024, 1)}


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv layer (and features of every linear layer), by module name."""
    return {name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
