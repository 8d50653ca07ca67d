"""The pruned model as ONNX: export, a parity check against the torch model, and an ONNX Runtime session.

The exported graph is the served model (`kdprune.serving`): it takes float images in [0, 1] (pixels / 255),
N x C x H x W with a dynamic batch axis, and returns logits. onnx / onnxruntime / onnxscript are imported here only,
inside the functions, so `import kdprune.export` stays light.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdprune.errors import KdpruneError
from kdprune.io import atomic_path

OPSET = 18  # torch.onnx's dynamo exporter targets 18; ONNX Runtime 1.16+ runs it
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _require(module: str):
    """Import an optional package (kdprune[pipeline]); its absence is one error line, not a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KdpruneError(f"ONNX export needs the {module} package: pip install 'kdprune[pipeline]'") from None


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Write `model` (CPU, eval) as one self-contained ONNX file with a dynamic batch axis."""
    _require("onnx"), _require("onnxscript")  # torch's exporter needs both
    model = model.cpu().eval()
    example = torch.rand(2, *input_shape)
    program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                dynamo=True, verbose=False)
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session; `threads` intra-op threads (default: torch's, so latencies compare)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX Runtime session behind a torch module's interface, so `metrics.latency_ms` times it like the rest."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def ort_twins(models: dict[str, nn.Module], input_shape: tuple[int, ...], folder: Path,
              threads: int | None = None) -> dict[str, OrtModel]:
    """Each model exported to ONNX in `folder` and opened in ONNX Runtime: timed where it will be served."""
    twins = {}
    for name, model in models.items():
        export_onnx(model, input_shape, Path(folder) / f"{name}.onnx")
        twins[name] = OrtModel(Path(folder) / f"{name}.onnx", threads)
    return twins


@torch.inference_mode()
def parity(model: nn.Module, onnx_path: str | Path, images: torch.Tensor, batch: int = 256) -> dict:
    """Torch vs ONNX Runtime logits on uint8 images (N x C x H x W): max abs difference and top-1 agreement."""
    model = model.cpu().eval()
    ort_model = OrtModel(onnx_path)
    worst, agree = 0.0, 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch].float().div(255)
        ours, theirs = model(x).float(), ort_model(x)
        gap = float((ours - theirs).abs().max()) if len(x) else 0.0
        # NaN compares false with everything, so max() would drop it: a non-finite logit is an infinite gap
        worst = max(worst, gap if math.isfinite(gap) else math.inf)
        agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
    return {"max_abs_diff": worst, "top1_agreement": agree / max(1, len(images)), "images": len(images)}


def export_checked(model: nn.Module, input_shape: tuple[int, ...], images: torch.Tensor, path: Path,
                   tolerance: float) -> dict:
    """Export, check against the torch model on `images`, and only then put the file at `path`.

    Fails (KdpruneError, `path` untouched) when a logit differs by more than `tolerance`.
    """
    with atomic_path(path) as tmp:
        export_onnx(model, input_shape, tmp)
        check = parity(model, tmp, images)
        if not np.isfinite(check["max_abs_diff"]) or check["max_abs_diff"] > tolerance:
            raise KdpruneError(f"{path}: ONNX logits differ from torch's by up to {check['max_abs_diff']:.3g} "
                               f"(export.tolerance is {tolerance:g}); not written")
    return {**check, "opset": OPSET, "tolerance": tolerance}
