"""Optimizers and schedules built fresh for every task from ``cfg.optim``.

Two learning rates: ``lr.representation`` (the backbone / adapted representation: SLCA's slow
learner 1e-4, 0 freezes it) and ``lr.classifier`` (the heads, 1e-2). Schedules are stepped per
epoch (``multistep``, ``cosine``, ``constant``) or per step (``cosine_steps``, DIKI's per-iteration
cosine to ``final_lr_ratio·lr``).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

SCHEDULES = ("multistep", "cosine", "constant", "cosine_steps")


def sgd(groups: list[tuple[Iterable[torch.nn.Parameter], float]], momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over ``(params, lr)`` groups; groups with lr 0 or no trainable tensor are dropped."""
    param_groups = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        if params and lr > 0:
            param_groups.append({"params": params, "lr": lr})
    if not param_groups:
        raise ValueError("nothing to optimize: every parameter group is empty or has lr 0")
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)


def scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
              milestones=(), gamma: float = 0.1, final_lr_ratio: float = 0.0):
    """A ``LambdaLR`` multiplying each group's lr; ``per_step`` tells the caller when to step it."""
    if schedule == "multistep":
        ms = sorted(milestones)
        fn = lambda e: gamma ** sum(e >= m for m in ms)  # noqa: E731
    elif schedule == "cosine":
        fn = lambda e: final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "cosine_steps":
        total = max(epochs * steps_per_epoch, 1)
        fn = lambda s: final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    elif schedule == "constant":
        fn = lambda e: 1.0  # noqa: E731
    else:
        raise ValueError(f"optim.schedule: unknown '{schedule}' (known: {', '.join(SCHEDULES)})")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    sched.per_step = schedule == "cosine_steps"
    return sched
