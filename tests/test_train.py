"""The training loop learns, distils, reports curves, and stops on a NaN/inf loss naming stage and epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.config import AugmentParams, DistillParams, TrainParams
from kdprune.errors import KdpruneError, TrainingDiverged
from kdprune.models import build
from kdprune.train import Split, evaluate, fit, predict_logits


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by which half of an 8x8 image is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 0, :, :, :4] += 150
    x[y == 1, :, :, 4:] += 150
    return x, y


def splits(n_train=256, n_val=64, seed=0) -> tuple[Split, Split]:
    xt, yt = separable(n_train, seed)
    xv, yv = separable(n_val, seed + 1000)
    mean = (xt.float() / 255).mean(dim=(0, 2, 3))[None, :, None, None]
    std = (xt.float() / 255).std(dim=(0, 2, 3))[None, :, None, None]
    return Split(xt, yt, mean, std), Split(xv, yv, mean, std)


TRAIN = TrainParams(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, augment=AugmentParams(flip=False))


def tiny_model(classes=2, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build({"arch": "resnet", "width": 4, "depth": 1, "dropout": 0.0}, 1, 8, classes)


def test_fit_learns_a_separable_dataset():
    train, val = splits()
    before = evaluate(tiny_model(), val)["accuracy"]
    model, history = fit(tiny_model(), train, val, TRAIN, stage="unit", seed=0)
    after = evaluate(model, val)
    assert after["accuracy"] >= 0.9  # chance is 0.5
    assert after["accuracy"] > before
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] == pytest.approx(after["accuracy"])
    expected_keys = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert all(set(row) == expected_keys for row in history)


def test_fit_is_deterministic_for_a_seed():
    train, val = splits()
    a, ha = fit(tiny_model(), train, val, TRAIN, stage="unit", seed=3)
    b, hb = fit(tiny_model(), train, val, TRAIN, stage="unit", seed=3)
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_on_epoch_callback_gets_every_row():
    train, val = splits()
    rows = []
    _, history = fit(tiny_model(), train, val, TRAIN, stage="unit", on_epoch=rows.append)
    assert rows == history


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "hypergrad"])
def test_other_optimizers_train(optimizer):
    train, val = splits()
    lr = 0.01 if optimizer == "adamw" else 0.05
    params = TRAIN.model_copy(update={"optimizer": optimizer, "lr": lr})
    model, history = fit(tiny_model(), train, val, params, stage="unit")
    assert evaluate(model, val)["accuracy"] >= 0.8
    assert all(math.isfinite(r["train_loss"]) for r in history)


def test_ema_returns_the_averaged_model():
    train, val = splits()
    model, _ = fit(tiny_model(), train, val, TRAIN.model_copy(update={"ema": 0.9}), stage="unit")
    assert evaluate(model, val)["accuracy"] >= 0.8
    assert model(train.inputs(slice(0, 2))).shape == (2, 2)


def test_distillation_trains_student_and_leaves_teacher_alone():
    train, val = splits()
    teacher, _ = fit(tiny_model(seed=1), train, val, TRAIN, stage="teacher")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # 4 epochs: after only 16 tiny steps the batch-norm running averages can still lag the weights
    student, history = fit(tiny_model(seed=2), train, val, TRAIN.model_copy(update={"epochs": 4}), stage="distilled",
                           teacher=teacher,
                           distill=DistillParams(temperature=2.0, alpha=0.9))
    assert evaluate(student, val)["accuracy"] >= 0.8
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_huge_learning_rate_diverges_naming_stage_and_epoch():
    train, val = splits()
    params = TRAIN.model_copy(update={"lr": 1e30})
    with pytest.raises(TrainingDiverged) as info:
        fit(tiny_model(), train, val, params, stage="teacher")
    message = str(info.value)
    assert "teacher" in message and "epoch 1" in message
    assert isinstance(info.value, KdpruneError)  # so the CLI reports it as one line


class InfModel(nn.Module):
    """Finite at first, then logits of +inf from epoch 2 on (after `steps` training steps)."""

    def __init__(self, steps: int):
        super().__init__()
        self.linear = nn.Linear(64, 2)
        self.steps = steps
        self.calls = 0

    def forward(self, x):
        out = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                return out * float("inf")
        return out


def test_infinite_loss_in_a_later_epoch_names_that_epoch():
    train, val = splits()
    steps_per_epoch = len(train) // TRAIN.batch_size
    params = TRAIN.model_copy(update={"epochs": 3})
    with pytest.raises(TrainingDiverged, match=r"distilled.*epoch 2"):
        fit(InfModel(steps_per_epoch), train, val, params, stage="distilled")


def test_a_divergence_on_the_very_last_step_is_caught_although_every_loss_was_finite():
    # the last update blows the weights up; its own loss was computed before, so every epoch loss is finite
    train, val = splits()
    total = (len(train) // TRAIN.batch_size) * TRAIN.epochs
    steps = []

    def poison_last_step(model):
        steps.append(1)
        if len(steps) == total:
            for p in model.parameters():
                p.grad.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=rf"teacher: the weights became non-finite by step {total} "):
        fit(tiny_model(), train, val, TRAIN, stage="teacher", after_backward=poison_last_step)
    assert len(steps) == total


def test_a_non_finite_loss_names_its_step():
    train, val = splits()
    steps_per_epoch = len(train) // TRAIN.batch_size
    model = InfModel(steps_per_epoch + 2)  # finite for one epoch and two steps: step 3 of epoch 2 is +inf
    with pytest.raises(TrainingDiverged, match=rf"student: the loss became non-finite at step {steps_per_epoch + 3} "
                                               r"\(epoch 2\)"):
        fit(model, train, val, TRAIN, stage="student")


def test_predict_logits_with_tta_averages_mirrors():
    _, val = splits()
    model = tiny_model().eval()
    plain = predict_logits(model, val)
    tta = predict_logits(model, val, tta=True)
    with torch.no_grad():
        mirrored = model(val.inputs(slice(None)).flip(-1))
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert model.training is False


def test_predict_logits_restores_training_mode():
    _, val = splits()
    model = tiny_model().train()
    predict_logits(model, val, batch_size=10)
    assert model.training


def test_batch_size_larger_than_the_data():
    train, val = splits(n_train=20)
    model, history = fit(tiny_model(), train, val, TRAIN.model_copy(update={"batch_size": 512}), stage="unit")
    assert len(history) == 2


# ------------------------------------------------------------------ pinned options: each test fails if fit ignored it
def _recorder(snapshots: list):
    """An after_backward hook that records (weights before this step, their gradients) for every parameter."""
    def record(model: nn.Module) -> None:
        snapshots.append([(p.detach().clone(), p.grad.detach().clone()) for p in model.parameters()])
    return record


def test_ema_weights_are_the_exponential_average_of_the_raw_weights_and_are_returned():
    train, val = splits()
    decay, raw, steps = 0.8, tiny_model(), []
    averaged, _ = fit(raw, train, val, TRAIN.model_copy(update={"ema": decay}), stage="unit",
                      after_backward=_recorder(steps))
    # the raw weights after each step: those seen before the next step, then the raw model's final ones
    after = [[w for w, _ in s] for s in steps[1:]] + [[p.detach() for p in raw.parameters()]]
    expected = after[0]  # the first update copies, the next ones average
    for weights in after[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    got = list(averaged.parameters())
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected))
    assert max((g - w).abs().max().item() for g, w in zip(got, after[-1])) > 1e-3  # not the raw weights
    assert averaged is not raw


@pytest.mark.parametrize("distil", [False, True])
def test_label_smoothing_is_the_loss_that_is_trained(distil):
    train, val = splits()
    teacher = tiny_model(seed=5).eval() if distil else None
    # one full batch, a vanishing lr and no augmentation: the first epoch's loss is the loss of the initial model
    params = TRAIN.model_copy(update={"batch_size": len(train), "lr": 1e-12, "epochs": 1, "label_smoothing": 0.3})
    initial = tiny_model()
    with torch.no_grad():
        logits = initial.train()(train.inputs(slice(None)))
    _, smoothed = fit(tiny_model(), train, val, params, stage="unit", teacher=teacher,
                      distill=DistillParams(alpha=0.0) if distil else None)
    _, plain = fit(tiny_model(), train, val, params.model_copy(update={"label_smoothing": 0.0}), stage="unit",
                   teacher=teacher, distill=DistillParams(alpha=0.0) if distil else None)
    assert smoothed[0]["train_loss"] == pytest.approx(F.cross_entropy(logits, train.y, label_smoothing=0.3).item(),
                                                      rel=1e-4)
    assert plain[0]["train_loss"] == pytest.approx(F.cross_entropy(logits, train.y).item(), rel=1e-4)
    assert smoothed[0]["train_loss"] != pytest.approx(plain[0]["train_loss"], rel=1e-3)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_learning_rate_of_every_step_is_the_schedules(schedule):
    from kdprune.optim import schedule_scale

    train, val = splits()
    # plain SGD without momentum or decay: each step moves the weights by exactly -lr * gradient
    params = TRAIN.model_copy(update={"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "epochs": 3,
                                      "warmup_epochs": 1, "schedule": schedule, "lr": 0.1})
    model, steps = tiny_model(), []
    fit(model, train, val, params, stage="unit", after_backward=_recorder(steps))
    after = [s[0][0] for s in steps[1:]] + [next(model.parameters()).detach()]
    per_epoch = len(train) // params.batch_size
    used = []
    for (before, grad), moved in zip([s[0] for s in steps], after):
        used.append(-((moved - before) * grad).sum().item() / (grad * grad).sum().item())
    expected = [0.1 * schedule_scale(k, 3 * per_epoch, per_epoch, schedule) for k in range(3 * per_epoch)]
    assert len(used) == len(expected) == 24
    assert used == pytest.approx(expected, rel=1e-3, abs=1e-6)
