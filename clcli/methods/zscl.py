"""ZSCL: continual fine-tuning of CLIP that keeps its zero-shot ability.

Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models", ICCV 2023, arXiv 2303.06628; implemented from docs/diki_mtil_protocol.md#zscl (nothing is
copied from the reference code). ZSCL is :class:`~clcli.methods.clip_baselines.ContinualCLIPFT`
with ZSCL's recipe (``optim=mtil_zscl``) plus three things:

1. **Distillation from the initial CLIP** (the teacher, a frozen copy of the weights the run starts
   from) on a *reference* image set and reference texts. With u_i, ū_i the student's / teacher's
   normalised features of the B reference images of the step and v̄_j the teacher's normalised
   features of all N_t reference texts (computed once per run: the teacher never changes),
   z = s·u·v̄ᵀ and z̄ = s·ū·v̄ᵀ (s = the fixed exp(logit_scale)), and
   D(a, b) = T²·mean over rows of CE(softmax(a/T), log_softmax(b/T)):
   L_img = D(z̄, z) (each image over the texts) and L_txt = D(z̄ᵀ, zᵀ) (each text over the images).
   The text side uses the teacher's features, so the distillation sends no gradient into the
   student's text tower (the reference code; ``text_features: student`` is the alternative).
2. **L2 pull** λ_l2·Σ_p ‖θ_p − θ_p^start‖² (a sum over all parameters) towards the weights the task
   started from.
3. **Weight ensemble**: θ_WE starts at θ^start with n = 0; after the update of every step s with
   s % ``we_every`` == 0: n ← n + 1, θ_WE ← (n·θ_WE + θ)/(n + 1). Training continues from the raw
   θ; at the end of the task θ_WE replaces the weights: it is what is evaluated, saved and loaded
   by the next task (so with 1,001 steps and ``we_every`` 100 it is the mean of 12 weight sets).

Loss = CE (label smoothing) + λ_l2·L2 + λ_img·L_img + λ_txt·L_txt; all λ = 1, T = 2 by default.

Reference data are user-provided (docs/diki_mtil_protocol.md#zscl-reference-data):
``ref_images.path`` an ImageFolder-style tree (ImageNet's ``train/`` folder; labels unused; any
diverse unlabeled images work, a documented deviation), read with the test transform, shuffled on
its own RNG, ``ref_images.batch_size`` (64) per step, a new pass per task; ``ref_images.subset_size``
keeps a fixed random subset. ``ref_texts.path`` the CC3M validation TSV (caption, tab, url per line),
a CSV with a ``title`` or ``caption`` column, or a text file with one caption per line.
"""
from __future__ import annotations

import copy
import csv
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clcli.data.base import SplitData
from clcli.data.images import ImageDataset
from clcli.data.scenario import Task
from clcli.engine import Runtime
from clcli.errors import ConfigError, DataError
from clcli.methods.clip_baselines import ContinualCLIPFT, FineTuneLoss, cosine_logits

log = logging.getLogger("clcli")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
TEXT_FEATURES = ("teacher", "student")
REF_IMAGES = {"path": None, "subset_size": None, "batch_size": 64, "standin": None}
REF_TEXTS = {"path": None, "max_texts": None, "standin": None}
STANDIN_NOTE = "a generated stand-in (tests and the tiny benchmark only; not ZSCL's reference data)"
GET_IMAGES = ("the ImageNet-1k train folder (ILSVRC2012_img_train.tar from https://image-net.org, extracted to "
              "<dir>/train/<wnid>/*.JPEG) — or any folder of diverse images (a deviation from ZSCL)")
GET_TEXTS = ("the Conceptual Captions validation file Validation_GCC-1.1.0-Validation.tsv (caption<TAB>url per line; "
             "https://ai.google.com/research/ConceptualCaptions/download) — or a .txt with one caption per line")


