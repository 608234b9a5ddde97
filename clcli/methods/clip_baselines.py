"""CLIP baselines of the MTIL tables, and the pieces every CLIP method shares.

The MTIL protocol (ZSCL; DIKI: Tang et al., "Mind the Interference", ECCV 2024, arXiv 2407.05342;
docs/diki_mtil_protocol.md#text-side-and-logits) classifies an image over the evaluated dataset's
own classes with ``logits = exp(logit_scale) · cos(image feature, text feature of the class prompt)``;
the prompt is the dataset's first template with the class name (``Task.prompts()``). There is no
classifier head: the text features of the class prompts are the classifier.

- :class:`ZeroShotCLIP` (``method=zeroshot``): frozen CLIP, predict only — the "Zero-shot" row, and
  the reference DIKI's Transfer should approach (docs/diki_mtil_protocol.md#published-numbers).
- :class:`ContinualCLIPFT` (``method=clip_ft``): the "Continual-FT" row — both encoders fine-tuned on
  each dataset in turn with CE over its classes, no protection against forgetting.
- :class:`PromptBank`, :func:`cosine_logits`, :func:`clip_problems`, :func:`classifier_lr_problems`: shared
  with :mod:`clcli.methods.diki`.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clcli import optim as optim_lib
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, fit
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

    def tokens(self, candidates: range, device: torch.device | str) -> torch.Tensor:
        key = (candidates.start, candidates.stop, str(device))
        if key not in self._cache:
            rows = self._all[candidates.start : candidates.stop]
            self._cache[key] = self.backbone.truncate_tokens(rows).to(device)
        return self._cache[key]


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
            self._text[c.start, c.stop] = self.backbone.encode_text(self.bank.tokens(c, self.rt.device))
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


class FineTuneLoss(torch.nn.Module):
    """Continual-FT's training loss, the module :func:`clcli.engine.fit` trains (through DDP in a
    multi-process run): CE over the task's classes (global labels shifted by ``start``) of
    ``logit_scale · cos(image, prompt text)``. The text tower is part of the model being fine-tuned,
    so the prompts are re-encoded every step; both towers' weights are used in every step
    (``exp(logit_scale)`` is a constant, not trained)."""

    def __init__(self, backbone: ClipBackbone, tokens: torch.Tensor, start: int):
        super().__init__()
        self.backbone, self.tokens, self.start = backbone, tokens, start
        self.scale = backbone.logit_scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = cosine_logits(self.backbone.encode_image(x), self.backbone.encode_text(self.tokens), self.scale)
        return F.cross_entropy(logits, y - self.start)


class ContinualCLIPFT(_PromptClassifierCLIP):
    """Continual fine-tuning of the whole CLIP, image and text encoders (the MTIL "Continual-FT" row).

    Per task: CE over the current dataset's classes with ``logit_scale · cos(image, prompt text)``,
    every encoder weight trainable (``exp(logit_scale)`` stays at the checkpoint's value), nothing
    done against forgetting. Learning rate ``optim.lr.representation`` (``conf/method/clip_ft.yaml``
    sets 1e-5), schedule, epochs and batch size from ``cfg.optim``; the optimizer is ``optim.optimizer``
    (``conf/method/clip_ft.yaml`` selects ``optim/optimizer=adamw``: PyTorch's default betas, no weight
    decay). A fresh optimizer every task.

    Precision: an fp16 backbone (``backbone.precision=fp16``, DIKI's setting) is converted to fp32
    master weights here, because pure-fp16 full fine-tuning loses small updates; use
    ``precision=bf16`` (autocast) for speed. These hyper-parameters are ours, not ZSCL's protocol.
    """

    def __init__(self, backbone, optim, runtime: Runtime):
        problems = self.config_problems(optim, type(backbone))
        if problems:
            raise ConfigError(problems)
        if backbone.dtype != torch.float32:
            log.warning("clip_ft: converting the %s backbone to fp32 master weights for fine-tuning", backbone.dtype)
            backbone.model.float()
            backbone.precision = "fp32"
            if isinstance(getattr(backbone, "weights_identity", None), dict):  # results.json tells the truth
                backbone.weights_identity["precision"] = "fp32 (converted by clip_ft for fine-tuning)"
        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.bank: PromptBank | None = None
        self._text: dict[tuple[int, int], torch.Tensor] = {}
        self.history: list[dict] = []

    @staticmethod
    def config_problems(optim, backbone=None, **_) -> list[str]:
        """Problems of the method's backbone and learning rates (also run by ``clcli validate``)."""
        problems = clip_problems(backbone, "clip_ft") + classifier_lr_problems(optim, "clip_ft")
        if not_positive(optim, "lr.representation"):
            problems.append("optim.lr.representation: clip_ft fine-tunes CLIP with it; must be > 0.")
        return problems

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.model.named_parameters() if n != "logit_scale"]

    def train_task(self, task: Task) -> None:
        o, rt = self.optim, self.rt
        params = self._trainable()
        for p in params:
            p.requires_grad_(True)
        opt = optim_lib.make_optimizer(o, [(params, float(o.lr.representation))])
        loader = rt.loader(task.train, o.batch_size, shuffle=True)
        sched = optim_lib.make_scheduler(o, opt, len(loader))
        loss = FineTuneLoss(self.backbone, self.bank.tokens(task.labels, rt.device), task.labels.start)
        losses = fit(loss, loader, epochs=o.epochs, optimizer=opt, scheduler=sched, rt=rt,
                     where=f"task {task.index} ({task.name})", num_classes=task.num_classes)
        for p in params:
            p.requires_grad_(False)
        self._text.clear()  # the encoders changed
        self.history.append({"task": task.index, "name": task.name, "train_loss": losses})

    def state_dict(self) -> dict:
        return {"model": self.backbone.model.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.backbone.model.load_state_dict(state["model"])
        self.history = list(state["history"])
        self._text.clear()

    def summary(self) -> dict:
        return {
            "trainable_parameters": sum(p.numel() for p in self._trainable()),
            "optimizer": self.optim.optimizer.get("_target_"),
            "tasks": self.history,
        }
