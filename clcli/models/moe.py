"""MoE-Adapters' mixture of adapter experts on a frozen open_clip CLIP (docs/moe_adapters.md#model).

Yu et al., "Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters",
CVPR 2024, arXiv 2403.11549. Implemented from the description in docs/moe_adapters.md; nothing is
copied from the reference code or from open_clip (the blocks' own ``attention``, ``mlp`` and norms are
called, as :mod:`clcli.models.residual_attention` does).

In every block of the adapted towers (vision and text by default), with ``a`` the stream after the
attention residual::

    a   = x + attn(ln_1(x))
    out = a + mlp(ln_2(a)) + Σ_k g_k · E_k(a)

- ``E_k(a) = scale · up(dropout(relu(down(a))))``: a bottleneck adapter expert reading the
  *un-normalised* ``a`` (down: Kaiming-uniform, up and biases zero, so the model starts as CLIP);
- ``g``: the gates of the selected task's router from token 0 of ``a`` (CLS in vision, SOT in text):
  ``h = c·W_g`` (+ ``ε·(softplus(c·W_n) + 0.01)``, ε ~ N(0, 1), in training only), the top-k of ``h``
  softmaxed over those k entries, all others 0 (:func:`top_k_gates`). Every token of a sample uses
  that sample's experts.

Experts are shared by all tasks; routers are per task (``add_task``). ``task=None`` skips every adapter:
exactly frozen CLIP (MoE-Adapters' zero-shot branch). While ``counting`` the selections of each expert
are added to ``counts`` (activate-and-freeze, docs/moe_adapters.md#activate-and-freeze).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from clcli.models.clip import ClipBackbone

__all__ = ["TOWERS", "AdapterExperts", "MoEClip", "adapter_parameter_count", "router_parameter_count", "top_k_gates",
           "top_k_routing"]

TOWERS = ("vision", "text")
NOISE_FLOOR = 0.01  # added to softplus(c·W_n): the noise never vanishes (docs/moe_adapters.md#routers)


def adapter_parameter_count(widths: dict[str, int], depths: dict[str, int], experts: int, bottleneck: int) -> int:
    """Adapter parameters of all experts: per block ``experts·(2·d·r + r + d)``.
    ViT-B/16 (vision 12×768, text 12×512), 22 experts, r 64: 43,625,472 (docs/moe_adapters.md#cost)."""
    return sum(depths[t] * experts * (2 * widths[t] * bottleneck + bottleneck + widths[t]) for t in widths)


def router_parameter_count(widths: dict[str, int], depths: dict[str, int], experts: int) -> int:
    """Router parameters per task (gate + noise matrices): ``Σ 2·d·experts`` over blocks; ViT-B/16,
    22 experts: 675,840 (docs/moe_adapters.md#cost)."""
    return sum(depths[t] * 2 * widths[t] * experts for t in widths)


def top_k_routing(c: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor | None, k: int,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates ``[N, E]`` and selected experts ``[N, k]`` of a noisy top-k router
    (docs/moe_adapters.md#routers).

    ``h = c·W_g``; with ``noise`` (standard normal ``[N, E]``, drawn by the caller in training)
    ``h += noise · (softplus(c·W_n) + 0.01)``. The top ``k`` entries of ``h`` are softmaxed, all
    others are 0: ``k`` selected experts per row whose gates sum to 1. Ties go to the lowest expert
    index (a stable sort), so evaluation routing is deterministic.
    """
    h = c @ w_gate
    if noise is not None:
        h = h + noise * (F.softplus(c @ w_noise) + NOISE_FLOOR)
    idx = torch.sort(h, dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.gather(h, 1, idx)
    return torch.zeros_like(h).scatter(1, idx, torch.softmax(top, dim=1)), idx


def top_k_gates(c: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor | None, k: int,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """The gates of :func:`top_k_routing`."""
    return top_k_routing(c, w_gate, w_noise, k, noise)[0]


class AdapterExperts(nn.Module):
    """The experts of one block: ``E_k(a) = scale · up_k(dropout(relu(down_k(a))))``.

    One ``down``/``up`` Linear pair per expert (so that an expert can be frozen on its own). down:
    PyTorch's Linear initialisation (Kaiming-uniform, a = √5), bias 0; up: weight and bias 0
    (docs/moe_adapters.md#model).
    """

    def __init__(self, width: int, experts: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(width, bottleneck) for _ in range(experts))
        self.up = nn.ModuleList(nn.Linear(bottleneck, width) for _ in range(experts))
        for d, u in zip(self.down, self.up):
            nn.init.zeros_(d.bias)
            nn.init.zeros_(u.weight)
            nn.init.zeros_(u.bias)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout)

    def __len__(self) -> int:
        return len(self.down)

    def expert(self, k: int, a: torch.Tensor) -> torch.Tensor:
        """Expert k's output for ``a`` ``[n, L, d]`` (in the adapter dtype)."""
        return self.scale * self.up[k](self.dropout(F.relu(self.down[k](a))))

    def forward(self, a: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``Σ_k g_k · E_k(a)`` for ``a`` ``[N, L, d]`` and ``gates`` ``[N, E]``; only the experts
        some sample selected run, on those samples' rows."""
        dtype = self.down[0].weight.dtype
        x = a.to(dtype)
        out = torch.zeros_like(x)
        for k in torch.nonzero(gates.any(dim=0)).flatten().tolist():
            rows = torch.nonzero(gates[:, k]).flatten()
            y = self.expert(k, x[rows]) * gates[rows, k].to(dtype).view(-1, 1, 1)
            out = out.index_add(0, rows, y)
        return out.to(a.dtype)

    def parameters_of(self, k: int) -> list[nn.Parameter]:
        return [*self.down[k].parameters(), *self.up[k].parameters()]


def _check_supported(backbone: ClipBackbone) -> None:
    from open_clip.transformer import VisionTransformer

    m = backbone.model
    problems = []
    if not isinstance(m.visual, VisionTransformer):
        problems.append(f"vision tower {type(m.visual).__name__} (need open_clip VisionTransformer)")
    for name, transformer in (("vision", getattr(m.visual, "transformer", None)), ("text", getattr(m, "transformer", None))):
        if transformer is None or not getattr(transformer, "batch_first", True):
            problems.append(f"{name} transformer is missing or not batch-first")
            continue
        block = transformer.resblocks[0]
        for attr in ("ln_1", "ln_2", "mlp", "attention", "ls_1", "ls_2"):
            if not hasattr(block, attr):
                problems.append(f"{name} block has no {attr}")
    if problems:
        raise ValueError(f"MoE-Adapters does not support backbone {backbone.model_name!r}: " + "; ".join(problems))


class MoEClip(nn.Module):
    """Frozen CLIP + adapter experts in every block of ``towers`` + per-task routers
    (docs/moe_adapters.md#model).

    Args:
        backbone: the frozen :class:`~clcli.models.clip.ClipBackbone` (a submodule, never trained).
        experts: experts per block (22); top_k: experts per sample (2); bottleneck: adapter width (64);
        scale: output multiplier (0.1); dropout: inside each expert, training only (0.1);
        towers: the adapted towers (both in MoE-Adapters).

    ``encode_image(x, task)`` / ``encode_text(tokens, task)`` with ``task=None`` are frozen CLIP. The
    router noise is drawn only while the module is in training mode. ``frozen[tower][block]`` is the
    set of frozen experts; :meth:`set_trainable` applies it.
    """

    def __init__(self, backbone: ClipBackbone, *, experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.1, towers: Iterable[str] = TOWERS) -> None:
        super().__init__()
        _check_supported(backbone)
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..experts={experts}, got {top_k}")
        m = backbone.model
        self.backbone = backbone
        self.towers = tuple(t for t in TOWERS if t in set(towers))
        self.blocks = {"vision": m.visual.transformer.resblocks, "text": m.transformer.resblocks}
        self.widths = {t: int(self.blocks[t][0].ln_2.normalized_shape[0]) for t in self.towers}
        self.depths = {t: len(self.blocks[t]) for t in self.towers}
        self.n_experts, self.top_k, self.bottleneck = int(experts), int(top_k), int(bottleneck)
        self.experts = nn.ModuleDict({
            t: nn.ModuleList(AdapterExperts(self.widths[t], experts, bottleneck, scale, dropout)
                             for _ in range(self.depths[t])) for t in self.towers})
        self.routers = nn.ModuleList()
        self.frozen: dict[str, list[set[int]]] = {t: [set() for _ in range(self.depths[t])] for t in self.towers}
        self.counts: dict[str, torch.Tensor] = {t: torch.zeros(self.depths[t], experts, dtype=torch.long)
                                                for t in self.towers}
        self.counting = False
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ tasks and bookkeeping
    @property
    def num_tasks(self) -> int:
        return len(self.routers)

    def add_task(self) -> int:
        """A new task's router: gate and noise matrices ``[d, E]`` per block, zero-initialised."""
        dev, dtype = self._device_anchor.device, self.experts[self.towers[0]][0].down[0].weight.dtype
        params = nn.ParameterDict()
        for t in self.towers:
            for i in range(self.depths[t]):
                for kind in ("gate", "noise"):
                    params[f"{t}_{i}_{kind}"] = nn.Parameter(torch.zeros(self.widths[t], self.n_experts, device=dev,
                                                                         dtype=dtype))
        self.routers.append(params)
        return len(self.routers) - 1

    def _check_task(self, task: int) -> None:
        if not 0 <= task < len(self.routers):
            raise IndexError(f"task {task} has no router ({len(self.routers)} allocated; call add_task())")

    def reset_counts(self) -> None:
        for t in self.towers:
            self.counts[t].zero_()

    def freeze_most_used(self, n: int) -> dict[str, list[list[int]]]:
        """Activate-and-freeze (docs/moe_adapters.md#activate-and-freeze): add the ``n`` most
        selected experts of every block (by ``counts``; ties: lowest index) to the frozen set.
        Returns the experts chosen now, per tower and block."""
        chosen = {}
        for t in self.towers:
            chosen[t] = []
            for i in range(self.depths[t]):
                top = torch.sort(self.counts[t][i], descending=True, stable=True).indices[:n].tolist()
                self.frozen[t][i].update(top)
                chosen[t].append(sorted(top))
        return chosen

    def expert_parameters(self, trainable_only: bool = False) -> list[nn.Parameter]:
        """Every expert's parameters, or only those of experts not frozen."""
        out = []
        for t in self.towers:
            for i, bank in enumerate(self.experts[t]):
                for k in range(len(bank)):
                    if not (trainable_only and k in self.frozen[t][i]):
                        out += bank.parameters_of(k)
        return out

    def router_parameters(self, task: int) -> list[nn.Parameter]:
        self._check_task(task)
        return list(self.routers[task].values())

    def set_trainable(self, task: int | None) -> list[nn.Parameter]:
        """``requires_grad`` for the non-frozen experts and ``task``'s router only (``None``: nothing);
        returns those parameters (what the task's optimizer gets, docs/moe_adapters.md#training)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if task is None:
            return []
        params = self.expert_parameters(trainable_only=True) + self.router_parameters(task)
        for p in params:
            p.requires_grad_(True)
        return params

    # ------------------------------------------------------------------ forward
    def _gates(self, tower: str, layer: int, task: int, c: torch.Tensor) -> torch.Tensor:
        r = self.routers[task]
        w_gate, w_noise = r[f"{tower}_{layer}_gate"], r[f"{tower}_{layer}_noise"]
        c = c.to(w_gate.dtype)
        noise = torch.randn(c.shape[0], self.n_experts, device=c.device, dtype=c.dtype) if self.training else None
        gates, idx = top_k_routing(c, w_gate, w_noise, self.top_k, noise)
        if self.counting:  # selections, not non-zero gates (a softmax gate may underflow to 0)
            self.counts[tower][layer] += torch.bincount(idx.flatten().cpu(), minlength=self.n_experts)
        return gates

    def _blocks(self, tower: str, x: torch.Tensor, mask: torch.Tensor | None, task: int | None) -> torch.Tensor:
        blocks = self.blocks[tower]
        if task is None or tower not in self.towers:
            for block in blocks:
                x = block(x, attn_mask=mask)  # open_clip's own block: frozen CLIP
            return x
        self._check_task(task)
        for i, block in enumerate(blocks):
            a = x + block.ls_1(block.attention(block.ln_1(x), attn_mask=mask))
            gates = self._gates(tower, i, task, a[:, 0])
            x = a + block.ls_2(block.mlp(block.ln_2(a))) + self.experts[tower][i](a, gates)
        return x

    def encode_image(self, images: torch.Tensor, task: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Image features ``[N, D]`` through ``task``'s router (``None``: frozen CLIP)."""
        bb = self.backbone
        x = self._blocks("vision", bb.vision_embed(images), None, task)
        x = bb.vision_pool(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, task: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Text features ``[N, D]`` through ``task``'s router (``None``: frozen CLIP); ``tokens`` may
        be truncated to the longest EOT + 1 (exact: causal tower, per-token adapters, token-0 routing)."""
        bb = self.backbone
        x, mask = bb.text_embed(tokens)
        x = bb.text_pool(self._blocks("text", x, mask, task), tokens)
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def logit_scale(self) -> float:
        return self.backbone.logit_scale

    def adapter_parameter_count(self) -> int:
        return adapter_parameter_count(self.widths, self.depths, self.n_experts, self.bottleneck)

    def router_parameter_count(self) -> int:
        return router_parameter_count(self.widths, self.depths, self.n_experts)

    def extra_repr(self) -> str:
        return (f"towers={self.towers}, experts={self.n_experts}, top_k={self.top_k}, bottleneck={self.bottleneck}, "
                f"tasks={self.num_tasks}")


def frozen_summary(frozen: dict[str, list[set[int]]]) -> dict[str, list[list[int]]]:
    """The frozen sets as sorted lists (JSON, state dicts)."""
    return {t: [sorted(s) for s in blocks] for t, blocks in frozen.items()}
