"""L2P, DualPrompt and CODA-Prompt on a frozen pre-trained ViT, optionally with SLCA's classifier
alignment on the prompted features (docs/prompt_baselines.md).

One class serves the three methods (``method.kind``: ``l2p`` | ``dualprompt`` | ``coda_prompt``); what
differs is the prompt pool (:mod:`clcli.models.prompt_pools`). Per task:

- ``begin_task``: a new head (older heads frozen), the pool's task start (DualPrompt copies the
  previous E-prompt, CODA-P initialises the task's components), then, in ``train_task``, a fresh
  optimizer over the pool (``optim.lr.representation``) and the new head (``optim.lr.classifier``),
  with the global gradient norm clipped to ``method.clip_grad_norm`` where set;
- training step (:class:`PromptLoss`): the query q is the frozen model's own output on the same
  augmented image, without autograd; the prompted pass feeds the new head; loss = CE over the new
  head's classes + the pool's surrogate (pull or orthogonality) loss;
- ``end_task``: with ``method.ca.enabled``, SLCA's statistics and alignment (:mod:`clcli.alignment`)
  on the head input computed as at inference;
- ``predict``: query (cached per test set: the model is frozen) → prompts → head input → the heads'
  columns of ``batch.candidates``. No task id is used.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from clcli import optim as optim_lib
from clcli.alignment import CA_KEYS, align, ca_config_problems, fit_statistics
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.config import number_problem, select_number
from clcli.data.scenario import Scenario, Task
from clcli.engine import LossGuard, Runtime, fit
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.models.heads import TaskHeads, heads_state, load_heads
from clcli.models.prompt_pools import POOLS, PromptOutput, PromptPool
from clcli.models.prompting import encode, vit_problems
from clcli.models.vit_config import VIT_BACKBONES, vit_config_problems
from clcli.stats import GaussianStats

log = logging.getLogger("clcli")

FEATURE_PATHS = ("inference", "own_prompt")
PROMPT_CA_KEYS = (*CA_KEYS, "feature_path")


def head_input(model: nn.Module, images: torch.Tensor, out: PromptOutput, pool: PromptPool) -> torch.Tensor:
    """The prompted pass and the feature the heads read (L2P: mean of the prompt outputs, else CLS)."""
    enc = encode(model, images, out.prompts, out.prefixes, pool.layout)
    return enc.prompt_mean() if pool.head_input == "prompt_mean" else enc.cls(model)


def _plain(node):
    """A config node as plain dicts and lists (Hydra passes nested nodes as DictConfig/ListConfig)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class PromptLoss(nn.Module):
    """The training step :func:`clcli.engine.fit` runs: ``forward(x, y)`` returns the batch's mean
    CE over the new head's classes (global labels shifted by ``known``) plus the pool's surrogate
    loss. Holds the pool and the new head (the trainable parts) and the frozen backbone, whose query
    pass runs without autograd. Keeps running sums of both terms (logged per task) and the CE of the
    epoch in progress (:meth:`new_epoch`), which the collapse check reads."""

    def __init__(self, backbone: nn.Module, pool: PromptPool, head: nn.Linear, known: int, task: int, vote: bool):
        super().__init__()
        self.backbone, self.pool, self.head = backbone, pool, head
        self.known, self.task, self.vote = known, task, vote
        self.ce_sum = self.surrogate_sum = 0.0  # tensors once training runs (no device sync per step)
        self.steps = self.queries = 0
        self.epoch_ce, self.epoch_n = 0.0, 0
        self.last_epoch_ce: float | None = None

    def new_epoch(self) -> None:
        """Close the running epoch's CE mean (``last_epoch_ce``) and start the next."""
        if self.epoch_n:
            self.last_epoch_ce = float(self.epoch_ce) / self.epoch_n
        self.epoch_ce, self.epoch_n = 0.0, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the query: the unprompted frozen model, same augmented image
            q = self.backbone(x)
        out = self.pool(q, task=self.task, vote=self.vote)
        ce = F.cross_entropy(self.head(head_input(self.backbone.model, x, out, self.pool)), y - self.known)
        surrogate = out.surrogate if torch.is_tensor(out.surrogate) else ce.new_tensor(out.surrogate)
        self.ce_sum = self.ce_sum + ce.detach()
        self.surrogate_sum = self.surrogate_sum + surrogate.detach()
        self.steps, self.queries = self.steps + 1, self.queries + len(x)
        self.epoch_ce, self.epoch_n = self.epoch_ce + ce.detach() * len(x), self.epoch_n + len(x)
        return ce + surrogate

    def means(self) -> dict:
        n = max(self.steps, 1)
        return {"ce": float(self.ce_sum) / n, "surrogate": float(self.surrogate_sum) / n, "steps": self.steps,
                "query_passes": self.queries}


