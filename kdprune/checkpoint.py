"""Model files: the builder spec, the data shape and a state dict; loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdprune.errors import KdpruneError
from kdprune.io import atomic_path
from kdprune.models import build, resize_to_state_dict


def save_model(path: str | Path, model: nn.Module, spec: dict, input_shape: tuple[int, int, int],
               classes: list[str], extra: dict | None = None) -> None:
    """Write the model; a pruned model is stored as its unpruned spec + a state dict carrying the pruned shapes."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"spec": dict(spec), "input_shape": list(input_shape), "classes": list(classes),
               "state_dict": state, "extra": dict(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model from its file (layers sized from the stored shapes) and return it with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise KdpruneError(f"{path}: model file not found; run the stage that writes it first")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - corrupt or foreign files
        raise KdpruneError(f"{path}: not a kdprune model file ({error.__class__.__name__})") from None
    try:
        c, size, _ = payload["input_shape"]
        model = build(payload["spec"], c, size, len(payload["classes"]))
        resize_to_state_dict(model, payload["state_dict"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a torch file, but not a kdprune model
        raise KdpruneError(f"{path}: not a kdprune model file ({error.__class__.__name__})") from None
    return model.eval(), payload
