"""CLIP baselines of the MTIL tables, and the pieces every CLIP method shares.

The MTIL protocol (ZSCL; DIKI: Tang et al., "Mind the Interference", ECCV 2024, arXiv 2407.05342;
docs/diki_mtil_protocol.md#text-side-and-logits) classifies an image over the evaluated dataset's
own classes with ``logits = exp(logit_scale) · cos(image feature, text feature of the class prompt)``;
the prompt is the dataset's first template with the class name (``Task.prompts()``). There is no
classifier head: the text features of the class prompts are the classifier.

- :class:`ZeroShotCLIP` (``method=zeroshot``): frozen CLIP, predict only — the "Zero-shot" row, and
  the reference DIKI's Transfer should approach (docs/diki_mtil_protocol.md#published-numbers).
- :class:`ContinualCLIPFT` (``method=clip_ft``): the "Continual-FT" row — both encoders fine-tuned on
  each dataset in turn with CE over its classes, no protection against forgetting; epoch-based (ours)
  or ZSCL's published recipe (``optim=mtil_zscl``: 1,000 AdamW iterations at batch 64, warm-up +
  cosine, label smoothing 0.2, random resized crop, per-dataset lrs;
  docs/diki_mtil_protocol.md#continual-ft-zscl-recipe).
- The evaluation classifier follows the scenario's protocol (:meth:`PromptBank.classifier`): the
  first template, or the normalised mean of the template ensemble (:func:`ensemble_mean`;
  docs/diki_mtil_protocol.md#the-protocol-choice); DIKI and MoE-Adapters build it through their own towers.
- :class:`PromptBank`, :func:`cosine_logits`, :func:`clip_problems`, :func:`classifier_lr_problems`: shared
  with :mod:`clcli.methods.diki`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clcli import optim as optim_lib
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, fit, fit_iterations
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.models.clip import ClipBackbone

log = logging.getLogger("clcli")

def not_positive(cfg, key: str) -> bool:
    """Whether ``cfg.<key>`` is a number <= 0. Missing values and non-numbers are ``check_config``'s to
    report (``select_number``); a method's ``config_problems`` only adds what is specific to it."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - missing (???) or a broken interpolation
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0


def clip_problems(backbone: type | None, method: str) -> list[str]:
    """CLIP methods need the text tower and the tokenizer: a backbone class (``None``: unknown, not
    checked here) that is not a :class:`ClipBackbone` is refused with the fix."""
    if backbone is None or issubclass(backbone, ClipBackbone):
        return []
    return [f"method={method} needs a CLIP backbone (its prompts' text features classify): use "
            f"backbone=clip_vit_b16 or backbone=tiny_clip, got {backbone.__name__}."]


def classifier_lr_problems(optim, method: str) -> list[str]:
    """A CLIP method has no classifier head: an ``optim.lr.classifier`` would be read by nothing."""
    if "classifier" in (optim.get("lr") or {}):
        return [f"optim.lr.classifier: method={method} has no classifier head (the prompts' text features "
                "classify), so nothing reads it; remove it (~optim.lr.classifier)."]
    return []


