"""Distillation losses, each with its formula and paper: Hinton's KD, DKD (decoupled KD), FitNets' hint loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The soft term of Hinton's loss: T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ), averaged over the batch.

    The T^2 factor keeps its gradient magnitude independent of the temperature T (section 2 of Hinton et al.,
    2015). The teacher's logits carry no gradient. The trainer adds the label term itself, so that it can weigh
    two labels of a mixed image (kdprune/distiller.py)."""
    t = temperature
    return t * t * F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.detach().float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )


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

    The first term is `kd_term`; the KL divergence is averaged over the batch.
    """
    hard = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    return alpha * kd_term(student_logits, teacher_logits, temperature) + (1.0 - alpha) * hard


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Decoupled knowledge distillation of Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation" (CVPR 2022).

    Hinton's KL splits into a target-class and a non-target-class part, which DKD weighs independently:

        b = [p_y, 1 - p_y]                       the binary target / rest probabilities (softmax at T)
        p^ = softmax over the non-target logits  (the target class left out)
        TCKD = KL(b_t || b_s),   NCKD = KL(p^_t || p^_s)
        DKD  = T^2 * (alpha * TCKD + beta * NCKD)

    In Hinton's loss NCKD carries the weight (1 - p_y^t), which suppresses it exactly when the teacher is confident;
    DKD's beta lifts that. Returns the DKD term alone, averaged over the batch; the training loss adds the
    cross-entropy (section 3.2 of the paper; the trainer ramps DKD in over a warm-up). The teacher gets no gradient.
    """
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.detach().float() / t
    target = F.one_hot(labels, s.shape[1]).bool()
    log_p_s, log_p_t = F.log_softmax(s, dim=1), F.log_softmax(te, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:  # log [p_y, 1 - p_y]
        log_py = log_p[target]
        log_rest = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([log_py, log_rest], dim=1)

    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean", log_target=True)
    # non-target distributions: the target logit removed (-inf) before the softmax
    nckd = F.kl_div(F.log_softmax(s.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0),
                    F.log_softmax(te.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0),
                    reduction="batchmean", log_target=True)
    return t * t * (alpha * tckd + beta * nckd)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """The hint loss of FitNets: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
    Nets" (ICLR 2015), section 2.2.

        L_HT = mean over elements of ( r(u_s(x)) - u_t(x) )^2

    u_t: the teacher's feature map at the hint stage; u_s: the student's at its guided stage; r: the learned
    regressor, here a 1x1 conv where the widths differ (applied by the caller, kdprune/distiller.py). The paper sums
    1/2 of the squared error; the mean only rescales the weight. The teacher's features get no gradient.
    """
    return F.mse_loss(student_features.float(), teacher_features.detach().float())
