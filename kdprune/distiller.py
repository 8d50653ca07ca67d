"""The KD part of the training loop: a teacher, the loss of `distill.method`, and what that loss needs.

`Distiller(teacher, student, params, example, steps_per_epoch)` is built by `fit` when it has a teacher:

- hinton: Hinton et al.'s loss on the logits.
- dkd: cross-entropy + decoupled KD at `dkd.temperature` (else `temperature`), ramped in linearly over
  `dkd.warmup_epochs`.
- fitnets: Hinton's loss + `hint.weight` * the hint loss between the two networks' feature maps at `hint.stage`
  (an index into each model's `stages`, so teacher and student may be different architectures). Forward hooks on
  those named modules capture the maps; a 1x1 conv adapter maps the student's width to the teacher's where they
  differ, and a map larger than the other is average-pooled to the smaller's side. The adapter is sized by probing
  the student (eval mode, one example batch), so a pruned student gets an adapter of its pruned width. Its
  parameters are in `trainable`, which `fit` hands to the same optimizer as the student's.

`close()` removes the hooks; `fit` calls it when training ends, so the returned model carries none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.config import DistillParams
from kdprune.errors import KdpruneError
from kdprune.losses import dkd_loss, hint_loss, kd_term


def _stage_module(model: nn.Module, index: int, role: str) -> nn.Module:
    stages = getattr(model, "stages", ())
    if not -len(stages) <= index < len(stages):
        raise KdpruneError(f"distill.hint.stage: {index} is out of range for the {role} "
                           f"({type(model).__name__} has {len(stages)} stages: {', '.join(stages) or 'none'})")
    return model.get_submodule(stages[index])


class Distiller:
    """The teacher and the loss of `params.method` for one `fit`; FitNets' hooks and adapter (see the module doc)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, params: DistillParams, example: torch.Tensor,
                 steps_per_epoch: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.params = params
        self.warmup_steps = params.dkd.warmup_epochs * steps_per_epoch
        self.hint_warmup_steps = params.hint.warmup_epochs * steps_per_epoch
        self.trainable = nn.ModuleDict()  # trained with the student, by its optimizer
        self._features: dict[str, torch.Tensor] = {}
        self._hooks = []
        if params.method == "fitnets":
            stages = (_stage_module(student, params.hint.stage, "student"),
                      _stage_module(teacher, params.hint.stage, "teacher"))  # both checked before any hook
            self._hook(stages[0], "student")
            self._hook(stages[1], "teacher")
            was_training = student.training
            with torch.no_grad():  # eval mode: no batch-norm statistics or whitening set by the probe
                student.eval()(example)
                self.teacher(example)
            student.train(was_training)
            width_s, width_t = self._features["student"].shape[1], self._features["teacher"].shape[1]
            self.trainable["adapter"] = (nn.Conv2d(width_s, width_t, 1, bias=False) if width_s != width_t
                                         else nn.Identity()).to(example.device)

    def _hook(self, module: nn.Module, key: str) -> None:
        def keep(_module, _inputs, output):
            self._features[key] = output

        self._hooks.append(module.register_forward_hook(keep))

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def loss(self, student_logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, step: int,
             label_smoothing: float = 0.0, mixed: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The distillation loss of one batch; `student_logits` came from the student's forward pass on `x`, which
        the teacher sees too. `mixed` = (perm, lam) when `x` mixes each image with image `perm` (share lam of the
        first): the label terms then weigh both labels, lam * CE(y) + (1 - lam) * CE(y[perm]), and DKD's target
        class is the larger share's."""
        p = self.params
        teacher_logits = self.teacher_logits(x)

        def ce() -> torch.Tensor:
            if mixed is None:
                return F.cross_entropy(student_logits.float(), y, label_smoothing=label_smoothing)
            perm, lam = mixed
            return (lam * F.cross_entropy(student_logits.float(), y, label_smoothing=label_smoothing)
                    + (1 - lam) * F.cross_entropy(student_logits.float(), y[perm], label_smoothing=label_smoothing))

        if p.method == "dkd":
            ramp = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
            target = y if mixed is None or mixed[1] >= 0.5 else y[mixed[0]]
            t = p.dkd.temperature or p.temperature
            return ce() + ramp * dkd_loss(student_logits, teacher_logits, target, t, p.dkd.alpha, p.dkd.beta)
        # Hinton's loss: its KD term, and the label term computed here (one label or two, mixed)
        loss = p.alpha * kd_term(student_logits, teacher_logits, p.temperature) + (1 - p.alpha) * ce()
        if p.method == "fitnets":
            ramp = min(1.0, step / self.hint_warmup_steps) if self.hint_warmup_steps > 0 else 1.0
            loss = loss + ramp * p.hint.weight * hint_loss(*self.matched_features())
        return loss

    def matched_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last forward passes' feature maps: the student's through the adapter, both at the smaller side."""
        student = self.trainable["adapter"](self._features["student"])
        teacher = self._features["teacher"]
        side = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        if tuple(student.shape[-2:]) != side:
            student = F.adaptive_avg_pool2d(student, side)
        if tuple(teacher.shape[-2:]) != side:
            teacher = F.adaptive_avg_pool2d(teacher, side)
        return student, teacher

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._features.clear()
