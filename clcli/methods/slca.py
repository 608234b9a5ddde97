"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023, arXiv 2303.05118).

One class covers the paper's rows through configuration (spec slca.md §4 "Baselines"):

- ``method=slca``: slow representation lr (1e-4) + per-class Gaussians + classifier alignment;
- ``method=slow_learner``: the same without alignment (``ca.enabled: false``);
- ``method=seq_ft``: representation lr = classifier lr, no alignment;
- ``method=frozen``: representation lr 0 (backbone frozen, features without autograd; each test set
  is encoded once per run instead of once per stage, ``feature_cache``, exact);
- ``method=joint``: every class in one task (``joint: true``), the upper bound;
- ``method=slcapp``: SLCA++ (arXiv 2408.08295; docs/slca_protocol.md#slca): the same class with
  ``lora`` (a rank-4 LoRA on every block's fused qkv; only LoRA, LayerNorms, biases and the class
  token train), ``loss.rce_weight`` (symmetric CE), ``ca.sample_shrink`` (per-sample shrink of the
  alignment samples), ``ca.feature_scale`` (input scales of old heads at evaluation) and
  ``cosine_from_milestones`` (its cosine schedule).

``probe`` (any variant): after each task a logistic-regression probe on the frozen features of all
seen classes' train images, scored on their test images (:mod:`clcli.probe`,
docs/slca_protocol.md#representation-probe).

Per task (spec §1): add a head and freeze the old ones; stage 1 trains the backbone and the new head
with CE over the new head's logits only; per-class statistics of the train images under the test
transform in eval mode; from task 1 on, classifier alignment trains a *copy* of all heads on sampled
features with logit normalization. The copy serves this task's evaluation only: the next task starts
from the stage-1 heads (the reference's ``backup()``/``recall()``), so alignment is never cumulative.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from clcli import optim as optim_lib
from clcli.alignment import (  # noqa: F401 - re-exported
    CA_KEYS,
    CA_OPTIONAL,
    STATS_KEYS,
    align,
    ca_config_problems,
    ca_mean_scale,
    fit_statistics,
    logit_norm_loss,
)
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.config import select_number
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, fit
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.models.heads import TaskHeads, feature_scales, heads_state, load_heads
from clcli.models.lora import TARGETS as LORA_TARGETS
from clcli.models.lora import add_lora, hybrid_trainable, vit_blocks
from clcli.models.vit_config import vit_config_problems
from clcli.probe import RepresentationProbe, probe_config_problems
from clcli.stats import GaussianStats

# ``method.lora`` keys (SLCA++, docs/slca_protocol.md#slca-lora-on-the-fused-qkv) and ``method.loss`` keys.
LORA_KEYS = ("rank", "scale", "targets", "svd_init", "lr_first_task", "lr")
LOSS_KEYS = ("ce_weight", "rce_weight")


def symmetric_ce(logits: torch.Tensor, targets: torch.Tensor, ce_weight: float = 1.0,
                 rce_weight: float = 0.0) -> torch.Tensor:
    """Stage-1 loss: ``ce_weight·CE + rce_weight·mean(RCE)`` with the reverse CE
    ``RCE = −Σ_k p_k·log q_k``, ``p = clamp(softmax(z), 1e-7, 1)``, ``q = clamp(onehot(y), 1e-4, 1)``,
    i.e. ``−ln(1e-4)·Σ_{k≠y} p_k`` (SLCA++'s symmetric CE, docs/slca_protocol.md#slca-symmetric-cross-entropy).
    ``rce_weight = 0`` and ``ce_weight = 1`` is plain CE (SLCA), computed as such."""
    ce = F.cross_entropy(logits, targets)
    if rce_weight == 0:
        return ce if ce_weight == 1 else ce_weight * ce
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    q = F.one_hot(targets, logits.shape[1]).to(p.dtype).clamp(min=1e-4, max=1.0)
    rce = -(p * torch.log(q)).sum(dim=1)
    return ce_weight * ce + rce_weight * rce.mean()


def cosine_floor_scheduler(opt: torch.optim.Optimizer, epochs: int, eta_min: float):
    """Cosine annealing over ``epochs`` (stepped per epoch) of every group's lr to the same absolute
    ``eta_min`` (torch's ``CosineAnnealingLR`` in closed form; SLCA++'s stage 1)."""
    def factor(lr):
        return lambda e: (eta_min + (lr - eta_min) * 0.5 * (1 + math.cos(math.pi * e / epochs))) / lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(g["lr"]) for g in opt.param_groups])
    sched.per_step = False
    return sched

log = logging.getLogger("clcli")

