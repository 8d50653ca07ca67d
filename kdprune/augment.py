"""Batch augmentations as tensor ops: one call augments a whole batch on whatever device it lives on.

No per-sample Python: each op draws its randomness for the batch at once from a seeded generator, so the same
code runs on the GPU (fast) and the CPU (slow, identical semantics).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdprune.config import AugmentParams


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def translate(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `pixels` in each direction (reflect padding, then a random crop)."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pixels + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # gather: n x h x w x c -> nchw


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a `size` x `size` square at a random centre of each image (DeVries & Taylor, 2017)."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    half = size // 2
    inside = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return x.masked_fill(inside[:, None], 0.0)


def augment(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    if params.flip:
        x = flip(x, generator)
    x = translate(x, params.translate, generator)
    return cutout(x, params.cutout, generator)


def mix(x: torch.Tensor, mode: str, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each image with another of the batch: `mixup` (Zhang et al., ICLR 2018) blends the two, x' = lam * x +
    (1 - lam) * x[perm]; `cutmix` (Yun et al., ICCV 2019) pastes a box of the other image covering 1 - lam of the
    area. lam ~ Beta(alpha, alpha), one per batch, drawn from `generator` (through a seed it yields, as torch's
    Beta sampler takes no generator). Returns (mixed, perm, lam), lam being the share of `x` (for cutmix: the exact
    share of pixels kept after the box is clipped to the image)."""
    seed = int(torch.randint(0, 2**62, (1,), device=x.device, generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    n, _, h, w = x.shape
    cut_h, cut_w = int(round(h * (1 - lam) ** 0.5)), int(round(w * (1 - lam) ** 0.5))
    cy = int(torch.randint(0, h, (1,), device=x.device, generator=generator))
    cx = int(torch.randint(0, w, (1,), device=x.device, generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy - cut_h // 2 + cut_h, h)
    left, right = max(cx - cut_w // 2, 0), min(cx - cut_w // 2 + cut_w, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    return mixed, perm, 1.0 - (bottom - top) * (right - left) / (h * w)
