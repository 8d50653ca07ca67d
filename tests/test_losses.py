"""Hinton et al.'s KD loss: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdprune.losses import hinton_kd_loss


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
