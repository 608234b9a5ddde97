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
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.config import dict_key_problems, number_problem, select_number
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, extract_features, fit
from clcli.errors import ConfigError, DivergenceError
from clcli.methods.base import EvalBatch
from clcli.models.heads import TaskHeads
from clcli.stats import GaussianStats

log = logging.getLogger("clcli")

# The keys of ``method.ca`` and ``method.stats`` SLCA reads (conf/method/slca.yaml documents them).
CA_KEYS = ("enabled", "epochs", "samples_per_class", "lr", "momentum", "weight_decay", "logit_norm_tau",
           "mean_scaling", "buggy_task_id")
STATS_KEYS = ("ridge", "batch_size")


def logit_norm_loss(logits: torch.Tensor, targets: torch.Tensor, slices: list[tuple[int, int]], tau: float) -> torch.Tensor:
    """CE on logits divided by the per-sample mean over tasks of the per-task logit L2 norm, and by
    τ (spec slca.md §5.3). τ ≤ 0 means plain CE. The divisor is positive per sample, so the argmax
    is unchanged; the gradient flows through it."""
    if tau <= 0:
        return F.cross_entropy(logits, targets)
    norms = torch.stack([logits[:, a:b].norm(p=2, dim=1) + 1e-7 for a, b in slices], dim=1).mean(1)
    return F.cross_entropy(logits / norms[:, None] / tau, targets)


def ca_mean_scale(labels: list[int], task_index: int, task_of: list[int], current_task_size: int,
                  buggy_task_id: bool) -> torch.Tensor:
    """Mean scale 0.9 + 0.1·(t_c + 1)/(T + 1) per class (spec §5.3). With ``buggy_task_id`` the
    reference's t_c = c // (size of the *current* task) is used (Cars, final task: up to 1.03)."""
    T = task_index
    t_c = [c // current_task_size if buggy_task_id else task_of[c] for c in labels]
    return torch.tensor([0.9 + 0.1 * (t + 1) / (T + 1) for t in t_c], dtype=torch.float64)


class Stage1Loss(torch.nn.Module):
    """SLCA's stage-1 loss, the module :func:`clcli.engine.fit` trains (through DDP in a multi-process
    run): CE of the new head over its own classes (global labels shifted by ``known``, the classes of
    earlier tasks) on the backbone's features; a frozen backbone runs without autograd. Holds the
    backbone and the new head only: the old heads are neither used nor trained."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, known: int, train_backbone: bool):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.known, self.train_backbone = known, train_backbone

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.train_backbone:
            f = self.backbone(x)
        else:
            with torch.no_grad():
                f = self.backbone(x)
        return F.cross_entropy(self.head(f), y - self.known)  # CE over the new head's columns only


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
        problems = dict_key_problems(ca, CA_KEYS, "method.ca", required=False)
        problems += [f"method.ca.{k}: missing; classifier alignment (method.ca.enabled) needs it."
                     for k in (CA_KEYS if ca.get("enabled", True) else ("enabled",)) if k not in ca]
        problems += dict_key_problems(stats, STATS_KEYS, "method.stats")
        for key, value, rule in (
            ("method.ca.epochs", ca.get("epochs"), dict(minimum=0, integer=True)),
            ("method.ca.samples_per_class", ca.get("samples_per_class"), dict(minimum=1, integer=True)),
            ("method.ca.lr", ca.get("lr"), dict(minimum=0, strict=True)),
            ("method.ca.momentum", ca.get("momentum"), dict(minimum=0)),
            ("method.ca.weight_decay", ca.get("weight_decay"), dict(minimum=0)),
            ("method.ca.logit_norm_tau", ca.get("logit_norm_tau"), {}),
            ("method.stats.ridge", stats.get("ridge"), dict(minimum=0, strict=True)),
            ("method.stats.batch_size", stats.get("batch_size"), dict(minimum=1, integer=True)),
        ):
            if key.rsplit(".", 1)[-1] in (ca if key.startswith("method.ca") else stats):  # missing: reported above
                problems += number_problem(key, value, **rule)
        for key in ("enabled", "mean_scaling", "buggy_task_id"):
            if key in ca and not isinstance(ca[key], bool):
                problems.append(f"method.ca.{key}: expected true or false, got {ca[key]!r}.")
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

        def train_mode():
            self.backbone.train(self.train_backbone)

        fit(Stage1Loss(self.backbone, head, known, self.train_backbone), loader, epochs=o.epochs, optimizer=opt,
            scheduler=sched, rt=self.rt, where=f"task {task.index} ({task.name})", num_classes=task.num_classes,
            train_mode=train_mode, require_learning=True)
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
        (multi-process: each rank a block of the images, sums reduced across ranks)."""
        self.backbone.eval()
        for f, y in extract_features(self.backbone, task.train_plain, self.rt, batch_size=self.stats_cfg["batch_size"],
                                     description="class statistics", shard=True):
            self.stats.update(f, y)
        self.stats.reduce()
        self.stats.finalize()

    def _align(self, task: Task) -> TaskHeads:
        """Classifier alignment on features sampled from the class Gaussians (spec §5.3). Memory: the
        stored factors plus one epoch's samples (one buffer, refilled every epoch); the shuffle gathers
        each batch through the permutation instead of copying the epoch. A non-finite loss raises :class:`DivergenceError`."""
        ca, rt = self.ca, self.rt
        aligned = self.heads.copy()
        aligned.requires_grad_(True)
        labels = list(range(task.labels.stop))
        scale = (ca_mean_scale(labels, task.index, self.task_of, task.num_classes, ca["buggy_task_id"])
                 if ca["mean_scaling"] else None)
        opt = optim_lib.sgd([(aligned.parameters(), ca["lr"])], momentum=ca["momentum"], weight_decay=ca["weight_decay"])
        sched = optim_lib.scheduler(opt, "cosine", ca["epochs"], 1)
        n, slices = ca["samples_per_class"], aligned.slices()
        x = None
        for epoch in rt.track(range(ca["epochs"]), "alignment epochs"):
            x, y = self.stats.sample(labels, n, mean_scale=scale, device=rt.device, out=x)  # one buffer, every epoch
            perm = torch.randperm(len(y)).to(x.device)  # CPU permutation as in the reference
            for i in range(len(labels)):  # C iterations of n mixed-class samples
                idx = perm[i * n : (i + 1) * n]
                loss = logit_norm_loss(aligned(x[idx]), y[idx], slices, ca["logit_norm_tau"])
                if not torch.isfinite(loss):
                    raise DivergenceError(
                        f"Classifier alignment diverged in task {task.index} ({task.name}), alignment epoch "
                        f"{epoch + 1}/{ca['epochs']}, step {i + 1}/{len(labels)}: loss = {loss.item():.4g}. The "
                        "heads are trained on features drawn from the class Gaussians, so this is a failed "
                        f"optimization, not forgetting: lower method.ca.lr (now {ca['lr']:g}), or check "
                        f"method.stats.ridge (now {self.stats.ridge:g}; a larger ridge tames near-singular "
                        "covariances). Checkpoints of finished tasks are kept."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        aligned.requires_grad_(False)
        return aligned

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
