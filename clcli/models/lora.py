"""Low-rank adapters (LoRA) on a ViT's linear layers: SLCA++'s parameter-efficient slow learner
(docs/slca_protocol.md#slca-lora-on-the-fused-qkv).

A LoRA'd layer computes ``x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`` with ``A`` (r × in) and ``B`` (out × r). The
pre-trained ``W``/``b`` keep their names (``blocks.3.attn.qkv.weight``), the adapter adds
``...qkv.lora_A`` / ``...qkv.lora_B``. ``B`` starts at 0, so a fresh adapter changes nothing; with
``svd_init`` the rows of ``A`` are the top-r right singular vectors of ``W`` (SLCA++), else
trunc_normal(std .02). The scale is a fixed number (SLCA++: 0.8), not α/r.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Where a target name lives inside a timm ViT block.
TARGETS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
# A backbone tensor trains in SLCA++'s hybrid slow learner iff its name contains one of these.
HYBRID_TRAINABLE = ("norm", "bias", "cls_token", "lora")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``r`` update ``scale·B·A`` (B = 0 at start)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, svd_init: bool):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(base.weight.requires_grad)
        self.rank, self.scale = int(rank), float(scale)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=self.weight.device))
        nn.init.trunc_normal_(self.lora_A, std=0.02)
        if svd_init:
            self.svd_init_()

    @torch.no_grad()
    def svd_init_(self) -> None:
        """Rows of A ← the top-r right singular vectors of W (float64 SVD; signs are arbitrary, and
        with B = 0 they change nothing SGD does to the product B·A)."""
        _, _, vh = torch.linalg.svd(self.weight.detach().double(), full_matrices=False)
        self.lora_A.copy_(vh[: self.rank].to(self.lora_A.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale}"


def vit_blocks(model: nn.Module):
    """The transformer blocks of a timm VisionTransformer, or None for another architecture."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not hasattr(blocks[0], "attn"):
        return None
    return blocks


def add_lora(model: nn.Module, targets: list[str], rank: int, scale: float, svd_init: bool) -> list[str]:
    """Replace ``targets`` (``qkv``, ``proj``, ``fc1``, ``fc2``) in every block of the timm ViT
    ``model`` by :class:`LoRALinear` (in place) and return the names of the new LoRA tensors.
    Raises ``ValueError`` when ``model`` is not such a ViT or a target is not a ``Linear``."""
    blocks = vit_blocks(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no ViT blocks with an 'attn' module")
    for i, block in enumerate(blocks):
        for target in targets:
            parent_name, child = TARGETS[target]
            parent = getattr(block, parent_name, None)
            layer = getattr(parent, child, None)
            if type(layer) is not nn.Linear:
                raise ValueError(f"blocks.{i}.{parent_name}.{child} is {type(layer).__name__}, not a Linear layer")
            setattr(parent, child, LoRALinear(layer, rank, scale, svd_init))
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def hybrid_trainable(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """SLCA++'s hybrid slow learner: set ``requires_grad`` on exactly the tensors whose name contains
    ``norm``, ``bias``, ``cls_token`` or ``lora`` (every other tensor is frozen) and return
    ``(lora tensors, the other trainable tensors)``."""
    lora, others = [], []
    for name, p in model.named_parameters():
        trainable = any(key in name for key in HYBRID_TRAINABLE)
        p.requires_grad_(trainable)
        if trainable:
            (lora if "lora_" in name else others).append(p)
    return lora, others
