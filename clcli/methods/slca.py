"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023, arXiv 2303.05118).

One class covers the paper's rows through configuration (spec slca.md §4 "Baselines"):

- ``method=slca``: slow representation lr (1e-4) + per-class Gaussians + classifier alignment;
- ``method=slow_learner``: the same without alignment (``ca.enabled: false``);
- ``method=seq_ft``: representation lr = classifier lr, no alignment;
- ``method=frozen``: representation lr 0 (backbone frozen, features without autograd; each test set
  is encoded once per run instead of once per stage, ``feature_cache``, exact);
- ``method=joint``: every class in one task (``joint: true``), the upper bound.

Per task (spec §1): add a head and freeze the old ones; stage 1 trains the backbone and the new head
with CE over the new head's logits only; per-class statistics of the train images under the test
transform in eval mode; from task 1 on, classifier alignment trains a *copy* of all heads on sampled
features with logit normalization. The copy serves this task's evaluation only: the next task starts
from the stage-1 heads (the reference's ``backup()``/``recall()``), so alignment is never cumulative.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from clcli import optim as optim_lib
from clcli.alignment import CA_KEYS, STATS_KEYS, align, ca_config_problems, ca_mean_scale, fit_statistics, logit_norm_loss  # noqa: F401 - re-exported
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.config import select_number
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, fit
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.models.heads import TaskHeads
from clcli.stats import GaussianStats

log = logging.getLogger("clcli")

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
                 feature_cache: str = "memory", feature_cache_dir: str | None = None):
        problems = self.config_problems(optim, type(backbone), ca=ca, stats=stats, feature_cache=feature_cache,
                                        feature_cache_dir=feature_cache_dir)
        if problems:
            raise ConfigError(problems)
        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.ca, self.stats_cfg, self.joint = dict(ca), dict(stats), joint
        self.heads = TaskHeads(backbone.feature_dim).to(runtime.device)
        self.aligned: TaskHeads | None = None
        self.stats = GaussianStats(backbone.feature_dim, ridge=self.stats_cfg["ridge"])
        self.task_of: list[int] = []  # task index of every label seen so far
        self.train_backbone = float(optim.lr.representation) > 0
        self.backbone.requires_grad_(self.train_backbone)
        self.frozen: FrozenEvalFeatures | None = None
        if not self.train_backbone and feature_cache != "off":
            self.frozen = FrozenEvalFeatures(FeatureCache(feature_cache, feature_cache_dir), self.backbone,
                                             runtime, feature="forward")

    @staticmethod
    def config_problems(optim, backbone=None, *, ca=None, stats=None, feature_cache="memory", feature_cache_dir=None,
                        **_) -> list[str]:
        """Problems of SLCA's keys (``clcli validate`` and the constructor): ``ca.*`` and ``stats.*``
        (names and ranges), the classifier learning rate its heads need, the feature cache. Any
        backbone will do."""
        ca, stats = dict(ca or {}), dict(stats or {})
        # without alignment only ca.enabled is read (slow_learner, seq_ft and frozen inherit the rest)
        problems = ca_config_problems(ca, stats)
        if "classifier" not in (optim.get("lr") or {}):
            problems.append("optim.lr.classifier: SLCA trains its heads with it, but it is not set; add it "
                            "(e.g. +optim.lr.classifier=0.01).")
        else:
            select_number(optim, "lr.classifier", problems, label="optim.lr.classifier", minimum=0, strict=True)
        return problems + feature_cache_problems(feature_cache, feature_cache_dir)

    # ------------------------------------------------------------------ protocol
    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        return scenario.joint() if self.joint else scenario

    def begin_task(self, task: Task) -> None:
        self.aligned = None  # recall(): the next task starts from the stage-1 heads
        self.heads.add_task(task.num_classes, freeze_old=True)
        self.task_of.extend([task.index] * task.num_classes)

    def train_task(self, task: Task) -> None:
        """Stage 1, the slow learner (spec §4)."""
        o = self.optim
        head = self.heads.heads[-1]
        known = task.labels.start
        opt = optim_lib.make_optimizer(
            o, [(self.backbone.parameters(), float(o.lr.representation)), (head.parameters(), float(o.lr.classifier))])
        loader = self.rt.loader(task.train, o.batch_size, shuffle=True)
        sched = optim_lib.make_scheduler(o, opt, len(loader))

        def step(x, y):
            if self.train_backbone:
                f = self.backbone(x)
            else:
                with torch.no_grad():
                    f = self.backbone(x)
            return F.cross_entropy(head(f), y - known)  # CE over the new head's columns only

        def train_mode():
            self.backbone.train(self.train_backbone)

        fit(step, loader, epochs=o.epochs, optimizer=opt, scheduler=sched, rt=self.rt,
            where=f"task {task.index} ({task.name})", num_classes=task.num_classes, train_mode=train_mode,
            require_learning=True)
        self.backbone.eval()

    def end_task(self, task: Task) -> None:
        if not self.ca["enabled"]:
            return
        self._fit_statistics(task)
        if task.index > 0 and self.ca["epochs"] > 0:
            self.aligned = self._align(task)

    def predict(self, batch: EvalBatch) -> torch.Tensor:
        heads = self.aligned if self.aligned is not None else self.heads
        f = self.frozen(batch) if self.frozen is not None else self.backbone(batch.images)
        return heads(f)[:, batch.candidates.start : batch.candidates.stop]

    def summary(self) -> dict:
        return {
            "trainable_backbone_parameters": sum(p.numel() for p in self.backbone.parameters()) if self.train_backbone else 0,
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
            "head_sizes": [h.out_features for h in self.heads.heads],
            "heads": self.heads.state_dict(),
            "aligned": self.aligned.state_dict() if self.aligned is not None else None,
            "stats": self.stats.state_dict(),
            "task_of": list(self.task_of),
        }

    def load_state_dict(self, state: dict) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.heads = TaskHeads(self.backbone.feature_dim)
        for size in state["head_sizes"]:
            self.heads.add_task(size, freeze_old=True)
        self.heads.load_state_dict(state["heads"])
        self.heads.to(self.rt.device)
        self.aligned = None
        if state["aligned"] is not None:
            self.aligned = self.heads.copy()
            self.aligned.load_state_dict(state["aligned"])
            self.aligned.requires_grad_(False)
        self.stats.load_state_dict(state["stats"])
        self.task_of = list(state["task_of"])
