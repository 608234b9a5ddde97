"""The learnable prompts of L2P, DualPrompt and CODA-Prompt and how a query picks or composes them
(docs/prompt_baselines.md#l2p, #dualprompt, #coda-prompt).

Each pool maps the query ``q [B, D]`` (the frozen model's CLS output) to a :class:`PromptOutput`: input
prompt tokens and/or per-block prefixes for :func:`clcli.models.prompting.encode`, the method's
surrogate loss and the ids it selected. ``task`` is the task being trained (DualPrompt selects its
E-prompt by it, CODA-P detaches the finished tasks' components) or ``None`` at inference, where no
task id is used. Each pool owns its config keys (``method.prompt.*``): :meth:`PromptPool.problems`.

"Length" is the number of key tokens, which equals the number of value tokens, for every prefix here
(the L2P/DualPrompt convention); CODA's own repository counts both (its 8 is ``length: 4`` here).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from clcli.config import dict_key_problems, number_problem
from clcli.models.prompting import LAYOUTS, Prefix

INSERTIONS = ("prompt_tuning", "prefix")
HEAD_INPUTS = ("prompt_mean", "cls")
CODA_INITS = ("per_task", "upfront")


@dataclass
class PromptOutput:
    """What a pool hands to the prompted forward pass (and the loss)."""

    prompts: torch.Tensor | None = None  # [B, P, D] input tokens (prompt tuning)
    prefixes: dict[int, Prefix] = field(default_factory=dict)  # block -> (P_K, P_V), each [B, L, D]
    surrogate: torch.Tensor | float = 0.0  # added to the CE loss while training
    chosen: torch.Tensor | None = None  # [B, k] selected pool ids (selection methods)


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` cosine similarities of queries and keys (both L2-normalised with eps 1e-12)."""
    return F.normalize(q, dim=-1, eps=1e-12) @ F.normalize(keys, dim=-1, eps=1e-12).T


def batch_vote(ids: torch.Tensor, k: int, pool_size: int) -> torch.Tensor:
    """The ``k`` ids chosen most often over the batch's per-sample selections ``ids [B, k']``; ties go
    to the lowest id (docs/prompt_baselines.md#batch-wise-vote)."""
    counts = torch.bincount(ids.flatten(), minlength=pool_size)
    return torch.sort(counts, descending=True, stable=True).indices[:k]


# ------------------------------------------------------------------------------------------- key checks
def _value_problems(prompt: dict, rules: dict, where: str = "method.prompt") -> list[str]:
    """``rules``: key -> a tuple of allowed strings, or one of ``count`` (int >= 1), ``size`` (int >= 0),
    ``blocks`` (list of distinct ints >= 0), ``range`` ([low, high], low < high), ``weight`` (number
    >= 0), ``bool``."""
    problems = []
    for key, rule in rules.items():
        if key not in prompt:
            continue  # reported as missing
        v, name = prompt[key], f"{where}.{key}"
        if isinstance(rule, tuple):
            if v not in rule:
                problems.append(f"{name}: expected one of {', '.join(rule)}, got {v!r}.")
        elif rule in ("count", "size"):
            problems += number_problem(name, v, minimum=1 if rule == "count" else 0, integer=True)
        elif rule == "weight":
            problems += number_problem(name, v, minimum=0)
        elif rule == "bool":
            if not isinstance(v, bool):
                problems.append(f"{name}: expected true or false, got {v!r}.")
        elif rule == "blocks":
            if not isinstance(v, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in v) \
                    or len(set(v)) != len(v):
                problems.append(f"{name}: expected a list of distinct block indices >= 0 (e.g. [0, 1]), got {v!r}.")
        elif rule == "range":
            ok = isinstance(v, (list, tuple)) and len(v) == 2 and not number_problem(name, v[0]) \
                and not number_problem(name, v[1]) and v[0] < v[1]
            if not ok:
                problems.append(f"{name}: expected [low, high] with low < high (uniform init), got {v!r}.")
    return problems


