"""Distillation losses against hand-written references: Hinton's KD, DKD (decoupled KD), FitNets' hint loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdprune.losses import dkd_loss, hint_loss, hinton_kd_loss, kd_term


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g)
    teacher = torch.randn(5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (5,), generator=g)
    return student, teacher, labels


def _kl_by_hand(student, teacher, t):
    """sum_c p_t log(p_t / p_s), averaged over the batch, from softmaxes written out."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_alpha_zero_is_cross_entropy(batch, t):
    student, teacher, labels = batch
    loss = hinton_kd_loss(student, teacher, labels, temperature=t, alpha=0.0)
    by_hand = -torch.log_softmax(student, 1)[torch.arange(5), labels].mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)


def test_alpha_zero_with_label_smoothing(batch):
    student, teacher, labels = batch
    loss = hinton_kd_loss(student, teacher, labels, temperature=2.0, alpha=0.0, label_smoothing=0.1)
    assert torch.allclose(loss, F.cross_entropy(student, labels, label_smoothing=0.1), atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_kl(batch, t):
    student, teacher, labels = batch
    loss = hinton_kd_loss(student, teacher, labels, temperature=t, alpha=1.0)
    assert torch.allclose(loss, t * t * _kl_by_hand(student, teacher, t), atol=1e-5)


def test_mixture_weights(batch):
    student, teacher, labels = batch
    t, alpha = 3.0, 0.25
    loss = hinton_kd_loss(student, teacher, labels, temperature=t, alpha=alpha)
    ce = -torch.log_softmax(student, 1)[torch.arange(5), labels].mean()
    assert torch.allclose(loss, alpha * t * t * _kl_by_hand(student, teacher, t) + (1 - alpha) * ce, atol=1e-5)


def test_zero_kl_when_student_matches_teacher(batch):
    student, _, labels = batch
    loss = hinton_kd_loss(student, student.clone(), labels, temperature=4.0, alpha=1.0)
    assert abs(loss.item()) < 1e-6
    # a shift of all logits does not change the distributions either
    shifted = hinton_kd_loss(student, student + 5.0, labels, temperature=4.0, alpha=1.0)
    assert abs(shifted.item()) < 1e-5


def test_kl_positive_when_they_differ(batch):
    student, teacher, labels = batch
    assert hinton_kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0).item() > 1e-3


def test_no_gradient_to_teacher_logits(batch):
    student, teacher, labels = batch
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    hinton_kd_loss(student, teacher, labels, temperature=4.0, alpha=0.9).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_soft_gradient_is_temperature_independent_in_scale():
    """With the T^2 factor, the soft term's gradient is O(1) at high T (Hinton et al., section 2)."""
    g = torch.Generator().manual_seed(1)
    student0 = torch.randn(64, 10, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    labels = torch.zeros(64, dtype=torch.long)
    norms = []
    for t in (2.0, 8.0):
        student = student0.clone().requires_grad_(True)
        hinton_kd_loss(student, teacher, labels, temperature=t, alpha=1.0).backward()
        norms.append(student.grad.norm().item())
    assert 0.2 < norms[1] / norms[0] < 5  # without T^2 the ratio would be about (2/8)^2 = 1/16


def test_bf16_logits_give_float32_loss(batch):
    student, teacher, labels = batch
    loss = hinton_kd_loss(student.bfloat16(), teacher.bfloat16(), labels, temperature=4.0, alpha=0.5)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------------- DKD
def _dkd_by_hand(student, teacher, labels, t, alpha, beta):
    """Zhao et al. (2022), written out per sample from softmaxes, as their reference code computes it."""
    total = 0.0
    for zs, zt, y in zip(student, teacher, labels):
        ps, pt = torch.softmax(zs / t, 0), torch.softmax(zt / t, 0)
        bs, bt = torch.stack([ps[y], 1 - ps[y]]), torch.stack([pt[y], 1 - pt[y]])
        tckd = (bt * (bt / bs).log()).sum()
        others = [c for c in range(len(zs)) if c != y]
        qs, qt = torch.softmax(zs[others] / t, 0), torch.softmax(zt[others] / t, 0)
        nckd = (qt * (qt / qs).log()).sum()
        total = total + t * t * (alpha * tckd + beta * nckd)
    return total / len(labels)


@pytest.mark.parametrize("t, alpha, beta", [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0), (3.0, 0.0, 1.0)])
def test_dkd_matches_hand_written_reference(batch, t, alpha, beta):
    student, teacher, labels = batch
    loss = dkd_loss(student, teacher, labels, temperature=t, alpha=alpha, beta=beta)
    assert torch.allclose(loss, _dkd_by_hand(student, teacher, labels, t, alpha, beta), atol=1e-5)


def test_dkd_reformulates_the_kl(batch):
    """The paper's eq. (5): KL = TCKD + (1 - p_y^t) * NCKD, per sample; so alpha = 1 and beta = 1 - p_y^t give KD."""
    student, teacher, labels = batch
    t = 2.0
    for i in range(len(labels)):
        s, te, y = student[i:i + 1], teacher[i:i + 1], labels[i:i + 1]
        tckd = dkd_loss(s, te, y, temperature=t, alpha=1.0, beta=0.0)
        nckd = dkd_loss(s, te, y, temperature=t, alpha=0.0, beta=1.0)
        p_target = torch.softmax(te / t, 1)[0, y]
        kd = t * t * _kl_by_hand(s, te, t)
        assert torch.allclose(tckd + (1 - p_target) * nckd, kd, atol=1e-5)


def test_dkd_weights_each_part(batch):
    student, teacher, labels = batch
    tckd = dkd_loss(student, teacher, labels, temperature=4.0, alpha=1.0, beta=0.0)
    nckd = dkd_loss(student, teacher, labels, temperature=4.0, alpha=0.0, beta=1.0)
    assert tckd > 0 and nckd > 0
    both = dkd_loss(student, teacher, labels, temperature=4.0, alpha=0.5, beta=3.0)
    assert torch.allclose(both, 0.5 * tckd + 3.0 * nckd, atol=1e-6)
    assert dkd_loss(student, student.clone(), labels, temperature=4.0, alpha=1.0, beta=8.0).abs() < 1e-6


def test_dkd_gradient_is_finite_and_spares_the_teacher(batch):
    student, teacher, labels = batch
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    dkd_loss(student * 30, teacher * 30, labels, temperature=1.0, alpha=1.0, beta=8.0).backward()  # peaked softmaxes
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dkd_bf16_logits_give_float32_loss(batch):
    student, teacher, labels = batch
    loss = dkd_loss(student.bfloat16(), teacher.bfloat16(), labels, temperature=4.0, alpha=1.0, beta=8.0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# --------------------------------------------------------------------------------------------- FitNets hint
def test_hint_loss_is_the_mean_squared_difference():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    by_hand = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    assert hint_loss(s, t).item() == pytest.approx(by_hand, rel=1e-5)
    assert hint_loss(t, t).item() == 0.0


def test_hint_loss_spares_the_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    hint_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_term_is_hintons_soft_term_alone(batch, t):
    student, teacher, labels = batch
    assert torch.allclose(kd_term(student, teacher, t), t * t * _kl_by_hand(student, teacher, t), atol=1e-5)
    assert torch.allclose(kd_term(student, teacher, t), hinton_kd_loss(student, teacher, labels, t, 1.0), atol=1e-6)
