"""DIKI's interference-free residual attention ("IKI") on a frozen open_clip CLIP.

Tang et al., "Mind the Interference: Retaining Pre-trained Knowledge in Parameter Efficient Continual
Learning of Vision-Language Models", ECCV 2024, arXiv 2407.05342. Implemented from
docs/diki_mtil_protocol.md#residual-attention (the reference repository has no license; nothing is copied from it).

Per task, each of the first ``depth`` blocks of **both** encoders owns a residual key/value pool
``[2, n_tokens, width]`` (index 0 = keys K_r, drawn U(-1, 1); 1 = values V_r, zeros). K_r and V_r live
in the already-projected key/value space (never passed through ``in_proj``) and are split across
heads like q/k/v: head h uses channels ``[h*hd, (h+1)*hd)``. For head h of such a block::

    o_h = softmax(Q_h K_hᵀ/√hd + M) V_h  +  w · softmax(Q_h K_{r,h}ᵀ/√hd) V_{r,h}
    y   = W_o · concat_h(o_h) + b_o

- the frozen branch keeps its own softmax and mask (causal for text), so the pre-trained attention
  map is untouched ("interference-free"); this is *not* prefix tuning (no joint softmax);
- the residual branch has its own softmax over the task's n_tokens keys and **no mask** (it does not
  mix tokens), and is added **before** ``out_proj`` (so ``b_o`` counts once);
- ``w`` is DIKI's calibration weight (docs/diki_mtil_protocol.md#calibration-and-task-selection): per
  sample for images, a scalar (batch mean) or per prompt for text; ``None`` means 1 (training and
  validation with the oracle task id).

Consequences the tests check: with V_r = 0 (initialisation) or w = 0 the model is frozen CLIP, and
at the first step grad(K_r) = 0 while grad(V_r) != 0 (docs/diki_mtil_protocol.md#residual-attention).

Parameter count per task: ``2·n·W_v·depth_v + 2·n·W_t·depth_t`` = 8·2·8·768 + 8·2·8·512 = 163,840 for
ViT-B/16 with depth 8 and 8 tokens (1,802,240 for the 11 MTIL tasks), see
:func:`residual_parameter_count`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clcli.models.clip import ClipBackbone

__all__ = [
    "ENCODERS",
    "DikiClip",
    "ResidualPools",
    "residual_attention",
    "residual_block_forward",
    "residual_parameter_count",
    "residual_parameter_count_from_config",
]

ENCODERS = ("vision", "text")

Weight = torch.Tensor | float | None


def residual_parameter_count(
    vision_width: int,
    text_width: int,
    depth_vision: int = 8,
    depth_text: int = 8,
    n_tokens_vision: int = 8,
    n_tokens_text: int = 8,
) -> int:
    """Trainable residual parameters per task: ``2·n_v·W_v·depth_v + 2·n_t·W_t·depth_t``.

    ViT-B/16 (W_v 768, W_t 512), depth 8, 8 tokens: 98,304 + 65,536 = 163,840
    (docs/diki_mtil_protocol.md#residual-attention).
    """
    return 2 * n_tokens_vision * vision_width * depth_vision + 2 * n_tokens_text * text_width * depth_text


def residual_parameter_count_from_config(model_cfg: Mapping, **kwargs: int) -> int:
    """:func:`residual_parameter_count` from an open_clip model config dict
    (``open_clip.get_model_config(name)``), without building the model."""
    return residual_parameter_count(int(model_cfg["vision_cfg"]["width"]), int(model_cfg["text_cfg"]["width"]), **kwargs)


class ResidualPools(nn.Module):
    """Per-task residual key/value pools for DIKI (docs/diki_mtil_protocol.md#residual-attention).

    ``tasks[t]`` is an ``nn.ParameterDict`` with one parameter ``f"{encoder}_{layer}"`` of shape
    ``[2, n_tokens, width]`` per encoder ("vision", "text") and per block ``layer < depth``. One
    parameter per (task, encoder, layer), instead of the reference's single pool tensor holding every
    task, so that only the current task's tensors reach the optimizer: with momentum, Adam or weight
    decay a shared tensor would move old tasks' slots (docs/diki_mtil_protocol.md#training).

    Initialisation (docs/diki_mtil_protocol.md#residual-attention): keys U(-1, 1) drawn from the
    global CPU generator (so a seed gives the same pools on any device), values 0 (so the model starts
    as zero-shot CLIP). ``dtype`` float32 is the recommended master copy; the reference keeps them in
    fp16 (docs/diki_mtil_protocol.md#training), cast at use either way.

    State-dict keys are ``tasks.{t}.{encoder}_{layer}``; to load a checkpoint with T tasks, call
    :meth:`add_task` T times first.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        depth_vision: int = 8,
        depth_text: int = 8,
        n_tokens_vision: int = 8,
        n_tokens_text: int = 8,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, v in dict(depth_vision=depth_vision, depth_text=depth_text).items():
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in dict(n_tokens_vision=n_tokens_vision, n_tokens_text=n_tokens_text).items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.widths = {"vision": int(vision_width), "text": int(text_width)}
        self.depths = {"vision": int(depth_vision), "text": int(depth_text)}
        self.n_tokens = {"vision": int(n_tokens_vision), "text": int(n_tokens_text)}
        self.dtype = dtype
        self.tasks = nn.ModuleList()
        # Tracks the device the module was moved to, so that add_task() creates tensors there.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def add_task(self) -> int:
        """Allocate the next task's pools (keys U(-1, 1), values 0); returns the new task index."""
        pools = nn.ParameterDict()
        for enc in ENCODERS:
            for layer in range(self.depths[enc]):
                p = torch.zeros(2, self.n_tokens[enc], self.widths[enc], dtype=torch.float32)
                p[0].uniform_(-1.0, 1.0)
                pools[f"{enc}_{layer}"] = nn.Parameter(p.to(device=self._device_anchor.device, dtype=self.dtype))
        self.tasks.append(pools)
        return len(self.tasks) - 1

    def _check_task(self, task: int) -> None:
        if not 0 <= task < len(self.tasks):
            raise IndexError(f"task {task} has no residual pools ({len(self.tasks)} allocated; call add_task())")

    def get(self, task: int, encoder: str, layer: int) -> nn.Parameter | None:
        """The [2, n_tokens, width] pool of (task, encoder, layer), or None for blocks >= depth."""
        self._check_task(task)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        return self.tasks[task][f"{encoder}_{layer}"] if layer < self.depths[encoder] else None

    def parameters_of(self, task: int) -> list[nn.Parameter]:
        """The task's parameters (what its optimizer gets)."""
        self._check_task(task)
        return list(self.tasks[task].values())

    def num_parameters_per_task(self) -> int:
        """Residual parameters per task (163,840 for ViT-B/16, depth 8, 8 tokens;
        docs/diki_mtil_protocol.md#residual-attention)."""
        return residual_parameter_count(
            self.widths["vision"], self.widths["text"], self.depths["vision"], self.depths["text"],
            self.n_tokens["vision"], self.n_tokens["text"],
        )

    def freeze_all_but(self, task: int | None) -> None:
        """``requires_grad`` True for ``task``'s pools only (``None``: freeze every pool)."""
        if task is not None:
            self._check_task(task)
        for t, pools in enumerate(self.tasks):
            for p in pools.values():
                p.requires_grad_(t == task)

    def extra_repr(self) -> str:
        return (
            f"tasks={len(self.tasks)}, widths={self.widths}, depths={self.depths}, n_tokens={self.n_tokens}, "
            f"per_task={self.num_parameters_per_task()}, dtype={self.dtype}"
        )


def _weight_factor(weight: Weight, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as a tensor broadcastable over [N, H, L, hd]: scalar -> 0-dim, [N] -> [N, 1, 1, 1]."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, device=like.device).to(like.dtype)
    if w.numel() == 1:
        return w.reshape(())
    if w.ndim == 1 and w.shape[0] == n:
        return w.view(n, 1, 1, 1)
    raise ValueError(f"weight must be a scalar or have shape [{n}] (one per sample/prompt), got {tuple(w.shape)}")


def residual_attention(
    attn: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    residual_kv: torch.Tensor | None = None,
    weight: Weight = None,
) -> torch.Tensor:
    """One DIKI attention layer (docs/diki_mtil_protocol.md#residual-attention) on an open_clip attention module.

    Reads the frozen ``attn.in_proj_weight``, ``in_proj_bias``, ``out_proj`` and ``num_heads``
    directly, which exist both on ``nn.MultiheadAttention`` (open_clip 3.0-3.3) and on open_clip's own
    ``Attention`` (dev main).

    Args:
        attn: the block's self-attention module (batch-first layout).
        x: the normalised block input ``ln_1(x)``, [N, L, D].
        attn_mask: additive mask [L, L] for the frozen branch (causal for text), or None.
        residual_kv: [2, P, D] residual keys (0) and values (1) of the selected task, or None for
            plain frozen attention.
        weight: None (= 1), a scalar, or a per-sample [N] tensor multiplying the residual branch.

    Returns:
        [N, L, D]: ``out_proj(frozen_attention + weight · residual_attention)``.
    """
    n, seq, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    # (1) frozen packed in-projection; output channels [0, D) = q, [D, 2D) = k, [2D, 3D) = v and,
    # inside each, head h owns [h*hd, (h+1)*hd) -> [3, N, H, L, hd].
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(n, seq, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    # (2) frozen branch, its own softmax and mask: the pre-trained attention map is untouched.
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    dropout_p = float(getattr(attn, "dropout", 0.0)) if attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if residual_kv is not None:
        # (3) residual branch: own softmax over the P task keys, no mask. Einsum against the shared
        # [P, H, hd] pool instead of materialising per-sample copies (docs/diki_mtil_protocol.md#exact-speed-ups).
        kr, vr = residual_kv.to(q.dtype).unbind(0)
        p = kr.shape[0]
        kr, vr = kr.view(p, heads, hd), vr.view(p, heads, hd)
        scores = torch.einsum("nhld,phd->nhlp", q, kr) * (hd ** -0.5)
        o_r = torch.einsum("nhlp,phd->nhld", scores.softmax(dim=-1), vr)
        # (4) calibration weight, broadcast over heads, tokens and channels.
        w = _weight_factor(weight, n, o_r)
        if w is not None:
            o_r = o_r * w
        o = o + o_r  # (5) before out_proj
    o = o.transpose(1, 2).reshape(n, seq, d)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)  # (6)


def residual_block_forward(
    block: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    residual_kv: torch.Tensor | None = None,
    weight: Weight = None,
) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` with :func:`residual_attention` in place of its
    attention; the residual/MLP path is unchanged (docs/diki_mtil_protocol.md#residual-attention)."""
    x = x + block.ls_1(residual_attention(block.attn, block.ln_1(x), attn_mask, residual_kv, weight))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _is_all_zero(weight: Weight) -> bool:
    if weight is None:
        return False
    if isinstance(weight, torch.Tensor):
        return bool((weight == 0).all())
    return float(weight) == 0.0


def _check_supported(backbone: ClipBackbone) -> None:
    """DIKI re-runs open_clip's block loop: require the standard CLIP layout it was written for."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    m = backbone.model
    problems = []
    if not isinstance(m, open_clip.CLIP):
        problems.append(f"model class {type(m).__name__} (need open_clip.CLIP with the built-in text tower)")
    if not isinstance(m.visual, VisionTransformer):
        problems.append(f"vision tower {type(m.visual).__name__} (need open_clip VisionTransformer)")
    for name, transformer in (("vision", getattr(m.visual, "transformer", None)), ("text", getattr(m, "transformer", None))):
        if transformer is None or not getattr(transformer, "batch_first", True):
            problems.append(f"{name} transformer is missing or not batch-first")
            continue
        attn = transformer.resblocks[0].attn
        for attr in ("in_proj_weight", "in_proj_bias", "out_proj", "num_heads"):
            if getattr(attn, attr, None) is None:
                problems.append(f"{name} attention has no {attr}")
        if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
            problems.append(f"{name} attention uses bias_k/add_zero_attn")
    if problems:
        raise ValueError(f"DIKI residual attention does not support backbone {backbone.model_name!r}: " + "; ".join(problems))


class DikiClip(nn.Module):
    """Frozen CLIP + DIKI residual pools: the model DIKI trains and evaluates
    (docs/diki_mtil_protocol.md#residual-attention).

    Args:
        backbone: the frozen :class:`~clcli.models.clip.ClipBackbone` (kept as a submodule so that
            ``.to(device)`` moves it; save ``self.pools.state_dict()`` for checkpoints).
        param_dtype: dtype of the residual parameters (fp32 master copy; reference fp16,
            docs/diki_mtil_protocol.md#training).
        **pool_sizes: keyword arguments of :class:`ResidualPools`, with its defaults:
            ``depth_vision``, ``depth_text``: number of leading blocks with residual pools (8 of 12
            in DIKI); ``n_tokens_vision``, ``n_tokens_text``: residual keys/values per block and task
            (8 in DIKI). The widths come from the backbone.

    ``encode_image``/``encode_text`` reproduce open_clip 3.3's ``VisionTransformer.forward`` and
    ``CLIP.encode_text`` (embeddings and pooling are open_clip's own code via the backbone; blocks
    ``>= depth`` are open_clip's own blocks) with the DIKI block in blocks ``< depth``.
    """

    def __init__(self, backbone: ClipBackbone, *, param_dtype: torch.dtype = torch.float32, **pool_sizes: int) -> None:
        super().__init__()
        _check_supported(backbone)
        m = backbone.model
        pools = ResidualPools(m.visual.transformer.width, m.transformer.width, dtype=param_dtype, **pool_sizes)
        for enc, blocks in (("vision", m.visual.transformer.resblocks), ("text", m.transformer.resblocks)):
            if pools.depths[enc] > len(blocks):
                raise ValueError(f"depth_{enc}={pools.depths[enc]} exceeds the {len(blocks)} blocks of "
                                 f"{backbone.model_name!r}")
        self.backbone = backbone
        self.pools = pools

    # ------------------------------------------------------------------ tasks
    @property
    def num_tasks(self) -> int:
        return self.pools.num_tasks

    def add_task(self) -> int:
        """Allocate residual pools for a new task; returns its index."""
        return self.pools.add_task()

    def residual_parameters(self, task: int) -> list[nn.Parameter]:
        """Only these go to task ``task``'s optimizer (docs/diki_mtil_protocol.md#training)."""
        return self.pools.parameters_of(task)

    @property
    def num_residual_parameters_per_task(self) -> int:
        return self.pools.num_parameters_per_task()

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the frozen CLIP (100 for OpenAI weights,
        docs/diki_mtil_protocol.md#text-side-and-logits)."""
        return self.backbone.logit_scale

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    # ------------------------------------------------------------------ encoders
    def _blocks(
        self, encoder: str, blocks: Iterable[nn.Module], x: torch.Tensor, mask: torch.Tensor | None,
        task: int | None, weight: Weight,
    ) -> torch.Tensor:
        if task is not None:
            self.pools._check_task(task)
            # w == 0 everywhere (sigmoid underflow for far-OOD batches): the residual branch contributes
            # exactly 0, so skip it and return frozen CLIP bit-exactly (docs/diki_mtil_protocol.md#exact-speed-ups).
            if _is_all_zero(weight):
                task = None
        for i, block in enumerate(blocks):
            kv = self.pools.get(task, encoder, i) if task is not None else None
            if kv is None:
                x = block(x, attn_mask=mask)  # open_clip's own block: frozen CLIP
            else:
                x = residual_block_forward(block, x, mask, kv, weight)
        return x

    def encode_image(
        self, images: torch.Tensor, task: int | None = None, weight: Weight = None, normalize: bool = True
    ) -> torch.Tensor:
        """Image features [N, D] with task ``task``'s vision residuals scaled by ``weight``.

        ``task=None`` (or ``weight`` all zeros) is frozen CLIP. ``weight``: None (= 1, training and
        validation with the oracle task), a scalar, or DIKI's per-sample calibration weights [N]
        (docs/diki_mtil_protocol.md#calibration-and-task-selection). Output L2-normalised when ``normalize``.
        """
        bb = self.backbone
        x = bb.vision_embed(images)
        x = self._blocks("vision", bb.model.visual.transformer.resblocks, x, None, task, weight)
        x = bb.vision_pool(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: torch.Tensor, task: int | None = None, weight: Weight = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text features [N, D] with task ``task``'s text residuals scaled by ``weight``.

        ``tokens`` [N, L] may be truncated with :func:`clcli.models.clip.truncate_to_eot` (exact,
        docs/diki_mtil_protocol.md#text-side-and-logits). ``weight``: None (= 1), a scalar (DIKI's
        batch-mean weight), or one weight per prompt [N]. The residual branch is unmasked; the frozen
        branch keeps the causal mask.
        """
        bb = self.backbone
        x, mask = bb.text_embed(tokens)
        x = self._blocks("text", bb.model.transformer.resblocks, x, mask, task, weight)
        x = bb.text_pool(x, tokens)
        return F.normalize(x, dim=-1) if normalize else x
