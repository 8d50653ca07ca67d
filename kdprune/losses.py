"""Distillation losses, each with its formula and paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Knowledge distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

        L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

    The T^2 factor keeps the soft term's gradient magnitude independent of the temperature T (section 2 of the
    paper). The KL divergence is averaged over the batch; the teacher's logits carry no gradient.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.detach().float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    return alpha * t * t * soft + (1.0 - alpha) * hard
