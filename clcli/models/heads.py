"""One linear head per task (SLCA's ``SimpleContinualLinear``, docs/slca_protocol.md#task-heads)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class TaskHeads(nn.Module):
    """A list of ``Linear(dim, |C_t|)`` heads whose outputs are concatenated in label order.

    New heads: weight ~ trunc_normal(std .02) (bounds ±2, effectively untruncated), bias 0. Adding a
    head freezes the older ones (stage 1 trains only the current head).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList()

    def add_task(self, num_classes: int, freeze_old: bool = True) -> nn.Linear:
        if freeze_old:
            for p in self.heads.parameters():
                p.requires_grad_(False)
        head = nn.Linear(self.dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        device = next(self.parameters()).device if len(self.heads) else None
        self.heads.append(head.to(device) if device is not None else head)
        return head

    @property
    def num_classes(self) -> int:
        return sum(h.out_features for h in self.heads)

    def slices(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for h in self.heads:
            out.append((start, start + h.out_features))
            start += h.out_features
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(features) for h in self.heads], dim=1)

    def copy(self) -> TaskHeads:
        """An independent deep copy (SLCA's ``backup()``)."""
        return copy.deepcopy(self)
