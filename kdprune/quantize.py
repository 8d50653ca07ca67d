"""INT8 for the served file: ONNX Runtime static quantization, served only where it is not worse and is faster.

Static quantization (Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"): weights as int8 per output channel, activations as uint8 with scales
calibrated on a seeded sample of training images, written as QuantizeLinear/DequantizeLinear pairs (QDQ) that
ONNX Runtime fuses into integer kernels. `onnxruntime.quantization.quant_pre_process` runs first (shape inference
and graph cleanup, as ORT's documentation asks).

The INT8 file replaces the float one only when, on the validation images, it does not lose significantly more
images than it wins against the float file (the registry gate's exact McNemar test, one-sided for "worse"), and it
is faster at batch 1 and at the latency batch (ONNX Runtime, interleaved). Otherwise the float file is served and
the decision says why, in one line. Tiny models often fall in the second case: at a few tens of microseconds a
call, the QDQ graph's extra nodes cost more than the integer arithmetic saves.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kdprune.errors import KdpruneError
from kdprune.export import INPUT_NAME, OrtModel, _require
from kdprune.metrics import compare_latency, pruner_clock
from kdprune.registry import mcnemar_p, paired_counts
from kdprune.serving import served_logits

CALIBRATION_BATCH = 64


def calibration_sample(train_x: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """A seeded sample of `n` training images as the served model takes them (float pixels / 255)."""
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    return train_x[order].float().div(255).numpy()


@contextmanager
def _quiet_root_logger():
    """ORT's quantizer warns on the root logger for each weight it skips per-channel (1-d biases); kdprune says
    what was decided in one line instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(float_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Write the static INT8 (QDQ, per-channel weights) version of `float_path` to `out_path`."""
    q = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calibration[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        try:
            try:
                quant_pre_process(str(float_path), str(prepared))
            except Exception:  # noqa: BLE001 - ORT's symbolic shape inference fails on some graphs (airbench's
                # flatten: "'NoneType' object is not iterable"); ONNX's own shape inference suffices there
                quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            q.quantize_static(str(prepared), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
        except Exception as error:  # noqa: BLE001 - ORT's quantizer raises many types; one line, float kept
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise KdpruneError(f"export.quantize: int8 quantization of {float_path} failed ({first})") from None
        shutil.move(str(Path(tmp) / "int8.onnx"), out_path)


def choose_served(float_path: Path, int8_path: Path, val_x: torch.Tensor, val_y: torch.Tensor, input_shape: tuple,
                  max_p_value: float, latency_batch: int, repeats: int, threads: int | None) -> dict:
    """Whether the INT8 file may be served instead of the float one: its paired accuracy on the validation images
    and its speed at batch 1 and `latency_batch`. Returns {"served": "int8" | "fp32", "reason": one line, ...}."""
    fp32, int8 = OrtModel(float_path, threads), OrtModel(int8_path, threads)
    correct = {name: (served_logits(model, val_x).argmax(1) == val_y).tolist()
               for name, model in (("fp32", fp32), ("int8", int8))}
    counts = paired_counts(correct["int8"], correct["fp32"])
    p_worse = mcnemar_p(counts["losses"], counts["wins"])
    clock = pruner_clock(torch.device("cpu"), threads)
    speedup = {}
    for label, batch in (("b1", 1), ("batch", latency_batch)):
        ms = compare_latency({"fp32": fp32, "int8": int8}, input_shape, batch, repeats, threads=threads)[clock]
        speedup[label] = round(ms["fp32"] / ms["int8"], 3)
    out = {"int8_val_accuracy": counts["candidate_accuracy"], "fp32_val_accuracy": counts["champion_accuracy"],
           "int8_wins": counts["wins"], "int8_losses": counts["losses"], "int8_p_worse": round(p_worse, 6),
           "int8_speedup_b1": speedup["b1"], "int8_speedup_batch": speedup["batch"]}
    versus = (f"INT8 vs float on {counts['images']} validation images: won {counts['wins']}, lost "
              f"{counts['losses']} (p worse = {p_worse:.3g}); {speedup['batch']:.2f}x at batch {latency_batch}, "
              f"{speedup['b1']:.2f}x at batch 1")
    if p_worse <= max_p_value:
        return {**out, "served": "fp32", "reason": f"float served: INT8 is significantly worse ({versus})"}
    slower = [f"batch {b}" for label, b in (("b1", 1), ("batch", latency_batch)) if speedup[label] < 1.0]
    if slower:
        return {**out, "served": "fp32", "reason": f"float served: INT8 is slower at {' and '.join(slower)} ({versus})"}
    return {**out, "served": "int8", "reason": f"INT8 served ({versus})"}
