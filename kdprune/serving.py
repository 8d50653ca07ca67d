"""The served model: what is registered, exported and answered by `kdprune predict` and `mlflow models serve`."""

from __future__ import annotations

import torch


class Normalized(torch.nn.Module):
    """The registered model: takes float images in [0, 1] (pixels / 255) and normalises them itself."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def with_normalization(model: torch.nn.Module, mean: list[float], std: list[float]) -> torch.nn.Module:
    return Normalized(model, mean, std).eval()