def _batchwise_problems(batchwise, known: tuple[str, ...], method: str) -> list[str]:
    if not known:
        if batchwise:
            return [f"method.batchwise: {method} composes its prompts per sample and has no batch-wise vote; "
                    "remove the key (~method.batchwise)."]
        return []
    if not hasattr(batchwise, "keys"):
        return [f"method.batchwise: expected {{{', '.join(f'{k}: bool' for k in known)}}}, got {batchwise!r}."]
    problems = dict_key_problems(batchwise, known, "method.batchwise")
    return problems + [f"method.batchwise.{k}: expected true or false, got {batchwise[k]!r}."
                       for k in known if k in batchwise and not isinstance(batchwise[k], bool)]


# ------------------------------------------------------------------------------------------- pools
class PromptPool(nn.Module, abc.ABC):
    """Common bookkeeping: ``tasks_begun`` (saved with the parameters, ``get_extra_state``) and the
    scenario's task count."""

    RULES: dict = {}
    BATCHWISE: tuple[str, ...] = ()
    layout = "cls_prompts_patches"
    head_input = "cls"

    def __init__(self):
        super().__init__()
        self.tasks_begun = 0
        self.num_tasks: int | None = None

    @classmethod
    def problems(cls, prompt, batchwise, method: str) -> list[str]:
        prompt = dict(prompt or {})
        return (dict_key_problems(prompt, cls.RULES, "method.prompt") + _value_problems(prompt, cls.RULES)
                + _batchwise_problems(batchwise, cls.BATCHWISE, method) + cls._cross_problems(prompt))

    @classmethod
    def _cross_problems(cls, prompt: dict) -> list[str]:
        return []

    @staticmethod
    def block_keys(prompt: dict) -> dict[str, list[int]]:
        """The prefix blocks each ``method.prompt`` key asks for (checked against the backbone)."""
        return {}

    def scenario_problems(self, num_tasks: int) -> list[str]:
        self.num_tasks = num_tasks
        return []

    def begin_task(self, t: int) -> None:
        self.tasks_begun = t + 1

    def get_extra_state(self) -> dict:
        return {"tasks_begun": self.tasks_begun, "num_tasks": self.num_tasks}

    def set_extra_state(self, state: dict) -> None:
        self.tasks_begun, self.num_tasks = int(state["tasks_begun"]), state["num_tasks"]

    @abc.abstractmethod
    def parameter_counts(self) -> dict[str, int]:
        """Trainable prompt parameters by kind (``method_summary``): each pool counts its own."""


def _uniform(shape, low: float, high: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(low, high))


