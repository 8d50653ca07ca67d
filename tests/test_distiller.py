"""The KD part of the training loop: each distill.method and its params change training; FitNets' hooks and
adapters work on every arch (pruned students included), learn with the student's optimizer, and leave no hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdprune.train as train_mod
from kdprune.config import DistillParams, DKDParams, HintParams
from kdprune.distiller import Distiller
from kdprune.errors import KdpruneError
from kdprune.losses import dkd_loss, hinton_kd_loss
from kdprune.models import MODEL_BUILDERS, build
from kdprune.pruning import prune_to_target
from kdprune.train import Split
from test_train import TRAIN

ARCHS = sorted(MODEL_BUILDERS)


def splits(n_train: int = 256, n_val: int = 64) -> tuple[Split, Split]:
    """Three classes (DKD's non-target term needs at least two non-target classes): which third of an 8x8 image is
    bright, plus noise."""
    out = []
    for n, seed in ((n_train, 0), (n_val, 1)):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for c, cols in enumerate((slice(0, 3), slice(3, 5), slice(5, 8))):
            x[y == c, :, :, cols] += 150
        out.append((x, y))
    mean = torch.full((1, 1, 1, 1), 0.3)
    std = torch.full((1, 1, 1, 1), 0.3)
    return Split(*out[0], mean, std), Split(*out[1], mean, std)


def net(arch: str, width: int = 4, seed: int = 0, channels: int = 1, size: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return build({"arch": arch, "width": width, "depth": 1, "dropout": 0.0}, channels, size, classes)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    train, val = splits()
    model, _ = train_mod.fit(net("resnet", 8), train, val, TRAIN, stage="teacher")
    return model


def distil(teacher, method: str, arch: str = "resnet", **params) -> nn.Module:
    train, val = splits()
    model, _ = train_mod.fit(net(arch), train, val, TRAIN, stage="distilled", teacher=teacher,
                             distill=DistillParams(method=method, **params))
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------- every option is used
@pytest.mark.parametrize("method", ["dkd", "fitnets"])
def test_each_method_trains_differently_from_hinton(teacher, method):
    assert not same_weights(distil(teacher, method), distil(teacher, "hinton"))


@pytest.mark.parametrize("method, changed", [
    ("dkd", {"dkd": DKDParams(beta=2.0)}),
    ("dkd", {"dkd": DKDParams(alpha=0.0)}),
    ("dkd", {"dkd": DKDParams(warmup_epochs=0.0)}),
    ("dkd", {"temperature": 2.0}),
    ("dkd", {"dkd": DKDParams(temperature=2.0)}),  # its own, over distill.temperature (4)
    ("fitnets", {"hint": HintParams(weight=5.0)}),
    ("fitnets", {"hint": HintParams(stage=0)}),
    ("fitnets", {"alpha": 0.5}),
    ("fitnets", {"hint": HintParams(lr_scale=10.0)}),
    ("fitnets", {"hint": HintParams(warmup_epochs=1.0)}),
    ("hinton", {"mix": "mixup"}),
    ("hinton", {"mix": "cutmix"}),
    ("dkd", {"mix": "cutmix"}),
])
def test_each_param_changes_training(teacher, method, changed):
    assert not same_weights(distil(teacher, method, **changed), distil(teacher, method))


def test_dkd_temperature_defaults_to_the_shared_one(teacher):
    assert same_weights(distil(teacher, "dkd", dkd=DKDParams(temperature=4.0)), distil(teacher, "dkd"))


def test_fitnets_with_zero_hint_weight_is_hinton(teacher):
    """The hint term is the only difference (the adapter is built, but a zero weight gives it no say)."""
    assert same_weights(distil(teacher, "fitnets", hint=HintParams(weight=0.0)), distil(teacher, "hinton"))


# ----------------------------------------------------------------------------------------- the losses used
def test_dkd_ramps_in_over_its_warmup(teacher):
    train, _ = splits()
    student = net("resnet")
    x, y = train.inputs(slice(0, 16)), train.y[:16]
    distiller = Distiller(teacher, student, DistillParams(method="dkd", dkd=DKDParams(warmup_epochs=2.0)), x[:2],
                          steps_per_epoch=10)
    logits = student(x)
    ce = F.cross_entropy(logits, y)
    dkd = dkd_loss(logits, teacher(x), y, 4.0, 1.0, 8.0)
    assert torch.allclose(distiller.loss(logits, x, y, step=0), ce)
    assert torch.allclose(distiller.loss(logits, x, y, step=5), ce + 0.25 * dkd, atol=1e-5)  # 5 of 20 steps
    assert torch.allclose(distiller.loss(logits, x, y, step=40), ce + dkd, atol=1e-5)
    distiller.close()


def test_fitnets_loss_is_hinton_plus_weighted_hint(teacher):
    train, _ = splits()
    student = net("resnet")
    x, y = train.inputs(slice(0, 16)), train.y[:16]
    params = DistillParams(method="fitnets", hint=HintParams(weight=3.0))
    distiller = Distiller(teacher, student, params, x[:2], steps_per_epoch=1)
    logits = student(x)
    loss = distiller.loss(logits, x, y, step=0)
    s, t = distiller.matched_features()
    assert torch.allclose(loss, hinton_kd_loss(logits, teacher(x), y, 4.0, 0.9) + 3.0 * F.mse_loss(s, t), atol=1e-5)
    distiller.close()


# ------------------------------------------------------------------------- hooks and adapters on every arch
@pytest.mark.parametrize("student_arch", ARCHS)
@pytest.mark.parametrize("teacher_arch", ["resnet", "seed_large", "airbench"])
@pytest.mark.parametrize("stage", [-1, 0])
def test_fitnets_on_every_arch_pair(teacher_arch, student_arch, stage):
    teacher, student = net(teacher_arch, 8, channels=3, size=32), net(student_arch, 4, seed=1, channels=3, size=32)
    x = torch.randn(4, 3, 32, 32)
    distiller = Distiller(teacher, student, DistillParams(method="fitnets", hint=HintParams(stage=stage)), x[:2], 1)
    loss = distiller.loss(student(x), x, torch.tensor([0, 1, 2, 1]), step=0)
    s, t = distiller.matched_features()
    assert s.shape == t.shape  # widths by the adapter, sides by pooling the larger map
    width_s = distiller._features["student"].shape[1]
    adapter = distiller.trainable["adapter"]
    if width_s == t.shape[1]:
        assert isinstance(adapter, nn.Identity)
    else:
        assert isinstance(adapter, nn.Conv2d) and adapter.kernel_size == (1, 1)
        assert (adapter.in_channels, adapter.out_channels) == (width_s, t.shape[1])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.trainable.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    distiller.close()
    assert hooks(student) == 0 and hooks(teacher) == 0


def test_a_stage_out_of_range_is_one_line_naming_the_field():
    teacher, student = net("resnet", 8), net("seed_small")
    with pytest.raises(KdpruneError, match=r"distill\.hint\.stage: -4 is out of range for the student \(SeedSmall has 3"):
        Distiller(teacher, student, DistillParams(method="fitnets", hint=HintParams(stage=-4)),
                  torch.randn(2, 1, 8, 8), 1)
    with pytest.raises(KdpruneError, match=r"distill\.hint\.stage: 3 is out of range for the teacher"):
        Distiller(student, teacher, DistillParams(method="fitnets", hint=HintParams(stage=3)),
                  torch.randn(2, 1, 8, 8), 1)  # roles swapped: a resnet student (4 stages), a seed_small teacher (3)
    assert hooks(student) == 0 and hooks(teacher) == 0  # nothing was hooked before the checks


def test_the_probe_leaves_the_student_untouched():
    """Sizing the adapter runs the student in eval mode: no batch-norm statistics, no whitening set."""
    student = net("airbench", seed=3).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    Distiller(net("resnet", 8), student, DistillParams(method="fitnets"), torch.randn(2, 1, 8, 8), 1).close()
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_adapter_learns_with_the_students_optimizer_at_its_own_lr(teacher, monkeypatch):
    """fit hands the adapter's parameters to the one optimizer, in their own group at hint.lr_scale x the student's
    peak lr (following the same schedule), and they change during training."""
    seen = {}
    real = train_mod.build_optimizer

    def spy(module, params):
        seen["optimizer"] = real(module, params)
        return seen["optimizer"]

    monkeypatch.setattr(train_mod, "build_optimizer", spy)
    student = distil(teacher, "fitnets", arch="seed_small", hint=HintParams(lr_scale=3.0))  # widths 128 vs 32
    groups = seen["optimizer"].param_groups
    student_ids = {id(p) for p in student.parameters()}
    adapter_groups = [g for g in groups if not {id(p) for p in g["params"]} & student_ids]
    assert len(adapter_groups) == 1 and len(adapter_groups[0]["params"]) == 1  # the 1x1 adapter's weight
    adapter = adapter_groups[0]["params"][0]
    assert adapter.shape[-2:] == (1, 1) and seen["optimizer"].state[adapter]  # it took steps
    assert adapter_groups[0]["base_lr"] == pytest.approx(3.0 * TRAIN.lr)
    student_group = next(g for g in groups if g is not adapter_groups[0])
    assert adapter_groups[0]["lr"] == pytest.approx(3.0 * student_group["lr"])  # the same schedule
    assert student_ids <= {id(p) for g in groups for p in g["params"]}


def test_the_hint_ramps_in_over_its_warmup(teacher):
    params = DistillParams(method="fitnets", hint=HintParams(weight=1.0, warmup_epochs=2.0))
    student = net("resnet")
    x = splits()[0].inputs(slice(0, 8))
    y = splits()[0].y[:8]
    d = Distiller(teacher, student, params, x, steps_per_epoch=4)
    try:
        logits = student(x)
        hinton = DistillParams(method="hinton")
        base = Distiller(teacher, student, hinton, x, 4).loss(logits, x, y, 0)
        hint = hint_loss_of(d, logits, x, y)
        for step, share in ((0, 0.0), (4, 0.5), (8, 1.0), (20, 1.0)):
            assert d.loss(logits, x, y, step).item() == pytest.approx(base.item() + share * hint, rel=1e-5)
    finally:
        d.close()


def hint_loss_of(d: Distiller, logits, x, y) -> float:
    from kdprune.losses import hint_loss

    d.loss(logits, x, y, 0)  # runs the teacher: both feature maps captured
    return hint_loss(*d.matched_features()).item()


@pytest.mark.parametrize("ema", [None, 0.9])
def test_fit_returns_a_model_without_hooks(teacher, ema):
    train, val = splits()
    model, _ = train_mod.fit(net("resnet"), train, val, TRAIN.model_copy(update={"ema": ema}), stage="d",
                             teacher=teacher, distill=DistillParams(method="fitnets"))
    assert hooks(model) == 0 and hooks(teacher) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_fitnets_fine_tunes_a_pruned_student(teacher, arch):
    """The prune stage's KD fine-tune: the adapter is sized from the pruned student's own width."""
    train, val = splits()
    # as in the pipeline, the student has trained before it is pruned (airbench: its patch whitening is set)
    student, _ = train_mod.fit(net(arch, 8), train, val, TRAIN, stage="distilled")
    example = torch.randn(1, 1, 8, 8)
    deepest = student.stages[-1]
    width_before = _width(student, deepest, example)
    student = prune_to_target(student, example, target=0.5)
    width_after = _width(student, deepest, example)
    assert width_after < width_before
    distiller = Distiller(teacher, student, DistillParams(method="fitnets"), train.inputs(slice(0, 2)), 1)
    assert distiller.trainable["adapter"].in_channels == width_after
    distiller.close()
    model, history = train_mod.fit(student, train, val, TRAIN, stage="pruned", teacher=teacher,
                                   distill=DistillParams(method="fitnets"))
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)


def _width(model: nn.Module, stage: str, example: torch.Tensor) -> int:
    out = {}
    hook = model.get_submodule(stage).register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    with torch.no_grad():
        model.eval()(example)
    hook.remove()
    return out["x"].shape[1]


def test_mix_alpha_changes_training(teacher):
    assert not same_weights(distil(teacher, "hinton", mix="mixup", mix_alpha=0.2),
                            distil(teacher, "hinton", mix="mixup"))


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_teacher_and_student_see_the_same_mixed_view(teacher, mode):
    """Consistent teaching: in every step both networks get one tensor, and it is not the plain batch."""
    seen = {"teacher": [], "student": []}
    student = net("resnet")
    hooks = [m.register_forward_pre_hook(lambda _m, args, key=key: seen[key].append(args[0].detach().clone()))
             for key, m in (("teacher", teacher), ("student", student))]
    train, val = splits()
    try:
        train_mod.fit(student, train, val, TRAIN.model_copy(update={"epochs": 1}), stage="distilled",
                      teacher=teacher, distill=DistillParams(mix=mode))
    finally:
        for hook in hooks:
            hook.remove()
    steps = len(train) // TRAIN.batch_size
    pairs = list(zip(seen["teacher"][:steps], seen["student"][:steps]))  # the steps (validation follows)
    assert len(pairs) == steps and all(torch.equal(t, s) for t, s in pairs)
    plain = {tuple(train.inputs(i).flatten().tolist()) for i in range(len(train))}
    mixed_images = sum(tuple(img.flatten().tolist()) not in plain for img in pairs[0][1])
    assert mixed_images > TRAIN.batch_size // 2  # most images of a batch are mixtures (a few pair with themselves)
