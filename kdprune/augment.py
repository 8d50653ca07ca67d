"""Batch augmentations as tensor ops: one call augments a whole batch on whatever device it lives on.

No per-sample Python: each op draws its randomness for the batch at once from a seeded generator, so the same
code runs on the GPU (fast) and the CPU (slow, identical semantics).
"""

from __future__ import annotations

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
