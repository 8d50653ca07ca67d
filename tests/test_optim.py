"""Optimizers and schedules: the hypergradient optimizer (Baydin et al., 2018) learns its learning rate, and the
schedule multiplier warms up and decays as documented."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from search_fixtures import prepared_digits  # noqa: F401
from kdprune.config import TrainParams
from kdprune.optim import HypergradSGD, build_optimizer, schedule_scale

os.environ.setdefault("CI", "1")  # no progress bars from the training loop


# ------------------------------------------------------------------------------------------- problems
def _least_squares(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, generator=g, dtype=torch.float64) + 0.01 * torch.randn(256, generator=g, dtype=torch.float64)
    return lambda w: ((x @ w - y) ** 2).mean()


def _logistic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    labels = (x @ torch.randn(5, generator=g, dtype=torch.float64) > 0).double()
    return lambda w: nn.functional.binary_cross_entropy_with_logits(x @ w, labels)


def _train(loss_fn, optimizer_fn, steps: int, dim: int = 10) -> tuple[list[float], torch.optim.Optimizer]:
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_fn([w])
    losses = []
    for _ in range(steps):
        loss = loss_fn(w)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses.append(loss_fn(w).item())
    return losses, optimizer


# ----------------------------------------------------------------------------------- hypergradient SGD
def test_hypergrad_raises_a_too_small_lr_and_beats_the_fixed_lr():
    loss_fn = _least_squares()
    losses, opt = _train(loss_fn, lambda p: HypergradSGD(p, lr=1e-4, momentum=0.9, weight_decay=0.0,
                                                         hypergrad_lr=1e-4), steps=200)
    fixed, _ = _train(loss_fn, lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, nesterov=True), steps=200)
    assert losses[-1] < 1e-3 * losses[0]
    assert opt.param_groups[0]["base_lr"] > 1e-2  # learned: a hundred times its start
    assert losses[-1] < 0.01 * fixed[-1]


@pytest.mark.parametrize("lr0, direction", [(0.05, "up"), (1.6, "down")])
def test_hypergrad_moves_the_lr_towards_the_curvature(lr0, direction):
    # f = |w - 1|^2 / 2 from w = 0: the best lr is 1. Too small, consecutive gradients agree; too large (but
    # stable), they alternate in sign.
    losses, opt = _train(lambda w: 0.5 * ((w - 1) ** 2).sum(),
                         lambda p: HypergradSGD(p, lr=lr0, momentum=0.0, weight_decay=0.0, hypergrad_lr=0.05),
                         steps=30, dim=4)
    learned = opt.param_groups[0]["base_lr"]
    assert (learned > 2 * lr0) if direction == "up" else (learned < lr0 - 0.1)
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == learned  # no schedule here: lr is the learned base_lr


def test_hypergrad_lowers_a_logistic_loss_and_moves_its_lr():
    losses, opt = _train(_logistic(), lambda p: HypergradSGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4,
                                                             hypergrad_lr=1e-3), steps=100, dim=5)
    assert losses[-1] < 0.5 * losses[0]
    assert not math.isclose(opt.param_groups[0]["base_lr"], 0.01, rel_tol=0.05)
    assert opt.param_groups[0]["base_lr"] > 0.01


def test_hypergradient_is_minus_the_loss_derivative_with_respect_to_the_lr():
    """base_lr changes by -hypergrad_lr * dL(theta_t)/d base_lr (finite differences), under a schedule scale and
    with weight decay counted in the loss the optimizer descends."""
    loss_fn, decay, beta = _logistic(1), 0.01, 0.1

    def total(w):
        return loss_fn(w) + 0.5 * decay * (w ** 2).sum()

    w = torch.full((5,), 0.3, dtype=torch.float64, requires_grad=True)
    opt = HypergradSGD([w], lr=0.2, momentum=0.9, weight_decay=decay, hypergrad_lr=beta)
    group = opt.param_groups[0]
    scales = [0.5, 0.8, 0.3]
    for t, scale in enumerate(scales):
        group["lr"] = group["base_lr"] * scale  # what the training loop does each step
        before = w.detach().clone()
        base_before = group["base_lr"]
        if t:
            d_prev = opt.state[w]["direction"].clone()
            theta_prev = before + lr_prev * d_prev  # theta_{t-1}: this step's start minus the last update

            def along(b):  # the decayed loss at theta_t, as a function of the last step's base_lr
                return total(theta_prev - b * scales[t - 1] * d_prev).item()

            eps = 1e-6
            dl_db = (along(base_before + eps) - along(base_before - eps)) / (2 * eps)
        opt.zero_grad()
        loss_fn(w).backward()  # the optimizer adds the weight decay: it descends `total`
        opt.step()
        if t:
            assert group["base_lr"] - base_before == pytest.approx(-beta * dl_db, rel=1e-4)
        assert group["lr"] == pytest.approx(group["base_lr"] * scale)  # the step kept the schedule's scale
        # the parameter moved by the step's lr along the stored direction
        torch.testing.assert_close(w.detach(), before - group["lr"] * opt.state[w]["direction"])
        lr_prev = group["lr"]


def test_hypergrad_without_lr_learning_is_nesterov_sgd():
    loss_fn = _least_squares(2)
    ours, opt = _train(loss_fn, lambda p: HypergradSGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, hypergrad_lr=0.0),
                       steps=25)
    torch_sgd, _ = _train(loss_fn, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                          steps=25)
    assert ours == pytest.approx(torch_sgd, rel=1e-9)
    assert opt.param_groups[0]["base_lr"] == 0.05


def test_build_optimizer_hypergrad_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    params = TrainParams(optimizer="hypergrad", lr=0.02, weight_decay=1e-3, hypergrad_lr=3e-4, norm_lr_scale=4.0)
    opt = build_optimizer(model, params)
    assert isinstance(opt, HypergradSGD)
    decay, plain, norm = opt.param_groups
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 1e-3
    assert plain["weight_decay"] == norm["weight_decay"] == 0.0
    assert (decay["base_lr"], plain["base_lr"], norm["base_lr"]) == (0.02, 0.02, 0.08)
    assert {g["hypergrad_lr"] for g in opt.param_groups} == {3e-4}
    n_norm = sum(1 for _ in model[1].parameters())
    assert len(norm["params"]) == n_norm


def test_fit_with_hypergrad_learns_its_lr(prepared_digits):
    from kdprune import data as data_mod
    from kdprune.models import build
    from kdprune.train import Split, fit

    prepared = data_mod.load_prepared(prepared_digits)
    train, val = (Split.from_prepared(prepared, s, torch.device("cpu")) for s in ("train", "val"))
    torch.manual_seed(0)
    model = build({"arch": "resnet", "width": 4, "depth": 1, "dropout": 0.0}, 1, 8, 10)
    params = TrainParams(optimizer="hypergrad", lr=1e-3, hypergrad_lr=1e-3, schedule="constant", warmup_epochs=0,
                         epochs=2, batch_size=64, weight_decay=0.0)
    _, history = fit(model, train, val, params, stage="hypergrad test")
    assert history[-1]["lr"] > 2e-3  # a too-small lr grows while training
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("shape", ["constant", "cosine", "linear"])
def test_warmup_ramps_linearly_to_one(shape):
    total, warmup = 100, 10
    ramp = [schedule_scale(s, total, warmup, shape) for s in range(warmup)]
    assert ramp == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert ramp[-1] == 1.0
    assert schedule_scale(warmup, total, warmup, shape) == pytest.approx(1.0)  # no jump after the warm-up


@pytest.mark.parametrize("shape", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_decays_reach_zero_at_the_end(shape, warmup):
    total = 100
    scales = [schedule_scale(s, total, warmup, shape) for s in range(total + 1)]
    after = scales[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # non-increasing after the warm-up
    assert all(0.0 <= s <= 1.0 for s in scales)
    assert scales[total - 1] < 0.02  # the last step the loop takes: about zero
    assert scales[total] == pytest.approx(0.0, abs=1e-12)
    assert scales[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=0.02)  # half-way: half


def test_constant_stays_one():
    assert {schedule_scale(s, 50, 0, "constant") for s in range(60)} == {1.0}
    assert {schedule_scale(s, 50, 5, "constant") for s in range(5, 60)} == {1.0}


def test_warmup_longer_than_training_never_exceeds_one():
    scales = [schedule_scale(s, 10, 10, "linear") for s in range(10)]
    assert scales == pytest.approx([(s + 1) / 10 for s in range(10)])