class L2PPool(PromptPool):
    """L2P: a shared pool of ``pool_size`` prompts with one key each; every sample takes the
    ``top_k`` prompts whose keys are closest to its query (or the batch's majority vote). The pull loss
    λ·mean_b Σ_j (1 − cos(q_b, k_j)) over the used keys moves the keys only (selection is not
    differentiable); the prompts learn from CE. Nothing is frozen between tasks."""

    RULES = {"insertion": INSERTIONS, "layout": LAYOUTS, "layers": "blocks", "pool_size": "count", "length": "size",
             "top_k": "count", "init": "range", "head_input": HEAD_INPUTS, "pull_weight": "weight"}
    BATCHWISE = ("train", "eval")

    def __init__(self, dim: int, insertion: str, layout: str, layers, pool_size: int, length: int, top_k: int, init,
                 head_input: str, pull_weight: float):
        super().__init__()
        self.insertion, self.layout, self.head_input = insertion, layout, head_input
        self.layers = list(layers) if insertion == "prefix" else []
        self.pool_size, self.length, self.top_k, self.pull_weight = pool_size, length, top_k, float(pull_weight)
        shape = (pool_size, length, dim) if insertion == "prompt_tuning" else (pool_size, len(self.layers), 2, length, dim)
        self.prompts = _uniform(shape, *init)
        self.keys = _uniform((pool_size, dim), *init)

    @classmethod
    def _cross_problems(cls, p: dict) -> list[str]:
        out = []
        if isinstance(p.get("top_k"), int) and isinstance(p.get("pool_size"), int) and p["top_k"] > p["pool_size"]:
            out.append(f"method.prompt.top_k={p['top_k']} exceeds method.prompt.pool_size={p['pool_size']}.")
        if p.get("head_input") == "prompt_mean" and p.get("insertion") == "prefix":
            out.append("method.prompt.head_input=prompt_mean needs prompt tokens in the sequence "
                       "(method.prompt.insertion=prompt_tuning); prefix tuning (L2P++) reads the CLS output: "
                       "set method.prompt.head_input=cls.")
        if p.get("head_input") == "prompt_mean" and p.get("length") == 0:
            out.append("method.prompt.head_input=prompt_mean averages the prompt outputs, but method.prompt.length=0.")
        if p.get("insertion") == "prefix" and not p.get("layers"):
            out.append("method.prompt.layers: prefix tuning needs at least one block (e.g. [0]).")
        return out

    @staticmethod
    def block_keys(prompt: dict) -> dict[str, list[int]]:
        return {"layers": list(prompt.get("layers") or [])} if prompt.get("insertion") == "prefix" else {}

    def forward(self, q: torch.Tensor, task: int | None = None, vote: bool = False) -> PromptOutput:
        B = q.shape[0]
        sim = cosine(q, self.keys)
        ids = sim.detach().topk(self.top_k, dim=1).indices
        if vote:
            ids = batch_vote(ids, self.top_k, self.pool_size).expand(B, -1)
        pull = self.pull_weight * (1 - sim.gather(1, ids)).sum(1).mean()
        chosen = self.prompts[ids]  # [B, k, L, D] or [B, k, layers, 2, L, D]
        if self.insertion == "prompt_tuning":
            return PromptOutput(prompts=chosen.flatten(1, 2), surrogate=pull, chosen=ids)
        prefixes = {b: (chosen[:, :, j, 0].flatten(1, 2), chosen[:, :, j, 1].flatten(1, 2))
                    for j, b in enumerate(self.layers)}
        return PromptOutput(prefixes=prefixes, surrogate=pull, chosen=ids)

    def parameter_counts(self) -> dict[str, int]:
        p, k = self.prompts.numel(), self.keys.numel()
        return {"prompts": p, "keys": k, "total": p + k, "trained_per_task": p + k}


