"""Prompts and prefixes inside a frozen timm ``VisionTransformer`` (docs/prompt_baselines.md#inserting-prompts).

Two ways to condition a frozen ViT, used by L2P, DualPrompt and CODA-Prompt:

- **prompt tuning**: extra tokens join the sequence before block 0 and pass through every block;
  ``layout`` says where: ``cls_prompts_patches`` (L2P paper: after the class token, each prompt
  token with the class token's position embedding) or ``prompts_cls_patches`` (L2P's later JAX
  configs: in front of the class token, no position embedding);
- **prefix tuning**: in a chosen block, learned keys ``P_K`` and values ``P_V`` (``[B, L, D]``) are
  split into heads and put in front of the block's *projected* keys and values, so that
  ``attn = softmax(q [P_K; K]ᵀ · scale) [P_V; V]``; the number of tokens is unchanged.

Nothing of timm's model code is copied: the embedding, the unprompted blocks and the final norm are
the model's own modules, and a prefixed block is computed from its attention module's own ``qkv``,
``q_norm``/``k_norm``, ``scale``, ``norm``, ``proj`` (and ``gate`` where present) plus the block's
residual branches (``norm1``, ``ls1``, ``drop_path1``, ``mlp``, ...). :func:`vit_problems` checks
that a model has them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("cls_prompts_patches", "prompts_cls_patches")
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "scale", "num_heads", "head_dim", "norm", "proj", "proj_drop")

Prefix = tuple[torch.Tensor, torch.Tensor]  # (P_K, P_V), each [B, L, D]


def vit_problems(model: nn.Module, prefix_blocks=()) -> list[str]:
    """What keeps ``model`` from being prompted: it must be a timm ``VisionTransformer`` with a class
    token and token pooling (the CLS output is the feature and the query), and every block in
    ``prefix_blocks`` must exist and be a standard pre-norm block with a standard attention module."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return [f"a timm VisionTransformer, got {type(model).__name__}"]
    problems = []
    if model.cls_token is None or getattr(model, "global_pool", "token") != "token":
        problems.append(f"a class token and global_pool='token' (got global_pool={model.global_pool!r})")
    depth = len(model.blocks)
    for i in sorted(set(prefix_blocks)):
        if not 0 <= i < depth:
            problems.append(f"block {i} (the model has blocks 0..{depth - 1})")
            continue
        block = model.blocks[i]
        missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
        missing += [f"attn.{p}" for p in ATTENTION_PARTS if not hasattr(getattr(block, "attn", None), p)]
        if missing:
            problems.append(f"block {i} ({type(block).__name__}) with {', '.join(missing)}")
    return problems


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
    """timm ``Attention`` over ``x [B, N, D]`` with a key/value prefix (``None``: the module's own
    forward). The prefix is split into heads like the projected keys and values and concatenated
    in front of them; it skips ``norm1``, ``qkv`` and ``k_norm`` (prefix tuning)."""
    if prefix is None:
        return attn(x)
    B, N, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = (p.reshape(B, p.shape[1], heads, hd).transpose(1, 2).to(k.dtype) for p in prefix)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, heads * hd))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prefix_block(block: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """A pre-norm ViT block whose attention takes ``prefix`` (``None``: the block's own forward)."""
    if prefix is None:
        return block(x)
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass(frozen=True)
class Encoded:
    """The prompted model's tokens after the final norm, and where the class token and the prompt
    tokens sit in them."""

    tokens: torch.Tensor  # [B, T, D]
    cls_index: int
    prompts: slice

    def cls(self, model: nn.Module) -> torch.Tensor:
        """The CLS feature as the model's own head would pool it (``fc_norm``: Identity for ViT-B)."""
        return model.fc_norm(self.tokens[:, self.cls_index])

    def prompt_mean(self) -> torch.Tensor:
        """Mean of the outputs at the prompt positions (L2P's head input)."""
        return self.tokens[:, self.prompts].mean(dim=1)


def encode(model: nn.Module, images: torch.Tensor, prompts: torch.Tensor | None = None,
           prefixes: dict[int, Prefix] | None = None, layout: str = "cls_prompts_patches") -> Encoded:
    """Run a timm ViT on ``images`` with input prompt tokens ``prompts [B, P, D]`` (prompt tuning;
    ``layout`` in :data:`LAYOUTS`) and/or ``prefixes`` {block index: (P_K, P_V)} (prefix tuning).
    Without either, the tokens equal the model's own ``forward_features``."""
    x = model.patch_drop(model._pos_embed(model.patch_embed(images)))
    n_front = model.num_prefix_tokens  # class token (+ register tokens)
    cls_index, where = 0, slice(n_front, n_front)
    if prompts is not None:
        p = prompts.shape[1]
        if layout == "cls_prompts_patches":
            cls_pos = 0 if model.no_embed_class or model.pos_embed is None else model.pos_embed[:, :1]
            x = torch.cat([x[:, :n_front], prompts.to(x.dtype) + cls_pos, x[:, n_front:]], dim=1)
            where = slice(n_front, n_front + p)
        elif layout == "prompts_cls_patches":
            x = torch.cat([prompts.to(x.dtype), x], dim=1)
            cls_index, where = p, slice(0, p)
        else:
            raise ValueError(f"unknown prompt layout {layout!r} (known: {', '.join(LAYOUTS)})")
    x = model.norm_pre(x)
    prefixes = prefixes or {}
    for i, block in enumerate(model.blocks):
        x = prefix_block(block, x, prefixes.get(i))
    return Encoded(model.norm(x), cls_index, where)
