"""What a model costs: parameters, MACs, size on disk and measured latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kdprune.pruning import count_macs_params


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int,
               device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of one forward pass of `batch` images, in milliseconds (after warm-up)."""
    model = model.eval().to(device)
    x = torch.randn(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def model_costs(model: nn.Module, input_shape: tuple[int, ...], path: Path, latency_batch: int, repeats: int) -> dict:
    """Params, MACs (per image), file size and CPU latency at batch 1 and `latency_batch`."""
    model = model.cpu().eval()
    macs, params = count_macs_params(model, torch.randn(1, *input_shape))
    return {
        "params": params,
        "macs": macs,
        "size_kb": round(Path(path).stat().st_size / 1024, 1),
        "cpu_latency_ms_b1": round(latency_ms(model, input_shape, 1, repeats), 3),
        "latency_batch": latency_batch,
        "cpu_latency_ms_batch": round(latency_ms(model, input_shape, latency_batch, max(3, repeats // 4)), 3),
    }