class DualPromptPool(PromptPool):
    """DualPrompt: a G-prompt (prefix in ``g_layers``) shared by all tasks and trained in every task, and
    an E-prompt pool (prefix in ``e_layers``) with one entry and one key per task. Training task t uses
    E-prompt t (``task_id_at_train``) and pulls key t only; inference takes the entry whose key is
    closest to the query. At the start of task t ≥ 1 E-prompt t starts as a copy of E-prompt t−1
    (``copy_previous``); finished entries and keys get no gradient, so Adam leaves them unchanged."""

    RULES = {"g_layers": "blocks", "g_length": "size", "e_layers": "blocks", "e_length": "size", "pool_size": "count",
             "init": "range", "pull_weight": "weight", "copy_previous": "bool", "task_id_at_train": "bool",
             "restrict_to_seen": "bool"}
    BATCHWISE = ("eval",)

    def __init__(self, dim: int, g_layers, g_length: int, e_layers, e_length: int, pool_size: int, init,
                 pull_weight: float, copy_previous: bool, task_id_at_train: bool, restrict_to_seen: bool):
        super().__init__()
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        self.pool_size, self.pull_weight = pool_size, float(pull_weight)
        self.copy_previous, self.task_id_at_train, self.restrict_to_seen = copy_previous, task_id_at_train, restrict_to_seen
        self.g = _uniform((len(self.g_layers), 2, g_length, dim), *init)
        self.e = _uniform((pool_size, len(self.e_layers), 2, e_length, dim), *init)
        self.keys = _uniform((pool_size, dim), *init)

    @staticmethod
    def block_keys(prompt: dict) -> dict[str, list[int]]:
        return {"g_layers": list(prompt.get("g_layers") or []), "e_layers": list(prompt.get("e_layers") or [])}

    def scenario_problems(self, num_tasks: int) -> list[str]:
        super().scenario_problems(num_tasks)
        if num_tasks > self.pool_size:
            return [f"method.prompt.pool_size={self.pool_size}: DualPrompt needs one E-prompt per task, and the "
                    f"scenario has {num_tasks} tasks; set method.prompt.pool_size={num_tasks} (or more)."]
        return []

    def begin_task(self, t: int) -> None:
        if t >= self.pool_size:
            raise ValueError(f"DualPrompt: task {t} has no E-prompt (method.prompt.pool_size={self.pool_size})")
        super().begin_task(t)
        if t > 0 and self.copy_previous:
            with torch.no_grad():
                self.e[t].copy_(self.e[t - 1])

    def select(self, q: torch.Tensor, task: int | None, vote: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B], cos(q, keys) [B, M]): the task's entry while training it, else the closest key."""
        sim = cosine(q, self.keys)
        if task is not None and self.task_id_at_train:
            return torch.full((q.shape[0],), task, dtype=torch.long, device=q.device), sim
        s = sim.detach()
        if self.restrict_to_seen and self.tasks_begun < self.pool_size:
            s = s.clone()
            s[:, max(self.tasks_begun, 1):] = -math.inf
        ids = s.argmax(dim=1)
        if vote:
            ids = batch_vote(ids, 1, self.pool_size).expand(q.shape[0])
        return ids, sim

    def forward(self, q: torch.Tensor, task: int | None = None, vote: bool = False) -> PromptOutput:
        B = q.shape[0]
        ids, sim = self.select(q, task, vote)
        pull = self.pull_weight * (1 - sim.gather(1, ids[:, None])).mean()
        prefixes: dict[int, Prefix] = {}
        for j, b in enumerate(self.g_layers):
            prefixes[b] = (self.g[j, 0].expand(B, -1, -1), self.g[j, 1].expand(B, -1, -1))
        chosen = self.e[ids]  # [B, e_layers, 2, L, D]
        for j, b in enumerate(self.e_layers):
            pk, pv = chosen[:, j, 0], chosen[:, j, 1]
            if b in prefixes:  # a block in both lists: G then E
                pk, pv = torch.cat([prefixes[b][0], pk], 1), torch.cat([prefixes[b][1], pv], 1)
            prefixes[b] = (pk, pv)
        return PromptOutput(prefixes=prefixes, surrogate=pull, chosen=ids[:, None])

    def parameter_counts(self) -> dict[str, int]:
        g, e, k = self.g.numel(), self.e.numel(), self.keys.numel()
        return {"g_prompt": g, "e_prompts": e, "keys": k, "total": g + e + k,
                "trained_per_task": g + e // self.pool_size + k // self.pool_size}


def gram_schmidt_rows(old: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` new unit rows: Gaussian vectors, one classical Gram–Schmidt pass against the rows of
    ``old [m, d]`` (not necessarily orthonormal) and against each other, then unit norm (float64)."""
    d = old.shape[1]
    basis = [u for u in old.to(torch.float64) if float(u @ u) > 0]
    new = []
    for v in torch.randn(n, d, dtype=torch.float64, generator=generator):
        w = v.clone()
        for u in basis:  # classical: every projection uses the original vector
            w -= (v @ u) / (u @ u) * u
        basis.append(w)
        new.append(w / w.norm())
    return torch.stack(new)


class CodaPool(PromptPool):
    """CODA-Prompt: per prefixed block, ``pool_size`` components P_m (key and value tokens), keys K_m and
    attention vectors A_m. A query composes p = Σ_m α_m P_m with α_m = cos(q ⊙ A_m, K_m) (no top-k, no
    softmax), over the components of the tasks so far; task t owns rows [tc, (t+1)c), c = M/T. While
    training task t the older rows are detached. Everything learns through CE (+ the optional
    orthogonality penalty). ``init: per_task`` (the authors' current code): each task's rows are
    rebuilt by Gram–Schmidt at its start, the rest stay zero; ``upfront`` (paper-era code): the whole
    pool is orthogonally initialised at construction."""

    RULES = {"layers": "blocks", "pool_size": "count", "length": "size", "ortho_weight": "weight", "init": CODA_INITS}

    def __init__(self, dim: int, layers, pool_size: int, length: int, ortho_weight: float, init: str):
        super().__init__()
        self.layers, self.pool_size, self.length = list(layers), pool_size, length
        self.ortho_weight, self.init = float(ortho_weight), init
        n = len(self.layers)
        self.components = nn.Parameter(torch.zeros(n, pool_size, 2, length, dim))
        self.keys = nn.Parameter(torch.zeros(n, pool_size, dim))
        self.attention = nn.Parameter(torch.zeros(n, pool_size, dim))
        if init == "upfront":
            with torch.no_grad():
                for t in (self.components, self.keys, self.attention):
                    for j in range(n):
                        nn.init.orthogonal_(t[j].view(pool_size, -1))

    @staticmethod
    def block_keys(prompt: dict) -> dict[str, list[int]]:
        return {"layers": list(prompt.get("layers") or [])}

    @property
    def per_task(self) -> int:
        return self.pool_size // (self.num_tasks or 1)

    def scenario_problems(self, num_tasks: int) -> list[str]:
        super().scenario_problems(num_tasks)
        if self.pool_size % num_tasks:
            return [f"method.prompt.pool_size={self.pool_size}: CODA-P gives every task pool_size/T components, so "
                    f"it must be a multiple of the {num_tasks} tasks (e.g. {10 * num_tasks})."]
        return []

    def begin_task(self, t: int) -> None:
        super().begin_task(t)
        if self.init != "per_task":
            return
        c = self.per_task
        with torch.no_grad():  # in place: the optimizer is built after this
            for tensor in (self.components, self.keys, self.attention):
                for j in range(len(self.layers)):
                    flat = tensor[j].view(self.pool_size, -1)
                    flat[t * c : (t + 1) * c] = gram_schmidt_rows(flat[: t * c], c).to(flat)

    def _rows(self, tensor: torch.Tensor, j: int, n_old: int, n: int, detach: bool) -> torch.Tensor:
        if not detach:
            return tensor[j, :n]
        return torch.cat([tensor[j, :n_old].detach(), tensor[j, n_old:n]])

    def forward(self, q: torch.Tensor, task: int | None = None, vote: bool = False) -> PromptOutput:
        t = task if task is not None else self.tasks_begun - 1
        c = self.per_task
        n_old, n = t * c, (t + 1) * c
        prefixes, ortho = {}, q.new_zeros(())
        for j, b in enumerate(self.layers):
            P, K, A = (self._rows(x, j, n_old, n, task is not None) for x in (self.components, self.keys, self.attention))
            alpha = torch.einsum("bmd,md->bm", F.normalize(q[:, None] * A[None], dim=-1, eps=1e-12),
                                 F.normalize(K, dim=-1, eps=1e-12))
            p = torch.einsum("bm,mkld->bkld", alpha, P)  # [B, 2, L, D]
            prefixes[b] = (p[:, 0], p[:, 1])
            if self.ortho_weight > 0 and task is not None:
                ortho = ortho + sum(_ortho(x.reshape(n, -1)) for x in (K, A, P))
        return PromptOutput(prefixes=prefixes, surrogate=self.ortho_weight * ortho if self.ortho_weight > 0 else 0.0)

    def parameter_counts(self) -> dict[str, int]:
        p, k, a = self.components.numel(), self.keys.numel(), self.attention.numel()
        return {"components": p, "keys": k, "attention": a, "total": p + k + a,
                "trained_per_task": (p + k + a) // self.pool_size * self.per_task}


def _ortho(x: torch.Tensor) -> torch.Tensor:
    """mean((X Xᵀ − I)²), CODA's orthogonality penalty on the rows in use."""
    return ((x @ x.T - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)) ** 2).mean()


POOLS: dict[str, type[PromptPool]] = {"l2p": L2PPool, "dualprompt": DualPromptPool, "coda_prompt": CodaPool}