class Stage1Loss(torch.nn.Module):
    """SLCA's stage-1 loss, the module :func:`clcli.engine.fit` trains (through DDP in a multi-process
    run): (symmetric) CE of the new head over its own classes (global labels shifted by ``known``, the
    classes of earlier tasks) on the backbone's features; a frozen backbone runs without autograd.
    Holds the backbone and the new head only: the old heads are neither used nor trained."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, known: int, train_backbone: bool,
                 loss: dict | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.known, self.train_backbone, self.loss = known, train_backbone, dict(loss or {})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.train_backbone:
            f = self.backbone(x)
        else:
            with torch.no_grad():
                f = self.backbone(x)
        return symmetric_ce(self.head(f), y - self.known, **self.loss)  # over the new head's columns only


class SLCA:
    """Slow learner (+ optional classifier alignment) on a feature backbone with one head per task.

    ``feature_cache`` (``memory`` | ``disk`` | ``off``) applies when the backbone is frozen
    (``optim.lr.representation: 0``): its output for a test image is the same at every stage, so each
    test set is encoded once per run (or read from ``feature_cache_dir``) and served to every later
    evaluation bit for bit (:class:`clcli.cache.FrozenEvalFeatures`, keyed by the batch's test set and
    position). A trained backbone ignores it. The prediction itself never looks at the batch's task:
    the scores cover every seen class (class-incremental evaluation).
    """

    def __init__(self, backbone, optim, runtime: Runtime, ca: dict, stats: dict, joint: bool = False,
                 feature_cache: str = "memory", feature_cache_dir: str | None = None, lora: dict | None = None,
                 loss: dict | None = None, cosine_from_milestones: bool = False, probe: dict | None = None):
        problems = self.config_problems(optim, type(backbone), ca=ca, stats=stats, feature_cache=feature_cache,
                                        feature_cache_dir=feature_cache_dir, lora=lora, loss=loss,
                                        cosine_from_milestones=cosine_from_milestones, probe=probe)
        if problems:
            raise ConfigError(problems)
        self.lora = dict(lora) if lora else None
        self.loss = {"ce_weight": 1.0, "rce_weight": 0.0, **dict(loss or {})}
        self.cosine_from_milestones = bool(cosine_from_milestones)
        self.probe_cfg = dict(probe) if probe and probe.get("enabled") else None
        self.probe: RepresentationProbe | None = None
        if self.lora is not None:
            self._add_lora(backbone)
        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.ca, self.stats_cfg, self.joint = {**CA_OPTIONAL, **dict(ca)}, dict(stats), joint
        self.heads = TaskHeads(backbone.feature_dim).to(runtime.device)
        self.aligned: TaskHeads | None = None
        self.stats = GaussianStats(backbone.feature_dim, ridge=self.stats_cfg["ridge"])
        self.task_of: list[int] = []  # task index of every label seen so far
        self.train_backbone = float(optim.lr.representation) > 0 or self.lora is not None
        self.backbone.requires_grad_(self.train_backbone)
        if self.lora is not None:  # the hybrid slow learner: LoRA + LayerNorms, biases, class token
            self.lora_params, self.other_params = hybrid_trainable(self.backbone)
            if float(optim.lr.representation) == 0:
                for p in self.other_params:
                    p.requires_grad_(False)
        self.frozen: FrozenEvalFeatures | None = None
        if not self.train_backbone and feature_cache != "off":
            self.frozen = FrozenEvalFeatures(FeatureCache(feature_cache, feature_cache_dir), self.backbone,
                                             runtime, feature="forward")

    def _add_lora(self, backbone) -> None:
        """LoRA on ``lora.targets`` of every block (:func:`clcli.models.lora.add_lora`); the backbone
        must be a timm ViT (a ConfigError naming the fix otherwise)."""
        model = getattr(backbone, "model", None)
        if model is None or vit_blocks(model) is None:
            raise ConfigError([f"method.lora: LoRA goes on the attention of a ViT's blocks, but the backbone "
                               f"'{getattr(backbone, 'model_name', type(backbone).__name__)}' has none. Use a ViT "
                               "backbone (backbone=vit_b16_in21k, vit_b16_mocov3, offline_vit or tiny_vit), or drop the LoRA "
                               "(method=slca, or method.lora=null)."])
        try:
            add_lora(model, list(self.lora["targets"]), self.lora["rank"], self.lora["scale"], self.lora["svd_init"])
        except ValueError as exc:
            raise ConfigError([f"method.lora.targets: {exc}; the targets must be Linear layers of every block "
                               f"(known: {', '.join(LORA_TARGETS)})."]) from exc

    @staticmethod
    def config_problems(optim, backbone=None, *, ca=None, stats=None, feature_cache="memory", feature_cache_dir=None,
                        lora=None, loss=None, cosine_from_milestones=False, probe=None, backbone_cfg=None,
                        **_) -> list[str]:
        """Problems of SLCA's keys (``clcli validate`` and the constructor): ``ca.*`` and ``stats.*``
        (names and ranges), the classifier learning rate its heads need, the feature cache, and the
        SLCA++ keys ``lora``, ``loss``, ``cosine_from_milestones`` and the ``probe``. Any backbone will
        do, except that ``lora`` needs a timm ViT (its class and, with ``backbone_cfg``, its
        ``model_name`` in timm's registry; the built blocks are checked when LoRA is added)."""
        ca, stats = dict(ca or {}), dict(stats or {})
        # without alignment only ca.enabled is read (slow_learner, seq_ft and frozen inherit the rest)
        problems = ca_config_problems(ca, stats)
        if "classifier" not in (optim.get("lr") or {}):
            problems.append("optim.lr.classifier: SLCA trains its heads with it, but it is not set; add it "
                            "(e.g. +optim.lr.classifier=0.01).")
        else:
            select_number(optim, "lr.classifier", problems, label="optim.lr.classifier", minimum=0, strict=True)
        problems += SLCA._slcapp_problems(optim, lora, loss, cosine_from_milestones)
        if lora is not None:
            problems += vit_config_problems("slcapp", "(method.lora) puts LoRA on the attention qkv of", backbone,
                                            backbone_cfg)
        return problems + probe_config_problems(probe) + feature_cache_problems(feature_cache, feature_cache_dir)

    @staticmethod
    def _slcapp_problems(optim, lora, loss, cosine_from_milestones) -> list[str]:
        from clcli.config import dict_key_problems, number_problem

        problems = []
        if lora is not None:
            lora = dict(lora)
            problems += dict_key_problems(lora, LORA_KEYS, "method.lora")
            problems += number_problem("method.lora.rank", lora.get("rank"), minimum=1, integer=True) if "rank" in lora else []
            for key in ("scale", "lr_first_task", "lr"):
                if key in lora:
                    problems += number_problem(f"method.lora.{key}", lora[key], minimum=0)
            targets = lora.get("targets")
            if "targets" in lora and (isinstance(targets, str) or not hasattr(targets, "__len__") or not targets
                                      or any(t not in LORA_TARGETS for t in targets)):
                problems.append(f"method.lora.targets: expected a non-empty list of {', '.join(LORA_TARGETS)}, got "
                                f"{targets!r} (SLCA++: [qkv]).")
            if "svd_init" in lora and not isinstance(lora["svd_init"], bool):
                problems.append(f"method.lora.svd_init: expected true or false, got {lora['svd_init']!r}.")
        if loss is not None:
            loss = dict(loss)
            problems += dict_key_problems(loss, LOSS_KEYS, "method.loss", required=False)
            for key in LOSS_KEYS:
                if key in loss:
                    problems += number_problem(f"method.loss.{key}", loss[key], minimum=0)
        if not isinstance(cosine_from_milestones, bool):
            problems.append(f"method.cosine_from_milestones: expected true or false, got {cosine_from_milestones!r}.")
        elif cosine_from_milestones and optim.get("schedule") != "multistep":
            problems.append("method.cosine_from_milestones: true runs stage 1 on a cosine whose floor is "
                            "optim.lr.representation x optim.gamma^len(optim.milestones), so it reads a multistep "
                            f"schedule's milestones, but optim.schedule is '{optim.get('schedule')}'. Set "
                            "optim.schedule=multistep (with optim.milestones), or method.cosine_from_milestones=false.")
        return problems

    # ------------------------------------------------------------------ protocol
    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        scenario = scenario.joint() if self.joint else scenario
        if self.probe_cfg is not None:
            self.probe = RepresentationProbe(self.probe_cfg, scenario)
        return scenario

    def begin_task(self, task: Task) -> None:
        self.aligned = None  # recall(): the next task starts from the stage-1 heads
        self.heads.add_task(task.num_classes, freeze_old=True)
        self.task_of.extend([task.index] * task.num_classes)

    def train_task(self, task: Task) -> None:
        """Stage 1, the slow learner (spec §4)."""
        o = self.optim
        head = self.heads.heads[-1]
        known = task.labels.start
        opt = optim_lib.make_optimizer(o, self._stage1_groups(task, head))
        loader = self.rt.loader(task.train, o.batch_size, shuffle=True)
        sched = self._stage1_scheduler(opt, len(loader))

        def train_mode():
            self.backbone.train(self.train_backbone)

        fit(Stage1Loss(self.backbone, head, known, self.train_backbone, self.loss), loader, epochs=o.epochs, optimizer=opt,
            scheduler=sched, rt=self.rt, where=f"task {task.index} ({task.name})", num_classes=task.num_classes,
            train_mode=train_mode, require_learning=True)
        self.backbone.eval()

    def _stage1_groups(self, task: Task, head) -> list:
        """``(params, lr)`` groups of stage 1: SLCA the whole backbone at ``optim.lr.representation``;
        SLCA++ the LoRA tensors at ``lora.lr_first_task`` (task 0) / ``lora.lr`` and the other
        trainable tensors at ``optim.lr.representation``; the new head at ``optim.lr.classifier``."""
        o = self.optim
        head_group = (head.parameters(), float(o.lr.classifier))
        if self.lora is None:
            return [(self.backbone.parameters(), float(o.lr.representation)), head_group]
        lora_lr = float(self.lora["lr_first_task"] if task.index == 0 else self.lora["lr"])
        return [(self.lora_params, lora_lr), (self.other_params, float(o.lr.representation)), head_group]

    def _stage1_scheduler(self, opt, steps_per_epoch: int):
        """``optim.schedule``; with ``cosine_from_milestones`` a per-epoch cosine to the absolute floor
        ``optim.lr.representation × optim.gamma^len(optim.milestones)`` for every group (SLCA++)."""
        o = self.optim
        if not self.cosine_from_milestones:
            return optim_lib.make_scheduler(o, opt, steps_per_epoch)
        eta_min = float(o.lr.representation) * float(o.get("gamma", 0.1)) ** len(o.milestones)
        return cosine_floor_scheduler(opt, int(o.epochs), eta_min)

    def end_task(self, task: Task) -> None:
        if self.ca["enabled"]:
            self._fit_statistics(task)
            if task.index > 0 and self.ca["epochs"] > 0:
                self.aligned = self._align(task)
        if self.ca["feature_scale"] > 0 and task.index > 0:  # SLCA++: scaled old heads for this evaluation
            self.aligned = self.aligned if self.aligned is not None else self.heads.copy()
            self.aligned.scales = feature_scales(len(self.aligned.heads), float(self.ca["feature_scale"]))
            self.aligned.requires_grad_(False)
        if self.probe is not None:
            self.backbone.eval()
            self.probe.run(self.backbone, task.index, self.rt)

    def predict(self, batch: EvalBatch) -> torch.Tensor:
        heads = self.aligned if self.aligned is not None else self.heads
        f = self.frozen(batch) if self.frozen is not None else self.backbone(batch.images)
        return heads(f)[:, batch.candidates.start : batch.candidates.stop]

    def extra_results(self) -> dict:
        """What results.json gets besides the incremental classifier's: the probe's matrix and metrics."""
        return self.probe.results() if self.probe is not None else {}

    def summary(self) -> dict:
        trainable = 0
        if self.lora is not None:
            trainable = sum(p.numel() for p in self.lora_params) + sum(
                p.numel() for p in self.other_params if p.requires_grad)
        elif self.train_backbone:
            trainable = sum(p.numel() for p in self.backbone.parameters())
        return {
            "trainable_backbone_parameters": trainable,
            **({"lora_parameters": sum(p.numel() for p in self.lora_params)} if self.lora is not None else {}),
            "head_parameters": sum(p.numel() for p in self.heads.parameters()),
            "covariance_jitter": dict(self.stats.jitter),
            **({"feature_cache": self.frozen.report()} if self.frozen is not None else {}),
        }

    # ------------------------------------------------------------------ stages
    def _fit_statistics(self, task: Task) -> None:
        """Per-class mean/covariance of the task's train images, test transform, eval mode, one pass
        (:func:`clcli.alignment.fit_statistics`)."""
        self.backbone.eval()
        fit_statistics(self.stats, self.backbone, task.train_plain, self.rt, self.stats_cfg["batch_size"])

    def _align(self, task: Task) -> TaskHeads:
        """Classifier alignment of a copy of the heads (:func:`clcli.alignment.align`)."""
        return align(self.heads, self.stats, self.ca, task, self.task_of, self.rt)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "backbone": self.backbone.state_dict(),
            **heads_state(self.heads, self.aligned),
            **({"probe": self.probe.state_dict()} if self.probe is not None else {}),
            "stats": self.stats.state_dict(),
            "task_of": list(self.task_of),
        }

    def load_state_dict(self, state: dict) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.heads, self.aligned = load_heads(self.backbone.feature_dim, state, self.rt.device)
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        self.stats.load_state_dict(state["stats"])
        self.task_of = list(state["task_of"])
