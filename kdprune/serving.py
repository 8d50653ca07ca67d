"""The served model: what is registered, exported and answered by `kdprune predict` and `mlflow models serve`."""

from __future__ import annotations

import torch

from kdprune.checkpoint import load_model


class Normalized(torch.nn.Module):
    """The registered model: takes float images in [0, 1] (pixels / 255) and normalises them itself.

    With `tta` its forward also averages the logits of the mirrored images, exactly as the evaluation that measured
    it did (`kdprune.train.predict_logits`): the registry advertises the accuracy this forward reaches.
    """

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float], tta: bool = False):
        super().__init__()
        self.model = model
        self.tta = bool(tta)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        logits = self.model(x)
        if self.tta:
            logits = (logits + self.model(x.flip(-1))) / 2
        return logits


def with_normalization(model: torch.nn.Module, mean: list[float], std: list[float], tta: bool = False) -> torch.nn.Module:
    return Normalized(model, mean, std, tta).eval()


@torch.no_grad()
def served_logits(model, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of uint8 images (N, C, H, W) by a served model, which takes pixels / 255."""
    out = [model(pixels[start:start + batch_size].float().div(255)).float()
           for start in range(0, len(pixels), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def served_pruned(params, paths) -> tuple[torch.nn.Module, dict]:
    """The pruned model as it is registered: normalising, and with the evaluation's flip TTA when that was on."""
    model, payload = load_model(paths.model("pruned"))
    return with_normalization(model, payload["extra"]["mean"], payload["extra"]["std"],
                              tta=params.prune.finetune.tta), payload
