"""`kdprune predict`: a class and its probability per image, from a registered model or a model file.

Images go through `data.read_image`, the preprocessing the prepared data had; the model is the served one
(`kdprune.serving`: pixels / 255 in, logits out), so a file and its registered version answer alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdprune.data import IMAGE_SUFFIXES, read_image
from kdprune.errors import KdpruneError

BATCH = 256


def image_files(targets: list[str]) -> list[Path]:
    """The files named, and the image files (by suffix, hidden ones skipped) under each folder named, in order."""
    files: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            found = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(target).parts))
            if not found:
                raise KdpruneError(f"{target}: no image files in this folder")
            files += found
        elif target.is_file():
            files.append(target)
        else:
            raise KdpruneError(f"{target}: no such image file or folder")
    return files


def load_predictor(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str], tuple[int, int, int]]:
    """(images in [0, 1] -> logits, class names, C x H x W) for `models:/...` (the registry) or a model file."""
    if model.startswith("models:/"):
        from kdprune.tracking import load_registered_model

        registered = load_registered_model(model)
        return registered.logits, registered.classes, registered.input_shape
    from kdprune.checkpoint import load_model
    from kdprune.serving import with_normalization

    net, payload = load_model(model)
    served = with_normalization(net, payload["extra"]["mean"], payload["extra"]["std"])

    @torch.inference_mode()
    def logits(images: np.ndarray) -> np.ndarray:
        return served(torch.from_numpy(images)).float().numpy()

    return logits, list(payload["classes"]), tuple(payload["input_shape"])


def check_fits_data(model: str, classes: list[str], input_shape: tuple, prepared_path: Path) -> None:
    """Refuse (one line) a model whose classes or input shape are not those of the project's prepared data: it was
    trained on other images, and its answers would be names from another label set."""
    if not Path(prepared_path).is_file():
        return
    try:  # memory-mapped: only the class list and the tensors' shapes are read, not the images
        prepared = torch.load(prepared_path, mmap=True, weights_only=True)
        data_classes, data_shape = [str(c) for c in prepared["classes"]], tuple(prepared["train_x"].shape[1:])
    except Exception:  # noqa: BLE001 - an unreadable prepared file only means there is nothing to check against
        return
    if [str(c) for c in classes] != data_classes or tuple(input_shape) != data_shape:
        shown = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")  # noqa: E731
        raise KdpruneError(
            f"{model}: trained for {len(classes)} classes ({shown([str(c) for c in classes])}) at "
            f"{'x'.join(map(str, input_shape))}, but this project's data ({prepared_path}) has {len(data_classes)} "
            f"({shown(data_classes)}) at {'x'.join(map(str, data_shape))}: not a model for these images; "
            "set registry.model_name or give --model")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict(model: str, targets: list[str], data: Path | None = None) -> list[tuple[str, str, float]]:
    """(image path, class, probability) per image. All images are read before any is predicted, so a bad one fails
    the call with nothing printed. `data`: a prepared-data file the model must fit (`check_fits_data`)."""
    files = image_files(targets)
    logits_of, classes, input_shape = load_predictor(model)
    if data is not None:
        check_fits_data(model, classes, input_shape, data)
    channels, size, _ = input_shape
    images = torch.stack([read_image(f, channels, size) for f in files])
    probs = np.concatenate([softmax(logits_of(images[start:start + BATCH].float().div(255).numpy()))
                            for start in range(0, len(images), BATCH)])
    return [(str(f), classes[int(p.argmax())], float(p.max())) for f, p in zip(files, probs)]