def distill_loss(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """ZSCL's D(a, b) = T²·mean over rows of the soft-target CE between softmax(a/T) and b/T
    (docs/diki_mtil_protocol.md#zscl): same gradient as KL, plus the target's entropy."""
    t = float(temperature)
    soft = F.softmax(target_logits / t, dim=1)
    return t * t * -(soft * F.log_softmax(logits / t, dim=1)).sum(dim=1).mean()


def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (recursively), sorted: an ImageFolder tree or a flat folder."""
    out = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        out += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)


def read_captions(path: str) -> list[str]:
    """Captions from the CC3M TSV (first column), a CSV (``title`` or ``caption`` column) or a text file
    (one per line); empty lines are skipped."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            header = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
            col = next((c for c in ("title", "caption") if c in (reader.fieldnames or [])), None)
            if col is None:
                raise DataError(f"method.ref_texts.path={path}: a CSV needs a 'title' or 'caption' column, "
                                f"found {reader.fieldnames}.")
            return [r[col].strip() for r in reader if (r.get(col) or "").strip()]
    with open(p, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if p.suffix.lower() == ".tsv":
        lines = [line.split("\t")[0] for line in lines]
    return [line.strip() for line in lines if line.strip()]


class _Cycle:
    """Endless batches of a dataset, re-shuffled each pass on a private generator (the global RNG —
    and so the task's own loader — is never touched)."""

    def __init__(self, dataset, batch_size: int, seed: int, rt: Runtime):
        # Every rank of a multi-process run draws the same reference batch (a batch-independent term).
        self.loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, num_workers=rt.num_workers,
                                                  generator=torch.Generator().manual_seed(seed),
                                                  pin_memory=rt.device.type == "cuda")
        self._it = None

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            x, _ = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            x, _ = next(self._it)
        return x


class ZSCLStep(FineTuneLoss):
    """ZSCL's per-step loss as a module: ``forward(x, y)`` = CE + λ_l2·L2 + λ_img·L_img + λ_txt·L_txt
    (docs/diki_mtil_protocol.md#zscl). The reference batch comes from ``ref`` (an endless iterator
    on its own RNG); distillation terms with weight 0 are not computed, nor is the reference batch
    drawn when both are 0."""

    def __init__(self, backbone, tokens, start, scale, label_smoothing, *, teacher, anchor: dict[str, torch.Tensor],
                 ref, ref_text_features: torch.Tensor | None, ref_tokens: torch.Tensor | None,
                 lambda_img: float, lambda_txt: float, lambda_l2: float, temperature: float, text_features: str):
        super().__init__(backbone, tokens, start, scale, label_smoothing)
        self.teacher = [teacher]  # a list: not a submodule (never trained, never wrapped by DDP)
        self.anchor, self.ref = anchor, ref
        self.ref_text_features, self.ref_tokens = ref_text_features, ref_tokens
        self.lambda_img, self.lambda_txt, self.lambda_l2 = float(lambda_img), float(lambda_txt), float(lambda_l2)
        self.temperature, self.text_features = float(temperature), text_features
        self.last: dict[str, float] = {}

    def l2(self) -> torch.Tensor:
        """Σ_p ‖θ_p − θ_p^start‖² over every parameter of the model (a sum, not a mean)."""
        params = dict(self.backbone.model.named_parameters())
        return sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())

    def distillation(self, ref_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_img, L_txt) on one reference batch."""
        u = self.backbone.encode_image(ref_images)
        with torch.no_grad():
            u_bar = self.teacher[0].encode_image(ref_images)
        v_bar = self.ref_text_features
        v = v_bar if self.text_features == "teacher" else self.backbone.encode_text(self.ref_tokens)
        z = cosine_logits(u, v, self.scale)
        z_bar = cosine_logits(u_bar, v_bar, self.scale)
        return distill_loss(z_bar, z, self.temperature), distill_loss(z_bar.T, z.T, self.temperature)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().forward(x, y)
        self.last = {"ce": float(loss.detach())}
        if self.lambda_l2:
            l2 = self.l2()
            loss = loss + self.lambda_l2 * l2
            self.last["l2"] = float(l2.detach())
        if self.lambda_img or self.lambda_txt:
            ref = next(self.ref).to(x.device, non_blocking=True)
            l_img, l_txt = self.distillation(ref)
            loss = loss + self.lambda_img * l_img + self.lambda_txt * l_txt
            self.last.update(img=float(l_img.detach()), txt=float(l_txt.detach()))
        return loss


class ZSCL(ContinualCLIPFT):
    """ZSCL on open_clip CLIP (see the module docstring; docs/diki_mtil_protocol.md#zscl).

    Args (``conf/method/zscl.yaml``; defaults = ZSCL's MTIL script):
        lr_by_dataset, augment: as :class:`~clcli.methods.clip_baselines.ContinualCLIPFT`.
        lambda_img, lambda_txt: weights of the image-wise and text-wise distillation (1, 1).
        lambda_l2: weight of the L2 pull towards the task's starting weights (1).
        temperature: T of the distillation (2).
        text_features: ``teacher`` (the reference code: cached teacher features of the reference
            texts) or ``student`` (the student encodes the texts every step, with gradient).
        we_every: weight-ensemble period in steps (100); 0 or null = no ensemble (the raw weights).
        ref_images: ``{path, subset_size, batch_size, standin}`` — the reference image folder, an optional
            fixed random subset size (generator seed 42), images per step (64); ``standin: N`` replaces
            the folder by N seeded noise images (tests and the tiny benchmark only).
        ref_texts: ``{path, max_texts, standin}`` — the captions file; ``max_texts`` keeps the first N;
            ``standin: N`` uses N fixed generated captions instead (tests only).
    """

    name = "zscl"

    def __init__(self, backbone, optim, runtime: Runtime, lr_by_dataset: dict | None = None, augment: str = "zscl_rrc",
                 lambda_img: float = 1.0, lambda_txt: float = 1.0, lambda_l2: float = 1.0, temperature: float = 2.0,
                 text_features: str = "teacher", we_every: int | None = 100, ref_images: dict | None = None,
                 ref_texts: dict | None = None):
        problems = self.zscl_problems(lambda_img=lambda_img, lambda_txt=lambda_txt, lambda_l2=lambda_l2,
                                      temperature=temperature, text_features=text_features, we_every=we_every,
                                      ref_images=ref_images, ref_texts=ref_texts)
        if problems:
            raise ConfigError(problems)
        super().__init__(backbone, optim, runtime, lr_by_dataset=lr_by_dataset, augment=augment)
        self.lambda_img, self.lambda_txt, self.lambda_l2 = float(lambda_img), float(lambda_txt), float(lambda_l2)
        self.temperature, self.text_features = float(temperature), text_features
        self.we_every = int(we_every or 0)
        self.ref_images_cfg = {**REF_IMAGES, **dict(ref_images or {})}
        self.ref_texts_cfg = {**REF_TEXTS, **dict(ref_texts or {})}
        # The teacher: the initial weights, frozen for the whole run (a resumed run rebuilds the backbone
        # from the same weights before loading the student's state, so the teacher is the same).
        self.teacher = copy.deepcopy(self.backbone).eval()
        self.teacher.requires_grad_(False)
        self._ref_dataset: ImageDataset | None = None
        self._ref_text: tuple[torch.Tensor, torch.Tensor] | None = None  # tokens, teacher features
        self._avg: dict[str, torch.Tensor] | None = None
        self._n_avg = 0
        self._step: ZSCLStep | None = None
        self._losses: dict[str, list[float]] = {}

    @property
    def distills(self) -> bool:
        return bool(self.lambda_img or self.lambda_txt)

    @classmethod
    def config_problems(cls, optim, backbone=None, *, lr_by_dataset=None, augment="zscl_rrc", lambda_img=1.0,
                        lambda_txt=1.0, lambda_l2=1.0, temperature=2.0, text_features="teacher", we_every=100,
                        ref_images=None, ref_texts=None, **_) -> list[str]:
        """Problems of ZSCL's keys, its reference data (what is missing and how to get it) and the
        fine-tuning keys (also run by ``clcli validate``)."""
        return cls.ft_problems(optim, backbone, lr_by_dataset=lr_by_dataset, augment=augment) + \
            cls.zscl_problems(lambda_img=lambda_img, lambda_txt=lambda_txt, lambda_l2=lambda_l2,
                              temperature=temperature, text_features=text_features, we_every=we_every,
                              ref_images=ref_images, ref_texts=ref_texts)

    @staticmethod
    def zscl_problems(*, lambda_img, lambda_txt, lambda_l2, temperature, text_features, we_every, ref_images,
                      ref_texts) -> list[str]:
        problems = []
        for key, value in (("lambda_img", lambda_img), ("lambda_txt", lambda_txt), ("lambda_l2", lambda_l2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"method.{key}: expected a number >= 0 (ZSCL: 1), got {value!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            problems.append(f"method.temperature: expected a number > 0 (ZSCL: 2), got {temperature!r}.")
        if text_features not in TEXT_FEATURES:
            problems.append(f"method.text_features: expected teacher (the reference code) or student, got {text_features!r}.")
        if we_every is not None and (isinstance(we_every, bool) or not isinstance(we_every, int) or we_every < 0):
            problems.append(f"method.we_every: expected an integer >= 0 (ZSCL: 100; 0 = no weight ensemble), got {we_every!r}.")
        distills = all(isinstance(v, (int, float)) for v in (lambda_img, lambda_txt)) and (lambda_img or lambda_txt)
        imgs = {**REF_IMAGES, **dict(ref_images or {})}
        txts = {**REF_TEXTS, **dict(ref_texts or {})}
        unknown = [f"method.ref_images.{k}" for k in imgs if k not in REF_IMAGES] + \
            [f"method.ref_texts.{k}" for k in txts if k not in REF_TEXTS]
        if unknown:
            problems.append(f"{', '.join(unknown)}: unknown key(s); ref_images takes {', '.join(REF_IMAGES)}, "
                            f"ref_texts takes {', '.join(REF_TEXTS)}.")
        for key, value, rule in (("ref_images.batch_size", imgs["batch_size"], 1),
                                 ("ref_images.subset_size", imgs["subset_size"], 1),
                                 ("ref_images.standin", imgs["standin"], 1), ("ref_texts.standin", txts["standin"], 1),
                                 ("ref_texts.max_texts", txts["max_texts"], 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < rule):
                problems.append(f"method.{key}: expected null or an integer >= {rule}, got {value!r}.")
        if distills:
            path = imgs["path"]
            if imgs["standin"] is None and (not path or not os.path.isdir(str(path))):
                problems.append(
                    f"method.ref_images.path={path!r}: ZSCL distils on a reference image folder, which is missing. "
                    f"Expected <path>/<class>/*.jpg (ImageFolder layout, labels unused). Get {GET_IMAGES}, and set "
                    "method.ref_images.path to it (docs/diki_mtil_protocol.md#zscl-reference-data); "
                    "method.lambda_img=0 method.lambda_txt=0 trains without distillation.")
            path = txts["path"]
            if txts["standin"] is None and (not path or not os.path.isfile(str(path))):
                problems.append(
                    f"method.ref_texts.path={path!r}: ZSCL distils against reference captions, whose file is missing. "
                    f"Get {GET_TEXTS}, and set method.ref_texts.path to it (docs/diki_mtil_protocol.md#zscl-reference-data).")
        return problems

    # ------------------------------------------------------------------ reference data
    def reference_images(self) -> ImageDataset:
        """The reference images (test transform), with the fixed subset when ``subset_size`` is set."""
        if self._ref_dataset is None and self.ref_images_cfg["standin"] is not None:
            n, size = int(self.ref_images_cfg["standin"]), self.backbone.model.visual.preprocess_cfg["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            rng = np.random.RandomState(0)
            items = [(rng.rand(*size, 3) * 255).astype(np.uint8) for _ in range(n)]
            zeros = np.zeros(n, dtype=np.int64)
            self._ref_dataset = ImageDataset(SplitData(items, zeros), zeros, self.backbone.transform(False))
            log.warning("zscl: %d noise reference images, %s", n, STANDIN_NOTE)
        if self._ref_dataset is None:
            cfg = self.ref_images_cfg
            paths = list_images(str(cfg["path"]))
            if not paths:
                raise DataError(f"method.ref_images.path={cfg['path']}: no image files ({', '.join(IMAGE_SUFFIXES)}) "
                                f"under it. Get {GET_IMAGES}.")
            if cfg["subset_size"] is not None and cfg["subset_size"] < len(paths):
                keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(42))[: cfg["subset_size"]]
                paths = [paths[i] for i in sorted(keep.tolist())]
            zeros = np.zeros(len(paths), dtype=np.int64)
            self._ref_dataset = ImageDataset(SplitData(paths, zeros), zeros, self.backbone.transform(False))
            log.info("zscl: %d reference images from %s", len(paths), cfg["path"])
        return self._ref_dataset

    def reference_texts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, teacher features) of the reference captions, computed once per run (exact: the
        teacher never changes); tokens truncated to the longest EOT + 1 (exact for CLIP's text tower)."""
        if self._ref_text is None:
            cfg = self.ref_texts_cfg
            if cfg["standin"] is not None:
                captions = [f"a photo of object number {i} on a table." for i in range(int(cfg["standin"]))]
                log.warning("zscl: %d fixed reference captions, %s", len(captions), STANDIN_NOTE)
            else:
                captions = read_captions(str(cfg["path"]))
            if cfg["max_texts"] is not None:
                captions = captions[: cfg["max_texts"]]
            if not captions:
                raise DataError(f"method.ref_texts.path={cfg['path']}: no captions in it. Get {GET_TEXTS}.")
            tokens = self.backbone.truncate_tokens(self.backbone.tokenize(captions)).to(self.rt.device)
            with torch.no_grad():
                feats = torch.cat([self.teacher.encode_text(chunk) for chunk in tokens.split(1024)])
            self._ref_text = (tokens, feats)
            log.info("zscl: %d reference captions from %s", len(captions), cfg["path"] or "the stand-in")
        return self._ref_text

    # ------------------------------------------------------------------ training hooks
    def make_step(self, task: Task) -> nn.Module:
        ref = tokens = feats = None
        if self.distills:
            tokens, feats = self.reference_texts()
            # A new shuffled pass per task, on a generator of its own seeded from the task's seed (no draw
            # from the global RNG, so the task's own batches are those of plain fine-tuning).
            ref = _Cycle(self.reference_images(), int(self.ref_images_cfg["batch_size"]), torch.initial_seed() + 1, self.rt)
        anchor = {n: p.detach().clone() for n, p in self.backbone.model.named_parameters()} if self.lambda_l2 else {}
        self._step = ZSCLStep(self.backbone, self.bank.tokens(task.labels, self.rt.device), task.labels.start,
                              self.backbone.logit_scale, self.optim.get("label_smoothing") or 0.0, teacher=self.teacher,
                              anchor=anchor, ref=ref, ref_text_features=feats, ref_tokens=tokens,
                              lambda_img=self.lambda_img, lambda_txt=self.lambda_txt, lambda_l2=self.lambda_l2,
                              temperature=self.temperature, text_features=self.text_features)
        return self._step

    def begin_training(self, task: Task, step: nn.Module) -> None:
        """θ_WE starts at the task's starting weights, n = 0."""
        self._n_avg = 0
        self._avg = {n: p.detach().clone() for n, p in self.backbone.model.named_parameters()} if self.we_every else None
        self._losses = {}

    @torch.no_grad()
    def after_step(self, s: int) -> None:
        """After step ``s``'s update: record the loss terms; every ``we_every`` steps fold the weights
        into the running mean (docs/diki_mtil_protocol.md#zscl)."""
        for k, v in (self._step.last if self._step is not None else {}).items():
            self._losses.setdefault(k, []).append(v)
        if self._avg is None or s % self.we_every:
            return
        self._n_avg += 1
        n = self._n_avg
        for name, p in self.backbone.model.named_parameters():
            self._avg[name].mul_(n).add_(p.detach()).div_(n + 1)

    @torch.no_grad()
    def end_training(self, task: Task) -> dict:
        """Load θ_WE into the model: the ensembled weights are evaluated, saved and carried on."""
        facts = {"loss_terms_mean": {k: float(np.mean(v)) for k, v in self._losses.items()}}
        if self._avg is not None:
            for name, p in self.backbone.model.named_parameters():
                p.copy_(self._avg[name])
            facts["weight_ensemble_sets"] = self._n_avg + 1  # θ^start and the n folded-in weight sets
        self._avg, self._step = None, None
        return facts

    def summary(self) -> dict:
        out = super().summary()
        out.update({
            "teacher": "initial CLIP (frozen)", "lambda_img": self.lambda_img, "lambda_txt": self.lambda_txt,
            "lambda_l2": self.lambda_l2, "temperature": self.temperature, "text_features": self.text_features,
            "we_every": self.we_every,
            "reference_images": len(self._ref_dataset) if self._ref_dataset is not None else None,
            "reference_texts": int(self._ref_text[0].shape[0]) if self._ref_text is not None else None,
            "reference_standin": bool(self.ref_images_cfg["standin"] or self.ref_texts_cfg["standin"]),
        })
        return out
