"""Optimizers and learning-rate schedules for the training loop.

Every parameter group keeps its peak learning rate in ``base_lr``; the loop sets ``lr = base_lr * schedule(step)``.
The hypergradient optimizer learns ``base_lr`` itself while it trains.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdprune.config import TrainParams


class HypergradSGD(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose learning rate is learned online by hypergradient descent.

    Baydin, Cornish, Martinez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with Hypergradient Descent"
    (ICLR 2018). With the update theta_t = theta_{t-1} - lr * d_{t-1}, the loss's derivative with respect to the
    learning rate is  dL(theta_t)/d lr = -g_t . d_{t-1},  so before each step

        base_lr <- base_lr + hypergrad_lr * scale_{t-1} * (g_t . d_{t-1})

    where scale is the schedule's multiplier at the previous step (lr = base_lr * scale).
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, hypergrad_lr: float):
        super().__init__(params, dict(lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      hypergrad_lr=hypergrad_lr, prev_scale=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad for p in params]
            # hypergradient: g_t . d_{t-1}, over the whole group
            dots = [torch.sum(g * self.state[p]["direction"]) for p, g in zip(params, grads) if "direction" in self.state[p]]
            scale = group["lr"] / group["base_lr"] if group["base_lr"] else 1.0  # set by the schedule this step
            if dots:
                hypergrad = torch.stack(dots).sum().item()
                group["base_lr"] = max(0.0, group["base_lr"] + group["hypergrad_lr"] * group["prev_scale"] * hypergrad)
                group["lr"] = group["base_lr"] * scale
            for p, g in zip(params, grads):
                state = self.state[p]
                buf = state.setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                direction = g.add(buf, alpha=group["momentum"])  # Nesterov
                state["direction"] = direction
                p.add_(direction, alpha=-group["lr"])
            group["prev_scale"] = scale
        return None


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales: it only fights the normalisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if params.norm_lr_scale != 1.0:  # batch-norm parameters in a third group, at a scaled learning rate
        norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters(False)}
        groups[1]["params"] = [p for p in no_decay if id(p) not in norm]
        lr = params.lr * params.norm_lr_scale
        groups.append({"params": [p for p in no_decay if id(p) in norm], "weight_decay": 0.0, "lr": lr, "base_lr": lr})
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if params.optimizer in ("sgd", "nesterov"):
        opt = torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum,
                              nesterov=params.optimizer == "nesterov" and params.momentum > 0, **fused)
    elif params.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=params.lr, betas=(params.momentum, params.beta2), **fused)
    else:
        opt = HypergradSGD(groups, lr=params.lr, momentum=params.momentum, weight_decay=0.0,
                           hypergrad_lr=params.hypergrad_lr)
    for group in opt.param_groups:
        group.setdefault("base_lr", params.lr)
    return opt


def schedule_scale(step: int, total_steps: int, warmup_steps: int, shape: str) -> float:
    """Learning-rate multiplier in [0, 1]: linear warm-up, then constant, cosine or linear decay to zero."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear
