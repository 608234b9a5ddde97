"""MoE-Adapters: mixture-of-experts adapters with per-task routers on a frozen CLIP, for MTIL.

Yu et al., "Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters",
CVPR 2024, arXiv 2403.11549. Implemented from docs/moe_adapters.md (nothing copied from the reference).

Per task t (a dataset of the MTIL sequence):

1. ``begin_task``: allocate router t (zero gate and noise matrices in every adapted block,
   :class:`~clcli.models.moe.MoEClip`); reset the expert selection counts. Before the first task,
   train DDAS's autoencoder 0 on the generic image set (docs/moe_adapters.md#ddas).
2. ``train_task``: train the experts not yet frozen and router t (a fresh AdamW over exactly those)
   with the oracle router t, for ``optim.iterations`` + 1 steps of batch ``optim.batch_size``
   (:func:`~clcli.engine.fit_iterations`: the loader is re-shuffled each time it runs out), lr
   ``lr_by_dataset[name]`` (else ``optim.lr.representation``) under ``optim.schedule`` (``warmup_cosine``:
   ``optim.warmup`` linear warm-up steps then cosine to 0, :func:`clcli.optim.warmup_cosine`, the
   scheduler ZSCL's recipe uses); CE with ``optim.label_smoothing`` over t's classes of 100·cos (logit scale of
   the checkpoint), both towers adapted, the prompts re-encoded every step. Router noise and expert
   dropout in training only. Every selection is counted per block and tower.
3. ``end_task``: freeze the ``freeze_top`` most selected experts of every block (activate-and-freeze,
   docs/moe_adapters.md#activate-and-freeze), then train autoencoder t + 1 on t's training images.
4. ``predict``: DDAS picks, per evaluation batch (``ddas.granularity: batch``, the reference) or per
   sample, the task of the autoencoder with the lowest reconstruction error among autoencoder 0 and
   the learned tasks'; autoencoder 0 winning, or an error above ``ddas.threshold``, means zero-shot
   CLIP (every adapter skipped). The chosen router runs in both towers; logits over the evaluated
   dataset's classes (``batch.candidates``; the dataset identity is used for the label space only).

Deviations (docs/moe_adapters.md#deviations): only trained autoencoders compete; the frozen set lives
in the checkpointed method state; no RandomResizedCrop unless the data protocol provides it. The
iteration budget, warm-up and label smoothing are the shared ``optim`` keys (``optim=mtil_moe``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clcli import optim as optim_lib
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, fit_iterations
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.methods.clip_baselines import (
    AUGMENTS,
    PromptBank,
    classifier_lr_problems,
    clip_problems,
    cosine_logits,
    not_positive,
    zscl_train_transform,
)
from clcli.models.clip import ClipBackbone
from clcli.models.ddas import ALEXNET_URL, DDAS, FEATURES, alexnet_weights_path, build_features, train_autoencoder
from clcli.models.moe import TOWERS, MoEClip, frozen_summary

log = logging.getLogger("clcli")

DDAS_DEFAULTS = {  # docs/moe_adapters.md#ddas (full-shot reference values)
    "features": "alexnet_conv5", "alexnet_weights": None, "code_dim": 100,
    "ae0_data": "tinyimagenet", "tinyimagenet_dir": None, "ae0_steps": 1001, "task_steps": 301,
    "lr": 0.01, "weight_decay": 1e-4, "decay_every_epochs": 10, "batch_size": 64, "threshold": 0.0655,
    "threshold_factor": 1.1, "granularity": "batch", "noise_images": 256,
}
AE0_DATA = ("tinyimagenet", "noise")
GRANULARITY = ("batch", "sample")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class MoEStep(nn.Module):
    """One training step's loss as a module (``forward(x, y)`` = the batch mean loss): CE with label
    smoothing over the task's classes of ``scale · cos(image, prompt)``, both towers through router
    ``task``, the prompts re-encoded every step."""

    def __init__(self, model: MoEClip, tokens: torch.Tensor, task: int, label_start: int, label_smoothing: float):
        super().__init__()
        self.model, self.task, self.start, self.smoothing = model, task, label_start, float(label_smoothing)
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        img = self.model.encode_image(x, task=self.task)
        txt = self.model.encode_text(self.tokens, task=self.task)
        logits = cosine_logits(img, txt, self.model.logit_scale)
        return F.cross_entropy(logits, y - self.start, label_smoothing=self.smoothing)


class NoiseImages(torch.utils.data.Dataset):
    """``n`` uniform-noise images, CLIP-normalised, at ``size`` px: autoencoder 0's stand-in set."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, n: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 3, size, size, generator=g)
        self.x = (x - torch.tensor(self.MEAN).view(3, 1, 1)) / torch.tensor(self.STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], 0


class FolderImages(torch.utils.data.Dataset):
    """Every image file under ``root`` (recursively, sorted), labels unused: TinyImageNet's ``train``."""

    def __init__(self, root: Path, transform):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from clcli.data.images import load_image

        return self.transform(load_image(self.files[i])), 0


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MoEAdapters:
    """MoE-Adapters on a frozen open_clip CLIP (algorithm: the module docstring; docs/moe_adapters.md).

    Args (``conf/method/moe_adapters.yaml``): ``experts`` (22), ``top_k`` (2), ``bottleneck`` (64),
    ``scale`` (0.1), ``dropout`` (0.1), ``towers`` ([vision, text]), ``freeze_top`` (2),
    ``lr_by_dataset`` (task name → lr; others use ``optim.lr.representation``), ``selector``
    (``ddas``; ``oracle`` = the evaluated dataset's router if learned, an upper bound that is not the
    protocol), ``ddas`` (see :data:`DDAS_DEFAULTS` and docs/moe_adapters.md#ddas). Training length,
    warm-up and label smoothing are ``optim.iterations`` / ``optim.warmup`` / ``optim.label_smoothing``
    (``conf/optim/mtil_moe.yaml``).
    """

    # The optional optim keys this method reads (clcli.config refuses them for methods that do not).
    optim_keys = ("iterations", "label_smoothing")
    # Method keys that became optim keys: `clcli validate` names the replacement (clcli.config).
    moved_keys = {"iterations": "optim.iterations", "warmup_steps": "optim.warmup",
                  "label_smoothing": "optim.label_smoothing"}

    def __init__(self, backbone, optim, runtime: Runtime, experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.1, towers=TOWERS, freeze_top: int = 2,
                 lr_by_dataset: dict | None = None, selector: str = "ddas", ddas: dict | None = None,
                 augment: str = "zscl_rrc"):
        problems = self.config_problems(optim, type(backbone), experts=experts, top_k=top_k, bottleneck=bottleneck,
                                        scale=scale, dropout=dropout, towers=towers, freeze_top=freeze_top,
                                        lr_by_dataset=lr_by_dataset, selector=selector, ddas=ddas, augment=augment)
        if problems:
            raise ConfigError(problems)
        if backbone.dtype != torch.float32:  # the reference casts every weight to fp32 (docs/moe_adapters.md#training)
            log.warning("moe_adapters: converting the %s backbone to fp32 (the reference runs in fp32)", backbone.dtype)
            backbone.model.float()
            backbone.precision = "fp32"
            if isinstance(getattr(backbone, "weights_identity", None), dict):
                backbone.weights_identity["precision"] = "fp32 (converted by moe_adapters)"
        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.model = MoEClip(backbone, experts=experts, top_k=top_k, bottleneck=bottleneck, scale=scale,
                             dropout=dropout, towers=towers).to(runtime.device)
        self.freeze_top = int(freeze_top)
        self.lr_by_dataset = {str(k): float(v) for k, v in dict(lr_by_dataset or {}).items()}
        self.selector = selector
        self.augment = augment
        self.ddas_cfg = {**DDAS_DEFAULTS, **dict(ddas or {})}
        self.ddas: DDAS | None = None
        if selector == "ddas":
            d = self.ddas_cfg
            feats = build_features(d["features"], d["alexnet_weights"]).to(runtime.device)
            size = _image_size(backbone)
            with torch.no_grad():
                dim = feats(torch.zeros(1, 3, size, size, device=runtime.device)).shape[1]
            fixed = d["threshold"] if d["threshold"] != "auto" else None
            self.ddas = DDAS(feats, dim, int(d["code_dim"]), None if fixed is None else float(fixed))
        self.bank: PromptBank | None = None
        self.history: list[dict] = []
        # stage -> dataset -> selected task (or zero_shot) -> batches (images with granularity: sample)
        self.routing: dict[str, dict[str, dict[str, int]]] = {}
        self._text: dict[tuple[int, int | None], torch.Tensor] = {}

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def config_problems(optim, backbone=None, *, experts=22, top_k=2, bottleneck=64, scale=0.1, dropout=0.1,
                        towers=TOWERS, freeze_top=2, lr_by_dataset=None, selector="ddas", ddas=None,
                        augment="zscl_rrc", **_) -> list[str]:
        """Problems of the method's keys, backbone class and learning rate (``clcli validate`` and the
        constructor), including the user-provided DDAS files (AlexNet weights, TinyImageNet)."""
        p: list[str] = clip_problems(backbone, "moe_adapters") + classifier_lr_problems(optim, "moe_adapters")
        for key, value in (("experts", experts), ("bottleneck", bottleneck)):
            if not _positive_int(value):
                p.append(f"method.{key}: expected an integer >= 1, got {value!r}.")
        if not _positive_int(top_k) or (_positive_int(experts) and top_k > experts):
            p.append(f"method.top_k: expected an integer in 1..method.experts ({experts}), got {top_k!r}.")
        if not (isinstance(freeze_top, int) and not isinstance(freeze_top, bool) and freeze_top >= 0):
            p.append(f"method.freeze_top: expected an integer >= 0 (experts frozen per block after a task; 2 in "
                     f"MoE-Adapters), got {freeze_top!r}.")
        if augment not in AUGMENTS:
            p.append(f"method.augment: expected one of {', '.join(AUGMENTS)} (zscl_rrc = the random resized crop "
                     f"both reference codes train with), got {augment!r}.")
        if not _number(scale):
            p.append(f"method.scale: expected a number (0.1 in MoE-Adapters), got {scale!r}.")
        if not _number(dropout) or not 0 <= dropout < 1:
            p.append(f"method.dropout: expected a number in [0, 1), got {dropout!r}.")
        if optim.get("iterations") is None:
            p.append("optim.iterations: moe_adapters trains a fixed number of optimizer steps per task (steps "
                     "0..iterations) and has no epochs; set it (optim=mtil_moe: 1000, the reference).")
        bad_towers = [t for t in (towers or []) if t not in TOWERS]
        if not towers or bad_towers or isinstance(towers, str):
            p.append(f"method.towers: expected a non-empty list of {list(TOWERS)}, got {towers!r}.")
        bad_lr = {k: v for k, v in dict(lr_by_dataset or {}).items() if not _number(v) or v <= 0}
        if bad_lr:
            p.append(f"method.lr_by_dataset: every learning rate must be a number > 0; bad: {bad_lr}.")
        if selector not in ("ddas", "oracle"):
            p.append(f"method.selector: expected ddas (MoE-Adapters' task selector) or oracle (the evaluated "
                     f"dataset's router: an upper bound, not the protocol), got {selector!r}.")
        if not_positive(optim, "lr.representation"):
            p.append("optim.lr.representation: moe_adapters trains its experts and routers with it (for tasks "
                     "not in method.lr_by_dataset); must be > 0.")
        if selector == "ddas":
            p += _ddas_problems({**DDAS_DEFAULTS, **dict(ddas or {})}, set(dict(ddas or {})))
        return p

    # ------------------------------------------------------------------ protocol
    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        if not scenario.kind.task_label_space:
            raise ConfigError([
                f"method=moe_adapters needs an MTIL scenario, where each dataset is evaluated over its own "
                f"classes; data={scenario.name} is {scenario.kind.name}. Use data=mtil, mtil_order2, "
                "mtil_fewshot or synthetic_mtil."])
        self.bank = PromptBank(self.backbone, scenario)
        return scenario

    def begin_task(self, task: Task) -> None:
        """Router for the task (zero gate and noise), counts reset; autoencoder 0 before the first task."""
        while self.model.num_tasks <= task.index:
            self.model.add_task()
        self.model.reset_counts()
        if self.ddas is not None and "0" not in self.ddas.aes:
            self._train_ae(0, self._ae0_dataset(), int(self.ddas_cfg["ae0_steps"]), "autoencoder 0")

    def task_lr(self, task: Task) -> float:
        return self.lr_by_dataset.get(task.name, float(self.optim.lr.representation))

    def train_data(self, task: Task):
        """The task's training images as the experts, the router and the task's DDAS autoencoder see
        them (the reference's train transform): ZSCL's random resized crop (``method.augment: zscl_rrc``)
        or the test transform (``none``)."""
        return task.train.with_transform(zscl_train_transform(self.backbone)) if self.augment == "zscl_rrc" else task.train

    def train_task(self, task: Task) -> None:
        o, rt, t = self.optim, self.rt, task.index
        self._text.clear()
        params = self.model.set_trainable(t)
        trainable = sum(p.numel() for p in params)
        lr = self.task_lr(task)
        opt = optim_lib.make_optimizer(o, [(params, lr)])
        loader = rt.loader(self.train_data(task), o.batch_size, shuffle=True)
        sched = optim_lib.make_scheduler(o, opt, len(loader))  # warmup_cosine over steps 0..optim.iterations
        step = MoEStep(self.model, self.bank.tokens(task.labels, rt.device), t, task.labels.start,
                       o.get("label_smoothing") or 0.0)
        self.model.counting = True
        try:
            losses = fit_iterations(step, loader, iterations=int(o.iterations), optimizer=opt, scheduler=sched, rt=rt,
                                    where=f"task {t} ({task.name})", num_classes=task.num_classes,
                                    train_mode=lambda: self.model.train())
        finally:
            self.model.counting = False
            self.model.eval()
            self.model.set_trainable(None)
        self.history.append({"task": t, "name": task.name, "lr": lr, "steps": int(o.iterations) + 1, "train_loss": losses,
                             "trainable_parameters": trainable,
                             "counts": {tw: c.tolist() for tw, c in self.model.counts.items()}})

    def end_task(self, task: Task) -> None:
        """Freeze the most selected experts, then train the task's autoencoder (docs/moe_adapters.md)."""
        from clcli import distributed

        for tw in self.model.towers:  # multi-process: every rank freezes by the counts of the global batches
            self.model.counts[tw] = distributed.all_reduce_sum(self.model.counts[tw]).cpu()
        chosen = self.model.freeze_most_used(self.freeze_top)
        if self.history and self.history[-1]["task"] == task.index:
            self.history[-1]["frozen_now"] = chosen
            self.history[-1]["frozen_after"] = frozen_summary(self.model.frozen)
        if self.ddas is not None and str(task.index + 1) not in self.ddas.aes:
            self._train_ae(task.index + 1, self.train_data(task), int(self.ddas_cfg["task_steps"]), f"autoencoder {task.name}")
            if self.ddas_cfg["threshold"] == "auto":
                self._calibrate(task)

    @torch.no_grad()
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        images, dataset = batch.images, batch.task.index  # the dataset gives the label space only
        scale = self.model.logit_scale
        self.model.eval()
        if self.selector == "oracle":
            chosen = torch.tensor(dataset if dataset < self.model.num_tasks and self._learned(dataset) else -1)
        elif not self.ddas.tasks:  # nothing learned yet: zero-shot CLIP
            chosen = torch.tensor(-1)
        else:
            chosen = self.ddas.select(images, per_sample=self.ddas_cfg["granularity"] == "sample").cpu()
        self._record(batch, chosen)
        if chosen.ndim == 0:
            k = int(chosen)
            task = None if k < 0 else k
            return cosine_logits(self.model.encode_image(images, task),
                                 self._text_features(dataset, batch.candidates, task), scale)
        logits = torch.empty(images.shape[0], len(batch.candidates), device=images.device, dtype=torch.float32)
        for k in torch.unique(chosen).tolist():
            idx = torch.nonzero(chosen == k).flatten().to(images.device)
            task = None if k < 0 else k
            logits[idx] = cosine_logits(self.model.encode_image(images[idx], task),
                                        self._text_features(dataset, batch.candidates, task), scale)
        return logits

    # ------------------------------------------------------------------ helpers
    def _learned(self, task: int) -> bool:
        return any(r["task"] == task for r in self.history)

    def _text_features(self, dataset: int, candidates: range, task: int | None) -> torch.Tensor:
        """The dataset's text classifier through ``task``'s router (``None``: frozen CLIP), under the
        scenario's protocol (one template, or ZSCL's template ensemble: ``PromptBank.classifier``);
        exact to cache within a stage (evaluation routing is deterministic; cleared when training starts)."""
        key = (dataset, task)
        if key not in self._text:
            self._text[key] = self.bank.classifier(lambda tokens: self.model.encode_text(tokens, task), candidates,
                                                   self.rt.device)
        return self._text[key]

    def _record(self, batch: EvalBatch, chosen: torch.Tensor) -> None:
        stage = self.routing.setdefault(str(batch.after), {})
        per = stage.setdefault(batch.task.name, {})
        for k in chosen.flatten().tolist():
            name = "zero_shot" if k < 0 else str(k)
            per[name] = per.get(name, 0) + 1

    def _ae0_dataset(self):
        d = self.ddas_cfg
        if d["ae0_data"] == "noise":
            return NoiseImages(int(d["noise_images"]), _image_size(self.backbone))
        return FolderImages(Path(d["tinyimagenet_dir"]) / "train", self.backbone.transform(True))

    def _train_ae(self, key: int, dataset, steps: int, what: str) -> None:
        d, rt = self.ddas_cfg, self.rt
        ae = self.ddas.add(key, rt.device)
        # A plain loader with a generator seeded from the global RNG (the same on every rank): in a
        # multi-process run every rank trains the same autoencoder on all the data, so they stay equal.
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        loader = torch.utils.data.DataLoader(dataset, batch_size=int(d["batch_size"]), shuffle=True, generator=g,
                                             num_workers=rt.num_workers, pin_memory=rt.device.type == "cuda")
        losses = train_autoencoder(ae, self.ddas.features, loader, steps, float(d["lr"]), float(d["weight_decay"]),
                                   int(d["decay_every_epochs"]), rt.device)
        log.info("DDAS %s: %d steps, loss %.5f -> %.5f", what, steps, losses[0], losses[-1])

    @torch.no_grad()
    def _calibrate(self, task: Task) -> None:
        """``threshold: auto``: ``threshold_factor`` × the largest batch error of any learned task's
        autoencoder on its own training images (test transform; the stand-in for the tiny benchmark)."""
        worst = 0.0
        ae = self.ddas.aes[str(task.index + 1)]
        for x, _ in self.rt.loader(task.train_plain, self.rt.eval_batch_size, shuffle=False):
            worst = max(worst, float(ae.errors(self.ddas.features(x.to(self.rt.device))).mean()))
        self.ddas.calibration[task.index] = worst
        self.ddas.threshold = float(self.ddas_cfg["threshold_factor"]) * max(self.ddas.calibration.values())

    # ------------------------------------------------------------------ persistence and facts
    def state_dict(self) -> dict:
        state = {"num_tasks": self.model.num_tasks, "experts": self.model.experts.state_dict(),
                 "routers": self.model.routers.state_dict(), "frozen": frozen_summary(self.model.frozen),
                 "history": list(self.history), "routing": dict(self.routing)}
        if self.ddas is not None:
            state["ddas"] = {"aes": self.ddas.aes.state_dict(), "keys": sorted(int(k) for k in self.ddas.aes),
                             "threshold": self.ddas.threshold, "calibration": dict(self.ddas.calibration)}
        return state

    def load_state_dict(self, state: dict) -> None:
        while self.model.num_tasks < state["num_tasks"]:
            self.model.add_task()
        self.model.experts.load_state_dict(state["experts"])
        self.model.routers.load_state_dict(state["routers"])
        self.model.frozen = {t: [set(b) for b in blocks] for t, blocks in state["frozen"].items()}
        self.model.set_trainable(None)
        self.history, self.routing = list(state["history"]), dict(state["routing"])
        if self.ddas is not None and "ddas" in state:
            s = state["ddas"]
            for k in s["keys"]:
                if str(k) not in self.ddas.aes:
                    self.ddas.add(k, self.rt.device)
            self.ddas.aes.load_state_dict(s["aes"])
            self.ddas.threshold = s["threshold"]
            self.ddas.calibration = {int(k): v for k, v in s["calibration"].items()}
        self._text.clear()

    def summary(self) -> dict:
        m = self.model
        per_task = {r["name"]: r["trainable_parameters"] for r in self.history}
        out = {
            "trainable_parameters_per_task": per_task,
            # every expert is trainable in the first task; each task adds its router
            "trainable_parameters_total": (m.adapter_parameter_count() + len(self.history) * m.router_parameter_count()
                                           if self.history else 0),
            "adapter_parameters": m.adapter_parameter_count(),
            "router_parameters_per_task": m.router_parameter_count(),
            "clip_parameters": sum(p.numel() for p in self.backbone.model.parameters()),
            "augment": self.augment,
            "experts": m.n_experts, "top_k": m.top_k, "bottleneck": m.bottleneck, "towers": list(m.towers),
            "frozen_experts_per_block": {t: [len(s) for s in blocks] for t, blocks in m.frozen.items()},
            "selector": self.selector,
            "routing": self.routing,
            "tasks": [{k: v for k, v in r.items() if k != "counts"} for r in self.history],
        }
        if self.ddas is not None:
            ae = next(iter(self.ddas.aes.values()), None)
            out["ddas"] = {"features": self.ddas_cfg["features"], "feature_dim": self.ddas.dim,
                           "autoencoders": len(self.ddas.aes),
                           "autoencoder_parameters": sum(p.numel() for p in ae.parameters()) if ae else 0,
                           "threshold": self.ddas.threshold, "granularity": self.ddas_cfg["granularity"],
                           "calibration": {str(k): v for k, v in self.ddas.calibration.items()}}
        return out


