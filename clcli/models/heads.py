"""One linear head per task (SLCA's ``SimpleContinualLinear``, docs/slca_protocol.md#task-heads)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class TaskHeads(nn.Module):
    """A list of ``Linear(dim, |C_t|)`` heads whose outputs are concatenated in label order.

    New heads: weight ~ trunc_normal(std .02) (bounds ±2, effectively untruncated), bias 0. Adding a
    head freezes the older ones (stage 1 trains only the current head).

    ``scales``: one input scale per head, 1 by default; head k computes ``head_k(scales[k]·x)``.
    SLCA++ sets them on the aligned copy before evaluation (:func:`feature_scales`,
    docs/slca_protocol.md#slca-alignment-and-feature-scales); all 1 is the plain concatenation.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList()
        self.scales: list[float] = []

    def add_task(self, num_classes: int, freeze_old: bool = True) -> nn.Linear:
        if freeze_old:
            for p in self.heads.parameters():
                p.requires_grad_(False)
        head = nn.Linear(self.dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        device = next(self.parameters()).device if len(self.heads) else None
        self.heads.append(head.to(device) if device is not None else head)
        self.scales.append(1.0)
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
        if all(s == 1.0 for s in self.scales):
            return torch.cat([h(features) for h in self.heads], dim=1)
        return torch.cat([h(features * s if s != 1.0 else features) for h, s in zip(self.heads, self.scales)], dim=1)

    def copy(self) -> TaskHeads:
        """An independent deep copy (SLCA's ``backup()``)."""
        return copy.deepcopy(self)


def feature_scales(num_heads: int, mu: float) -> list[float]:
    """SLCA++'s inference-time input scales after alignment at task T = ``num_heads`` − 1: old head
    k < T gets ``1 + mu·(T − k)``, the current head 1 (docs/slca_protocol.md#slca-alignment-and-feature-scales)."""
    T = num_heads - 1
    return [1.0 + mu * (T - k) if k < T else 1.0 for k in range(num_heads)]


def heads_state(heads: TaskHeads, aligned: TaskHeads | None) -> dict:
    """The checkpoint entries of a method's stage-1 heads and their aligned copy (SLCA, the prompt
    methods): head sizes, weights, and the aligned copy's weights and input scales."""
    return {"head_sizes": [h.out_features for h in heads.heads], "heads": heads.state_dict(),
            "aligned": aligned.state_dict() if aligned is not None else None,
            "aligned_scales": list(aligned.scales) if aligned is not None else None}


def load_heads(dim: int, state: dict, device) -> tuple[TaskHeads, TaskHeads | None]:
    """The heads and aligned copy written by :func:`heads_state` (older checkpoints have no
    ``aligned_scales``: all 1), on ``device``, old heads frozen and the aligned copy without grad."""
    heads = TaskHeads(dim)
    for size in state["head_sizes"]:
        heads.add_task(size, freeze_old=True)
    heads.load_state_dict(state["heads"])
    heads.to(device)
    aligned = None
    if state["aligned"] is not None:
        aligned = heads.copy()
        aligned.load_state_dict(state["aligned"])
        aligned.requires_grad_(False)
        if state.get("aligned_scales"):
            aligned.scales = [float(v) for v in state["aligned_scales"]]
    return heads, aligned