class PromptMethod:
    """L2P / DualPrompt / CODA-Prompt (``kind``) with one head per task and optional classifier
    alignment (``ca``). ``prompt``: the pool's keys (:mod:`clcli.models.prompt_pools`); ``batchwise``:
    where the batch-wise prompt vote runs (L2P: ``train``/``eval``, DualPrompt: ``eval``; off at
    evaluation by default, because clcli's per-task test batches would hand the vote the task id);
    ``clip_grad_norm``: global gradient-norm clipping (null: none); ``drop_last``: drop each epoch's
    last, short training batch (CODA-P's reference loader; off: every image every epoch);
    ``feature_cache``: the test-set queries are computed once per run (exact: the model is frozen,
    :class:`clcli.cache.FrozenEvalFeatures`)."""

    def __init__(self, backbone, optim, runtime: Runtime, kind: str, prompt: dict, batchwise: dict | None = None,
                 clip_grad_norm: float | None = None, ca: dict | None = None, stats: dict | None = None,
                 feature_cache: str = "memory", feature_cache_dir: str | None = None, drop_last: bool = False):
        prompt, batchwise, ca, stats = (_plain(x) for x in (prompt, batchwise, ca, stats))
        problems = self.config_problems(optim, type(backbone), kind=kind, prompt=prompt, batchwise=batchwise,
                                        clip_grad_norm=clip_grad_norm, ca=ca, stats=stats, feature_cache=feature_cache,
                                        feature_cache_dir=feature_cache_dir, drop_last=drop_last)
        if not problems:
            problems = self.backbone_problems(backbone, kind, prompt)
        if problems:
            raise ConfigError(problems)
        self.kind, self.optim, self.rt = kind, optim, runtime
        self.backbone = backbone.to(runtime.device).eval().requires_grad_(False)
        self.pool = POOLS[kind](backbone.feature_dim, **prompt).to(runtime.device)
        self.batchwise = dict(batchwise or {})
        self.clip_grad_norm, self.drop_last = clip_grad_norm, drop_last
        self.ca, self.stats_cfg = dict(ca), dict(stats)
        self.heads = TaskHeads(backbone.feature_dim).to(runtime.device)
        self.aligned: TaskHeads | None = None
        self.stats = GaussianStats(backbone.feature_dim, ridge=self.stats_cfg["ridge"])
        self.task_of: list[int] = []
        self.losses: list[dict] = []  # per task: mean CE and surrogate over its training steps
        self.eval_choices: Counter = Counter()  # prompt ids chosen at evaluation since the last task began
        self.queries = None
        if feature_cache != "off":
            self.queries = FrozenEvalFeatures(FeatureCache(feature_cache, feature_cache_dir), self.backbone, runtime,
                                              feature="forward")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def config_problems(optim, backbone=None, *, kind=None, prompt=None, batchwise=None, clip_grad_norm=None, ca=None,
                        stats=None, feature_cache="memory", feature_cache_dir=None, drop_last=False,
                        backbone_cfg=None, **_) -> list[str]:
        """Problems of the prompt methods' keys (``clcli validate`` and the constructor): ``kind``, the
        pool's ``prompt.*`` and ``batchwise.*``, ``clip_grad_norm``, ``drop_last``, ``ca.*`` / ``stats.*`` (SLCA's,
        plus ``ca.feature_path``), both learning rates, the feature cache, and a timm ViT backbone
        (its class, and with ``backbone_cfg`` its ``model_name`` in timm's registry; the built model
        is checked by :meth:`backbone_problems`)."""
        if kind not in POOLS:
            return [f"method.kind: expected one of {', '.join(POOLS)}, got {kind!r}; choose the method with "
                    "method=l2p, method=dualprompt or method=coda_prompt."]
        problems = POOLS[kind].problems(prompt, batchwise, kind)
        if clip_grad_norm is not None:
            problems += number_problem("method.clip_grad_norm", clip_grad_norm, minimum=0, strict=True)
        if not isinstance(drop_last, bool):
            problems.append(f"method.drop_last: expected true or false, got {drop_last!r} (true: drop each epoch's "
                            "last, short training batch, as CODA-P's reference loader does).")
        ca, stats = dict(ca or {}), dict(stats or {})
        problems += ca_config_problems(ca, stats, PROMPT_CA_KEYS)
        if "feature_path" in ca and ca["feature_path"] not in FEATURE_PATHS:
            problems.append(f"method.ca.feature_path: expected one of {', '.join(FEATURE_PATHS)}, got {ca['feature_path']!r}.")
        lrs = optim.get("lr") or {}
        for key, what in (("representation", "prompts"), ("classifier", "heads")):
            if key not in lrs:
                problems.append(f"optim.lr.{key}: {kind} trains its {what} with it, but it is not set; add it "
                                f"(e.g. +optim.lr.{key}=0.001).")
            else:
                select_number(optim, f"lr.{key}", problems, label=f"optim.lr.{key}", minimum=0, strict=True)
        problems += vit_config_problems(kind, "inserts prompts into", backbone, backbone_cfg)
        return problems + feature_cache_problems(feature_cache, feature_cache_dir)

    @staticmethod
    def backbone_problems(backbone, kind: str, prompt: dict) -> list[str]:
        """The built backbone: a timm ViT with a class token whose requested blocks exist and which
        keeps its pre-trained final LayerNorm."""
        model = getattr(backbone, "model", None)
        name = getattr(backbone, "model_name", type(model).__name__)
        wanted = POOLS[kind].block_keys(prompt)
        base = vit_problems(model)
        if base:
            return [f"backbone: method={kind} inserts prompts into a ViT and needs {p}; '{name}' does not qualify "
                    f"(prompts cannot be inserted into a CNN). Use {VIT_BACKBONES}." for p in base]
        depth = len(model.blocks)
        problems = [f"method.prompt.{key}: block(s) {[b for b in blocks if b >= depth]} do not exist, '{name}' has blocks "
                    f"0..{depth - 1}; choose existing blocks or a deeper ViT (e.g. backbone.model_kwargs.depth=6)."
                    for key, blocks in wanted.items() if any(b >= depth for b in blocks)]
        if not problems:
            problems += [f"backbone: method={kind} needs {p} in '{name}'."
                         for p in vit_problems(model, [b for blocks in wanted.values() for b in blocks])]
        norm = getattr(model, "norm", None)
        identity = getattr(backbone, "weights_identity", {}) or {}
        pretrained = "pretrained_tag" in identity or "file" in identity
        if pretrained and isinstance(norm, nn.LayerNorm) and norm.weight is not None and bool(
                (norm.weight == 1).all() and (norm.bias == 0).all()):
            problems.append("backbone.reinit_final_norm: the prompt methods keep the pre-trained final LayerNorm (the "
                            "query and the head input both pass through it), but it was replaced by a fresh one; set "
                            "backbone.reinit_final_norm=false.")
        return problems

    # ------------------------------------------------------------------ protocol
    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        problems = self.pool.scenario_problems(len(scenario))
        if problems:
            raise ConfigError(problems)
        return scenario

    def begin_task(self, task: Task) -> None:
        self.aligned = None  # the aligned copy served the previous task's evaluation only
        self.heads.add_task(task.num_classes, freeze_old=True)
        self.task_of.extend([task.index] * task.num_classes)
        self.pool.begin_task(task.index)
        self.eval_choices = Counter()

    def train_task(self, task: Task) -> None:
        o = self.optim
        head = self.heads.heads[-1]
        opt = optim_lib.make_optimizer(o, [(self.pool.parameters(), float(o.lr.representation)),
                                           (head.parameters(), float(o.lr.classifier))])
        if self.clip_grad_norm is not None:  # global norm over every trained tensor, before each step
            params, max_norm = [p for g in opt.param_groups for p in g["params"]], float(self.clip_grad_norm)

            def clip(*_):
                torch.nn.utils.clip_grad_norm_(params, max_norm)

            opt.register_step_pre_hook(clip)
        loader = self.rt.loader(task.train, o.batch_size, shuffle=True, drop_last=self.drop_last)
        if len(loader) == 0:  # drop_last with fewer images than one batch: nothing to train on
            raise ConfigError([f"method.drop_last: task {task.index} ({task.name}) has {len(loader.sampler)} training "
                               f"images per process, fewer than one batch of {loader.batch_size}, so every batch "
                               "would be dropped; set method.drop_last=false or a smaller optim.batch_size."])
        sched = optim_lib.make_scheduler(o, opt, len(loader))
        step = PromptLoss(self.backbone, self.pool, head, task.labels.start, task.index,
                          vote=bool(self.batchwise.get("train", False)))

        def train_mode():  # called at the start of every epoch
            self.backbone.eval()  # frozen, and its drop rates stay off
            self.pool.train()
            step.new_epoch()

        where = f"task {task.index} ({task.name})"
        history = fit(step, loader, epochs=o.epochs, optimizer=opt, scheduler=sched, rt=self.rt, where=where,
                      num_classes=task.num_classes, train_mode=train_mode)
        self.pool.eval()
        step.new_epoch()
        # the collapse check reads CE alone: the surrogate term (up to 2 lambda k) would hide a head that learned
        guard = LossGuard(where, task.num_classes, self.rt.max_loss_factor, self.rt.chance_loss_ratio)
        if step.last_epoch_ce is not None and (collapse := guard.collapse(step.last_epoch_ce, len(history))):
            self.rt.warn(collapse)
        self.losses.append({"task": task.index, **step.means()})
        log.info("task %d: mean CE %.4f, mean surrogate %.4f over %d steps", task.index, self.losses[-1]["ce"],
                 self.losses[-1]["surrogate"], self.losses[-1]["steps"])

    def end_task(self, task: Task) -> None:
        if not self.ca["enabled"]:
            return
        own = self.ca.get("feature_path", "inference") == "own_prompt"
        self.backbone.eval()
        self.pool.eval()
        fit_statistics(self.stats, lambda x: self.features(x, task=task.index if own else None), task.train_plain,
                       self.rt, self.stats_cfg["batch_size"])
        if task.index > 0 and self.ca["epochs"] > 0:
            self.aligned = align(self.heads, self.stats, self.ca, task, self.task_of, self.rt)

    def features(self, images: torch.Tensor, query: torch.Tensor | None = None, task: int | None = None,
                 record: bool = False) -> torch.Tensor:
        """The head input for ``images`` as at inference (``task=None``: no task id; a task index
        selects that task's own prompt, ``ca.feature_path=own_prompt``). ``record``: count the chosen
        prompt ids (the evaluation histogram in ``summary``)."""
        q = self.backbone(images) if query is None else query
        out = self.pool(q, task=task, vote=bool(self.batchwise.get("eval", False)))
        if record and out.chosen is not None:
            self.eval_choices.update(out.chosen.flatten().tolist())
        return head_input(self.backbone.model, images, out, self.pool)

    def predict(self, batch: EvalBatch) -> torch.Tensor:
        heads = self.aligned if self.aligned is not None else self.heads
        q = self.queries(batch) if self.queries is not None else None
        return heads(self.features(batch.images, query=q, record=True))[:, batch.candidates.start : batch.candidates.stop]

    def summary(self) -> dict:
        counts = self.pool.parameter_counts()
        out = {
            "kind": self.kind,
            "trainable_prompt_parameters": counts["total"],
            "prompt_parameters": counts,
            "head_parameters": sum(p.numel() for p in self.heads.parameters()),
            "backbone_parameters_frozen": sum(p.numel() for p in self.backbone.parameters()),
            "query_pass": {"extra_forward_passes_per_image": 1,
                           "train_images": sum(x["query_passes"] for x in self.losses),
                           **({"eval_cache": self.queries.report()} if self.queries is not None else {})},
            "training_losses": self.losses,
        }
        if self.eval_choices:
            out["eval_prompt_ids"] = {str(k): v for k, v in sorted(self.eval_choices.items())}
        if self.ca["enabled"]:
            out["covariance_jitter"] = dict(self.stats.jitter)
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "pool": self.pool.state_dict(),
            **heads_state(self.heads, self.aligned),
            "stats": self.stats.state_dict(),
            "task_of": list(self.task_of),
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint of method {state['kind']!r}, this run is {self.kind!r}")
        num_tasks = self.pool.num_tasks
        self.pool.load_state_dict(state["pool"])
        if num_tasks is not None and self.pool.num_tasks != num_tasks:
            raise ValueError(f"checkpoint for {self.pool.num_tasks} tasks, this scenario has {num_tasks}")
        self.heads, self.aligned = load_heads(self.backbone.feature_dim, state, self.rt.device)
        self.stats.load_state_dict(state["stats"])
        self.task_of = list(state["task_of"])
        self.losses = list(state["losses"])
