"""Data-parallel training under `torchrun --nproc-per-node N`: rank, world size, shards and the DDP wrapper.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (a plain process) every helper is a no-op, so the
one training loop reads the same either way. Each rank holds its own shard of the device-resident train split,
trains on batch_size / N images per step (the global batch stays params' batch_size) and DDP averages the
gradients; every rank validates on the whole validation split with identical weights. Only rank 0 writes
outputs and logs to MLflow.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes outputs and logs (rank 0, or the only process)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; return this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of (x, y): every rank gets len // N rows, so all take the same number of steps."""
    n, r = world_size(), rank()
    if n == 1:
        return x, y
    per_rank = len(y) // n  # strided, so a class-sorted split still gives every rank every class
    return x[r::n][:per_rank].contiguous(), y[r::n][:per_rank].contiguous()


def local_batch(batch_size: int) -> int:
    """Images per step on this rank: the global batch split over the ranks."""
    return max(1, batch_size // world_size())


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun; the model itself otherwise."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (a training loss every rank then reports the same)."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def average_gradients(module: nn.Module) -> None:
    """All-reduce the gradients of parameters DDP does not own (the distiller's adapters), as DDP does its own."""
    if world_size() == 1:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size()
