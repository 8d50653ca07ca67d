"""The one training loop, and evaluation.

Data stays on the device as uint8 for the whole run (airbench's loader): each step gathers a batch by index,
normalises it and augments it with batch tensor ops. On CUDA the loop adds channels_last and bf16 autocast; the
same code runs on the CPU. With a teacher it distils (`distill.method`, see kdprune/distiller.py); without one it
trains on the labels.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdprune import distributed
from kdprune.augment import augment, mix
from kdprune.config import DistillParams, TrainParams
from kdprune.errors import TrainingDiverged
from kdprune.distiller import Distiller
from kdprune.optim import build_optimizer, schedule_scale


@dataclass(frozen=True)
class Split:
    """One split resident on the device: uint8 images, int64 labels, and the train set's normalisation."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_prepared(cls, prepared: dict, split: str, device: torch.device) -> Split:
        return cls(
            prepared[f"{split}_x"].to(device), prepared[f"{split}_y"].to(device),
            prepared["mean"].to(device)[None, :, None, None], prepared["std"].to(device)[None, :, None, None],
        )

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        x = (self.x[index].float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


EpochCallback = Callable[[dict], None]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split, batch_size: int = 1024, tta: bool = False) -> torch.Tensor:
    """Logits for the whole split (eval mode); with `tta`, averaged with those of the mirrored images."""
    was_training = model.training
    model.eval()
    outs = []
    with _autocast(split.x.device):
        for start in range(0, len(split), batch_size):
            x = split.inputs(slice(start, start + batch_size))
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(-1)).float()) / 2
            outs.append(logits)
    model.train(was_training)
    return torch.cat(outs)


def evaluate(model: nn.Module, split: Split, tta: bool = False) -> dict[str, float]:
    logits = predict_logits(model, split, tta=tta)
    return {
        "loss": F.cross_entropy(logits, split.y).item(),
        "accuracy": (logits.argmax(1) == split.y).float().mean().item(),
    }


def _show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _check_finite(stage: str, first_bad_step: int, model: nn.Module, epoch: int, step: int) -> None:
    """Raise TrainingDiverged when a loss of this epoch was NaN/inf, or when the weights are (an update can blow them
    up while its own loss was still finite, e.g. on the last step): such a model is never saved or scored."""
    if first_bad_step >= 0:
        raise TrainingDiverged(f"{stage}: the loss became non-finite at step {first_bad_step + 1} (epoch {epoch}); "
                               f"lower the learning rate or check the data")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise TrainingDiverged(f"{stage}: the weights became non-finite by step {step} (epoch {epoch}); "
                               f"lower the learning rate or check the data")


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    params: TrainParams,
    *,
    stage: str,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill: DistillParams | None = None,
    on_epoch: EpochCallback | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train `model` on `train` for `params.epochs`; return the trained (or weight-averaged) model and the curves.

    Each curve row: epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds. Validation is only
    observed, never used to pick weights. A NaN/inf loss at any step, or non-finite
    weights after an epoch, raise TrainingDiverged naming the stage and step.
    `after_backward(model)` runs between each backward pass and optimizer step (e.g. a sparsity penalty that
    adds to the gradients).
    """
    device = train.x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # steady shapes: let cuDNN pick its fastest kernels once
    # under torchrun: this rank's shard of the train split and its share of the batch (no-ops otherwise)
    train = Split(*distributed.shard(train.x, train.y), train.mean, train.std)
    batch_size = min(distributed.local_batch(params.batch_size), len(train))
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the last partial batch: steady shapes
    ema = None
    if params.ema is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(params.ema), use_buffers=True
        )
    distiller = None  # after the EMA copy, which must not copy the distiller's hooks
    if teacher is not None:
        distiller = Distiller(teacher.to(device), model, distill or DistillParams(), train.inputs(slice(0, 2)),
                              steps_per_epoch)
    # the distiller's adapters (if any) learn with the student, under the same optimizer and schedule, at their own
    # peak learning rate (distill.hint.lr_scale x the student's)
    optimizer = build_optimizer(model, params)
    adapter = [q for q in distiller.trainable.parameters()] if distiller is not None else []
    if adapter:
        lr = params.lr * distiller.params.hint.lr_scale
        optimizer.add_param_group({"params": adapter, "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    step_model = distributed.wrap(model)  # under torchrun: DDP averages the gradients (no-op otherwise)
    step_model = torch.compile(step_model) if params.compile else step_model
    total_steps = steps_per_epoch * params.epochs
    warmup_steps = int(params.warmup_epochs * steps_per_epoch)
    history: list[dict] = []
    step = 0
    epochs = range(1, params.epochs + 1)
    bar = None
    if _show_progress():
        from tqdm import tqdm

        bar = tqdm(epochs, desc=stage, unit="epoch", leave=False)
        epochs = bar
    for epoch in epochs:
        started = time.perf_counter()
        order = torch.randperm(len(train), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)  # the first non-finite step, kept on device
        for i in range(steps_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            x = augment(train.inputs(index), params.augment, generator)
            y = train.y[index]
            mixed = None
            if distiller is not None and distiller.params.mix != "none":  # the same mixed view for both networks
                x, perm, lam = mix(x, distiller.params.mix, distiller.params.mix_alpha, generator)
                mixed = (perm, lam)
            scale = schedule_scale(step, total_steps, warmup_steps, params.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            with _autocast(device):
                logits = step_model(x)
                if distiller is not None:
                    loss = distiller.loss(logits, x, y, step, params.label_smoothing, mixed)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distiller is not None:  # adapters live outside the DDP model: average their gradients here
                distributed.average_gradients(distiller.trainable)
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(loss.detach()), step)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            step += 1
        train_loss = distributed.mean(loss_sum / steps_per_epoch).item()  # one sync per epoch
        _check_finite(stage, int(first_bad), model, epoch, step)
        scored = ema.module if ema is not None else model
        val_metrics = evaluate(scored, val, tta=params.tta)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": correct.item() / (steps_per_epoch * batch_size),
            "val_loss": val_metrics["loss"],
            "val_accuracy": val_metrics["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
        elif distributed.is_main():
            print(f"{stage} epoch {epoch}/{params.epochs}: train_loss={train_loss:.4f} "
                  f"val_loss={row['val_loss']:.4f} val_accuracy={row['val_accuracy']:.4f} ({row['seconds']:.1f}s)",
                  file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(row)
    if bar is not None:
        bar.close()
    if distiller is not None:
        distiller.close()  # the model leaves without hooks (after an error they only keep the last features)
    final = ema.module if ema is not None else model
    return final.to(memory_format=torch.contiguous_format), history