def _image_size(backbone: ClipBackbone) -> int:
    size = backbone.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _ddas_problems(d: dict, given: set[str]) -> list[str]:
    """The ``method.ddas`` keys, and the user-provided files they name (docs/moe_adapters.md#ddas)."""
    p = []
    unknown = sorted(given - set(DDAS_DEFAULTS))
    if unknown:
        p.append(f"method.ddas: unknown key(s) {unknown}; known: {sorted(DDAS_DEFAULTS)}.")
    if d["features"] not in FEATURES:
        p.append(f"method.ddas.features: expected one of {', '.join(FEATURES)}, got {d['features']!r}.")
    if d["ae0_data"] not in AE0_DATA:
        p.append(f"method.ddas.ae0_data: expected tinyimagenet (the reference) or noise (the test stand-in), "
                 f"got {d['ae0_data']!r}.")
    if d["granularity"] not in GRANULARITY:
        p.append(f"method.ddas.granularity: expected batch (the reference: one decision per eval batch) or sample, "
                 f"got {d['granularity']!r}.")
    for key in ("code_dim", "ae0_steps", "task_steps", "batch_size", "decay_every_epochs", "noise_images"):
        if not _positive_int(d[key]):
            p.append(f"method.ddas.{key}: expected an integer >= 1, got {d[key]!r}.")
    for key in ("lr", "threshold_factor"):
        if not _number(d[key]) or d[key] <= 0:
            p.append(f"method.ddas.{key}: expected a number > 0, got {d[key]!r}.")
    if not _number(d["weight_decay"]) or d["weight_decay"] < 0:
        p.append(f"method.ddas.weight_decay: expected a number >= 0, got {d['weight_decay']!r}.")
    if d["threshold"] != "auto" and (not _number(d["threshold"]) or d["threshold"] <= 0):
        p.append(f"method.ddas.threshold: expected a number > 0 (0.0655 for AlexNet features) or auto "
                 f"(threshold_factor x the largest in-distribution batch error), got {d['threshold']!r}.")
    if d["features"] == "pixels" and d["threshold"] != "auto":
        p.append("method.ddas.threshold: the fixed thresholds (0.0655, 0.0585) are calibrated for AlexNet conv5 "
                 "features; with method.ddas.features=pixels set method.ddas.threshold=auto.")
    if d["features"] == "alexnet_conv5":
        path = alexnet_weights_path(d["alexnet_weights"])
        if not path.is_file():
            p.append(f"method.ddas.alexnet_weights: the AlexNet ImageNet weights DDAS extracts its features with are "
                     f"not at {path}. Fix: on a machine with network download {ALEXNET_URL} and copy it there (or "
                     "set method.ddas.alexnet_weights=<file>); for a run without them, method.ddas.features=pixels "
                     "with method.ddas.threshold=auto (a deviation).")
    if d["ae0_data"] == "tinyimagenet":
        root = d["tinyimagenet_dir"]
        if not root or not (Path(root) / "train").is_dir():
            p.append(f"method.ddas.tinyimagenet_dir: DDAS's autoencoder 0 trains on TinyImageNet's train images, "
                     f"expected under {root}/train (tiny-imagenet-200/train/<wnid>/images/*.JPEG). Fix: download "
                     f"{TINYIMAGENET_URL}, unzip it under paths.data_dir (or set method.ddas.tinyimagenet_dir); "
                     "or method.ddas.ae0_data=noise (a deviation).")
    return p
