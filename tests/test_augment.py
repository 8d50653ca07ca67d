"""Batch augmentations agree with simple per-sample references, keep shapes/dtypes/labels, and are seeded.

The batch ops (kdprune.augment) are what the GPU path runs; the references here loop over samples and pixels
in plain Python, drawing the same random numbers from a generator seeded the same way.
"""

from __future__ import annotations

import pytest
import torch

from kdprune.augment import augment, cutout, flip, mix, translate
from kdprune.config import AugmentParams, DistillParams, TrainParams
from kdprune.models import build
from kdprune.train import Split, evaluate, fit


def images(n=16, c=3, h=12, w=10, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Random images with no zero pixel (so that cutout's zeros are its own)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, h, w, generator=g) + 0.5).to(dtype)


def gen(seed=1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------- per-sample references
def reference_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    draws = torch.rand(x.shape[0], generator=g)
    out = x.clone()
    for i in range(x.shape[0]):
        if draws[i] < 0.5:
            for col in range(x.shape[-1]):
                out[i, :, :, col] = x[i, :, :, x.shape[-1] - 1 - col]
    return out


def _reflect(index: int, size: int) -> int:
    """numpy/torch 'reflect' padding: the edge pixel is not repeated."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def reference_translate(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        for row in range(h):
            for col in range(w):
                out[i, :, row, col] = x[i, :, _reflect(row + int(dy[i]) - pixels, h), _reflect(col + int(dx[i]) - pixels, w)]
    return out


def cutout_centres(n: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)


def reference_cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    cy, cx = cutout_centres(n, h, w, g)
    out = x.clone()
    for i in range(n):
        top, left = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        for row in range(max(0, top), min(h, top + size)):
            for col in range(max(0, left), min(w, left + size)):
                out[i, :, row, col] = 0
    return out


# ---------------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flip_matches_the_per_sample_reference(dtype):
    x = images(dtype=dtype)
    out = flip(x, gen(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_flip(x, gen(5)))


@pytest.mark.parametrize("pixels", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_translate_matches_the_per_sample_reference(pixels, dtype):
    x = images(dtype=dtype)
    out = translate(x, pixels, gen(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_translate(x, pixels, gen(7)))


@pytest.mark.parametrize("size", [1, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cutout_matches_the_per_sample_reference(size, dtype):
    x = images(dtype=dtype)
    out = cutout(x, size, gen(9))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_cutout(x, size, gen(9)))


def test_flip_and_translate_move_pixels_but_keep_their_values():
    x = images(n=32)
    assert torch.equal(flip(x, gen()).sort(dim=-1).values, x.sort(dim=-1).values)  # a row's values, reordered
    shifted = translate(x, 2, gen())
    assert not torch.equal(shifted, x)
    assert set(shifted.unique().tolist()) <= set(x.unique().tolist())


def test_translate_by_zero_is_the_identity():
    x = images()
    assert torch.equal(translate(x, 0, gen()), x)
    assert torch.equal(augment(x, AugmentParams(flip=False, translate=0, cutout=0), gen()), x)
    assert torch.equal(cutout(x, 0, gen()), x)


def test_a_seeded_generator_gives_the_same_batch_twice():
    x = images(n=32)
    params = AugmentParams(flip=True, translate=2, cutout=4)
    first, second = augment(x, params, gen(3)), augment(x, params, gen(3))
    assert torch.equal(first, second)
    assert not torch.equal(first, augment(x, params, gen(4)))  # and another seed another batch


def test_cutout_zeroes_exactly_size_squared_pixels_when_inside():
    n, h, w, size = 64, 16, 16, 4
    x = images(n=n, h=h, w=w)
    out = cutout(x, size, gen(11))
    cy, cx = cutout_centres(n, h, w, gen(11))
    zeros = (out == 0).all(dim=1).flatten(1).sum(1)  # zeroed pixels (all channels) per image
    assert torch.equal((out == 0).any(dim=1), (out == 0).all(dim=1))  # whole pixels, every channel
    inside = (cy - size // 2 >= 0) & (cy - size // 2 + size <= h) & (cx - size // 2 >= 0) & (cx - size // 2 + size <= w)
    assert inside.sum() >= 10  # the seed gives enough of both kinds
    assert (~inside).sum() >= 1
    assert (zeros[inside] == size * size).all()
    assert (zeros[~inside] < size * size).all() and (zeros[~inside] > 0).all()


def test_augment_keeps_every_image_with_its_label():
    """Each image is filled with its label + 1: whatever augment does, an image's non-zero pixels keep that value."""
    n = 64
    labels = torch.randint(0, 10, (n,), generator=gen(0))
    x = (labels.float() + 1)[:, None, None, None].expand(n, 3, 16, 16).contiguous()
    out = augment(x, AugmentParams(flip=True, translate=3, cutout=6), gen(2))
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(n):
        kept = out[i][out[i] != 0]
        assert kept.numel() > 0
        assert torch.all(kept == labels[i] + 1)


# ------------------------------------------------------------------------------- fit with profile options
def flip_safe_separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by which half (top or bottom) of an 8x8 image is bright: mirroring keeps labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 0, :, :4, :] += 150
    x[y == 1, :, 4:, :] += 150
    return x, y


def test_fit_with_profile_options_learns_a_separable_set():
    """The GPU profile's options (airbench arch, Nesterov, BN lr x64, label smoothing, EMA, flip + translate +
    cutout, flip TTA) on a tiny flip-safe task: the teacher learns it and a student distils from it."""
    xt, yt = flip_safe_separable(256, 0)
    xv, yv = flip_safe_separable(128, 1)
    mean = (xt.float() / 255).mean(dim=(0, 2, 3))[None, :, None, None]
    std = (xt.float() / 255).std(dim=(0, 2, 3))[None, :, None, None]
    train, val = Split(xt, yt, mean, std), Split(xv, yv, mean, std)
    params = TrainParams(epochs=6, batch_size=32, optimizer="nesterov", lr=0.05, momentum=0.85, weight_decay=0.0015,
                         norm_lr_scale=64.0, schedule="linear", warmup_epochs=1, label_smoothing=0.2, ema=0.9,
                         augment=AugmentParams(flip=True, translate=1, cutout=3), tta=True)
    torch.manual_seed(0)
    teacher, history = fit(build({"arch": "airbench", "width": 8, "depth": 1, "dropout": 0.0}, 1, 8, 2), train, val,
                           params, stage="unit", seed=0)
    assert evaluate(teacher, val, tta=True)["accuracy"] >= 0.9  # chance is 0.5
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] == pytest.approx(evaluate(teacher, val, tta=True)["accuracy"])
    torch.manual_seed(1)
    student, _ = fit(build({"arch": "airbench", "width": 4, "depth": 1, "dropout": 0.0}, 1, 8, 2), train, val,
                     params, stage="unit-kd", seed=0, teacher=teacher, distill=DistillParams(temperature=2.0, alpha=0.9))
    assert evaluate(student, val, tta=True)["accuracy"] >= 0.85


def test_mixup_blends_each_image_with_its_partner():
    x = images()
    mixed, perm, lam = mix(x, "mixup", 1.0, torch.Generator().manual_seed(0))
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(len(x)))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


def test_cutmix_pastes_a_box_of_the_partner_covering_one_minus_lam():
    x = images()
    mixed, perm, lam = mix(x, "cutmix", 1.0, torch.Generator().manual_seed(1))
    from_partner = (mixed == x[perm]) & (mixed != x)
    box = from_partner.any(0).any(0)  # h x w: where some image took its partner's pixels
    assert torch.equal(torch.where(box, x[perm], x), mixed)
    assert 1 - box.float().mean().item() == pytest.approx(lam)


def test_mix_is_seeded_and_alpha_shapes_lam():
    x = images()
    a = mix(x, "mixup", 1.0, torch.Generator().manual_seed(3))
    b = mix(x, "mixup", 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    small = [mix(x, "mixup", 0.1, torch.Generator().manual_seed(s))[2] for s in range(40)]
    assert sum(min(l, 1 - l) < 0.1 for l in small) > 25  # Beta(0.1, 0.1) sits near 0 or 1