def cosine_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · img · txtᵀ`` in float32 for L2-normalised features
    (docs/diki_mtil_protocol.md#text-side-and-logits); fp16 encoder outputs are promoted so that CE
    and argmax see the same values on every device."""
    return scale * image_features.float() @ text_features.float().T


class PromptBank:
    """The class prompts of a scenario by global label, tokenised once
    (docs/diki_mtil_protocol.md#class-names-and-prompt-templates).

    ``tokens(candidates)`` are the prompts of a contiguous label range, truncated to the longest
    prompt's EOT + 1 (exact for CLIP's causal text tower, docs/diki_mtil_protocol.md#text-side-and-logits)
    and kept on the device.
    """

    def __init__(self, backbone: ClipBackbone, scenario: Scenario):
        self.backbone = backbone
        prompts: list[str] = []
        for t in scenario.tasks:
            if t.labels.start != len(prompts):
                raise ValueError(f"task {t.name}: labels {t.labels} do not follow the previous tasks' labels")
            prompts.extend(t.prompts())
        self.prompts = prompts
        self._all = backbone.tokenize(prompts)  # [N, 77] on CPU: ~1,200 prompts for MTIL
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

        # Evaluation prompt sets (one per template) of every task whose protocol sets an ensemble.
        self._ensembles = {(t.labels.start, t.labels.stop): t.eval_prompt_sets() for t in scenario.tasks
                           if getattr(t, "eval_templates", None)}
        self._ensemble_cache: dict[tuple[int, int, str], list[torch.Tensor]] = {}

    def tokens(self, candidates: range, device: torch.device | str) -> torch.Tensor:
        """The training prompts (first template) of ``candidates``, truncated, on ``device``."""
        key = (candidates.start, candidates.stop, str(device))
        if key not in self._cache:
            rows = self._all[candidates.start : candidates.stop]
            self._cache[key] = self.backbone.truncate_tokens(rows).to(device)
        return self._cache[key]

    def ensemble(self, candidates: range) -> bool:
        """Whether ``candidates`` (one dataset's labels) are evaluated with a template ensemble."""
        return (candidates.start, candidates.stop) in self._ensembles

    def classifier(self, encode_text: Callable[[torch.Tensor], torch.Tensor], candidates: range,
                   device: torch.device | str) -> torch.Tensor:
        """The evaluation text classifier ``[C, D]`` of ``candidates`` under the scenario's protocol
        (docs/diki_mtil_protocol.md#the-protocol-choice), with any text encoder ``encode_text``
        (normalised features of token rows — a method passes its own, e.g. through its adapters):
        ``encode_text(tokens(candidates))`` for the single template; for an ensemble, every template's
        prompts are encoded and L2-normalised, averaged over the templates, and the mean re-normalised
        (ZSCL's zero-shot head). A method honours the protocol by building its classifier here."""
        sets = self.eval_token_sets(candidates, device)
        if not self.ensemble(candidates):
            return encode_text(sets[0])
        return ensemble_mean([encode_text(tok) for tok in sets])

    def eval_token_sets(self, candidates: range, device: torch.device | str) -> list[torch.Tensor]:
        """The evaluation prompts of ``candidates`` as token rows, one tensor per template (truncated,
        on ``device``): ``[tokens(candidates)]`` for the single template, every template's prompts for
        an ensemble (a method that encodes them itself combines them with :func:`ensemble_mean`)."""
        key = (candidates.start, candidates.stop)
        if key not in self._ensembles:
            return [self.tokens(candidates, device)]
        ck = (*key, str(device))
        if ck not in self._ensemble_cache:
            self._ensemble_cache[ck] = [self.backbone.truncate_tokens(self.backbone.tokenize(p)).to(device)
                                        for p in self._ensembles[key]]
        return self._ensemble_cache[ck]


def ensemble_mean(features: list[torch.Tensor]) -> torch.Tensor:
    """ZSCL's template-ensemble classifier from per-template text features ``[..., C, D]``: each
    L2-normalised (float32), averaged over the templates, the mean re-normalised
    (docs/diki_mtil_protocol.md#the-protocol-choice)."""
    feats = torch.stack([F.normalize(f.float(), dim=-1) for f in features])
    return F.normalize(feats.mean(dim=0), dim=-1)


class _PromptClassifierCLIP:
    """What the CLIP baselines share: the scenario's :class:`PromptBank`, and prediction with the
    text features of the candidates' prompts as the classifier, cached per candidate range in
    ``self._text`` (a subclass whose encoders change clears that cache). Subclasses set
    ``self.backbone``, ``self.rt``, ``self.bank = None`` and ``self._text = {}``."""

    backbone: ClipBackbone
    rt: Runtime
    bank: PromptBank | None
    _text: dict[tuple[int, int], torch.Tensor]

    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        self.bank = PromptBank(self.backbone, scenario)
        return scenario

    def begin_task(self, task: Task) -> None:
        """Nothing per task: the prompts of every dataset are tokenized once in prepare_scenario."""

    def end_task(self, task: Task) -> None:
        """Nothing after training: no statistics, no alignment (the baselines' definition)."""

    @torch.no_grad()
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        c = batch.candidates
        if (c.start, c.stop) not in self._text:
            self._text[c.start, c.stop] = self.bank.classifier(self.backbone.encode_text, c, self.rt.device)
        return cosine_logits(self.image_features(batch), self._text[c.start, c.stop], self.backbone.logit_scale)

    def image_features(self, batch: EvalBatch) -> torch.Tensor:
        """Normalised image features of an eval batch (the encoders of the subclass, as they are now)."""
        return self.backbone.encode_image(batch.images)


class ZeroShotCLIP(_PromptClassifierCLIP):
    """Frozen CLIP with the tasks' prompts: nothing is trained (the MTIL "Zero-shot" row).

    The encoders never change, so both caches are exact: text features per candidate range, and
    (``feature_cache``: memory | disk | off) each test set's image features, encoded once per run
    instead of once per stage (:class:`clcli.cache.FrozenEvalFeatures`).
    """

    def __init__(self, backbone, optim, runtime: Runtime, feature_cache: str = "memory",
                 feature_cache_dir: str | None = None):
        problems = self.config_problems(optim, type(backbone), feature_cache=feature_cache,
                                        feature_cache_dir=feature_cache_dir)
        if problems:
            raise ConfigError(problems)
        self.backbone = backbone.to(runtime.device)
        self.rt = runtime
        self.bank: PromptBank | None = None
        self._text: dict[tuple[int, int], torch.Tensor] = {}
        self.frozen = FrozenEvalFeatures(FeatureCache(feature_cache, feature_cache_dir), self.backbone, runtime)

    @staticmethod
    def config_problems(optim, backbone=None, *, feature_cache="memory", feature_cache_dir=None, **_) -> list[str]:
        """Problems of the method's keys and backbone (also run by ``clcli validate``). It trains
        nothing, so it reads nothing from ``optim``."""
        return clip_problems(backbone, "zeroshot") + feature_cache_problems(feature_cache, feature_cache_dir)

    def image_features(self, batch: EvalBatch) -> torch.Tensor:
        return self.frozen(batch)

    def train_task(self, task: Task) -> None:
        """Zero-shot CLIP learns nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """No state: the frozen backbone is rebuilt from its weights."""

    def summary(self) -> dict:
        return {"trainable_parameters": 0, "logit_scale": self.backbone.logit_scale,
                "feature_cache": self.frozen.report()}


AUGMENTS = ("none", "zscl_rrc")


def zscl_train_transform(backbone: ClipBackbone):
    """ZSCL's training augmentation (``method.augment: zscl_rrc``,
    docs/diki_mtil_protocol.md#continual-ft-zscl-recipe): ``RandomResizedCrop(size, scale=(0.9, 1.0))``
    with bicubic resampling, ``ToTensor``, the backbone's normalisation; no flip. The image is
    already RGB (:func:`clcli.data.images.load_image`)."""
    from torchvision import transforms as T

    cfg = backbone.model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else tuple(cfg["size"])
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(tuple(cfg["mean"]), tuple(cfg["std"])),
    ])


class FineTuneLoss(nn.Module):
    """Continual-FT's training loss, the module :func:`clcli.engine.fit` / :func:`~clcli.engine.fit_iterations`
    train (through DDP in a multi-process run): CE, with ``label_smoothing`` (ZSCL's recipe: 0.2), over
    the task's classes (global labels shifted by ``start``) of ``scale · cos(image, prompt text)``;
    ``scale`` defaults to the backbone's constant exp(logit_scale). The text tower is part of the model
    being fine-tuned, so the prompts are re-encoded every step
    (docs/diki_mtil_protocol.md#continual-ft-zscl-recipe)."""

    def __init__(self, backbone: ClipBackbone, tokens: torch.Tensor, start: int, scale: float | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.backbone, self.tokens, self.start = backbone, tokens, start
        self.scale = backbone.logit_scale if scale is None else scale
        self.label_smoothing = float(label_smoothing)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone.encode_image(x), self.backbone.encode_text(self.tokens), self.scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y - self.start, label_smoothing=self.label_smoothing)


def lr_by_dataset_problems(lr_by_dataset, method: str) -> list[str]:
    if lr_by_dataset is None:
        return []
    if not hasattr(lr_by_dataset, "items"):
        return [f"method.lr_by_dataset: expected a mapping dataset name -> lr (e.g. {{aircraft: 5.0e-5}}), "
                f"got {lr_by_dataset!r}."]
    return [f"method.lr_by_dataset.{k}: {method} fine-tunes that dataset with it; must be a number > 0, got {v!r}."
            for k, v in lr_by_dataset.items()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]


class ContinualCLIPFT(_PromptClassifierCLIP):
    """Continual fine-tuning of the whole CLIP, image and text encoders (the MTIL "Continual-FT" row).

    Per task: CE over the current dataset's classes with ``logit_scale · cos(image, prompt text)``,
    every encoder weight trainable (``exp(logit_scale)`` stays at the checkpoint's value), nothing
    done against forgetting; a fresh optimizer (``optim.optimizer``, AdamW) every task.

    Two schedules (docs/diki_mtil_protocol.md#continual-ft-zscl-recipe):

    - epoch-based (``optim=mtil``, clcli's own row): ``optim.epochs`` at ``optim.batch_size``;
    - ZSCL's published recipe (``optim=mtil_zscl`` with ``method.augment=zscl_rrc`` and
      ``method.lr_by_dataset``, as the ``diki/clip_ft_*`` presets set): ``optim.iterations`` = 1000
      (steps 0..1000, the loader cycled), batch 64, ``warmup_cosine`` (100 warm-up steps, cosine to 0),
      weight decay 0, ``optim.label_smoothing`` 0.2, random resized crop, lr 5e-5 for Aircraft and
      MNIST and ``optim.lr.representation`` = 1e-5 for the others.

    Args:
        lr_by_dataset: dataset name -> lr; datasets not listed use ``optim.lr.representation``.
        augment: ``none`` (the test transform, DIKI's protocol) or ``zscl_rrc`` (:func:`zscl_train_transform`).

    Precision: an fp16 backbone (``backbone.precision=fp16``, DIKI's setting) is converted to fp32
    master weights here (ZSCL trains in fp32), because pure-fp16 full fine-tuning loses small
    updates; ``precision=bf16`` (autocast) is a faster, documented deviation.
    """

    name = "clip_ft"
    # The optional optim keys this method reads (clcli.config refuses them for methods that do not).
    optim_keys = ("iterations", "label_smoothing")

    def __init__(self, backbone, optim, runtime: Runtime, lr_by_dataset: dict | None = None, augment: str = "none"):
        problems = self.ft_problems(optim, type(backbone), lr_by_dataset=lr_by_dataset, augment=augment)
        if problems:
            raise ConfigError(problems)
        if backbone.dtype != torch.float32:
            log.warning("%s: converting the %s backbone to fp32 master weights for fine-tuning", self.name, backbone.dtype)
            backbone.model.float()
            backbone.precision = "fp32"
            if isinstance(getattr(backbone, "weights_identity", None), dict):  # results.json tells the truth
                backbone.weights_identity["precision"] = f"fp32 (converted by {self.name} for fine-tuning)"
        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.lr_by_dataset = {str(k): float(v) for k, v in dict(lr_by_dataset or {}).items()}
        self.augment = augment
        self.bank: PromptBank | None = None
        self._text: dict[tuple[int, int], torch.Tensor] = {}
        self.history: list[dict] = []

    @classmethod
    def config_problems(cls, optim, backbone=None, *, lr_by_dataset=None, augment="none", **_) -> list[str]:
        """Problems of the method's backbone, learning rates and augmentation (also run by ``clcli validate``)."""
        return cls.ft_problems(optim, backbone, lr_by_dataset=lr_by_dataset, augment=augment)

    @classmethod
    def ft_problems(cls, optim, backbone=None, *, lr_by_dataset=None, augment="none") -> list[str]:
        """The fine-tuning keys' problems (shared with the methods built on this class)."""
        name = getattr(cls, "name", "clip_ft")
        problems = clip_problems(backbone, name) + classifier_lr_problems(optim, name)
        if not_positive(optim, "lr.representation"):
            problems.append(f"optim.lr.representation: {name} fine-tunes CLIP with it; must be > 0.")
        problems += lr_by_dataset_problems(lr_by_dataset, name)
        if augment not in AUGMENTS:
            problems.append(f"method.augment: expected one of {', '.join(AUGMENTS)} (zscl_rrc = ZSCL's random "
                            f"resized crop), got {augment!r}.")
        return problems

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.model.named_parameters() if n != "logit_scale"]

    def task_lr(self, task: Task) -> float:
        """``method.lr_by_dataset[task.name]``, else ``optim.lr.representation``."""
        return self.lr_by_dataset.get(task.name, float(self.optim.lr.representation))

    def make_step(self, task: Task) -> nn.Module:
        """The task's loss module: :class:`FineTuneLoss` (a subclass adds its terms)."""
        return FineTuneLoss(self.backbone, self.bank.tokens(task.labels, self.rt.device), task.labels.start,
                          self.backbone.logit_scale, self.optim.get("label_smoothing") or 0.0)

    def train_data(self, task: Task):
        return task.train.with_transform(zscl_train_transform(self.backbone)) if self.augment == "zscl_rrc" else task.train

    def train_task(self, task: Task) -> None:
        o, rt = self.optim, self.rt
        params = self._trainable()
        for p in params:
            p.requires_grad_(True)
        lr = self.task_lr(task)
        opt = optim_lib.make_optimizer(o, [(params, lr)])
        loader = rt.loader(self.train_data(task), o.batch_size, shuffle=True)
        sched = optim_lib.make_scheduler(o, opt, len(loader))
        step = self.make_step(task)
        self.begin_training(task, step)
        where = f"task {task.index} ({task.name})"
        if o.get("iterations") is not None:  # ZSCL's iteration-based task (clcli.engine.fit_iterations)
            losses = fit_iterations(step, loader, iterations=int(o.iterations), optimizer=opt, scheduler=sched, rt=rt,
                                    where=where, num_classes=task.num_classes, after_step=self.after_step)
        else:
            losses = fit(step, loader, epochs=o.epochs, optimizer=opt, scheduler=sched, rt=rt,
                         where=where, num_classes=task.num_classes)
        for p in params:
            p.requires_grad_(False)
        self._text.clear()  # the encoders changed
        self.history.append({"task": task.index, "name": task.name, "lr": lr, "train_loss": losses,
                             **self.end_training(task)})

    # Hooks for methods built on this loop (clcli.methods.zscl): before the first step, after every
    # optimizer step (iteration mode), and after the last (returns facts for the task's history).
    def begin_training(self, task: Task, step: nn.Module) -> None:
        """Nothing for plain fine-tuning."""

    def after_step(self, s: int) -> None:
        """Nothing for plain fine-tuning."""

    def end_training(self, task: Task) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"model": self.backbone.model.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.backbone.model.load_state_dict(state["model"])
        self.history = list(state["history"])
        self._text.clear()

    def summary(self) -> dict:
        o = self.optim
        return {
            "trainable_parameters": sum(p.numel() for p in self._trainable()),
            "optimizer": o.optimizer.get("_target_"),
            "schedule": {"iterations": o.get("iterations"), "epochs": None if o.get("iterations") is not None
                         else o.get("epochs"), "batch_size": o.batch_size, "schedule": o.schedule,
                         "warmup": o.get("warmup"), "label_smoothing": o.get("label_smoothing") or 0.0},
            "augment": self.augment,
            "lr_by_dataset": dict(self.lr_by_dataset),
            "tasks": self.history,
        }
