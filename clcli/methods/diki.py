"""DIKI: Distribution-aware Interference-free Knowledge Integration on a frozen CLIP.

Tang et al., "Mind the Interference: Retaining Pre-trained Knowledge in Parameter Efficient Continual
Learning of Vision-Language Models", ECCV 2024, arXiv 2407.05342. Implemented from the clcli spec
``diki_mtil.md`` (the reference repository has no license; nothing is copied from it).

Per task t (a dataset of the MTIL sequence; spec §10 gives the control flow):

1. ``begin_task``: allocate task t's residual key/value pools (:class:`~clcli.models.residual_attention.DikiClip`,
   V_r = 0 so the model starts as zero-shot CLIP, §3.2) and fit a Gaussian to the L2-normalised
   *frozen* image features of t's training set — mean and unbiased full covariance + ``cov_ridge``·I,
   one pass with :func:`clcli.engine.extract_features` (§4.1), :class:`~clcli.stats.GaussianStats`
   keyed by task index, in float64 (§8 item 8).
2. ``train_task``: only task t's residuals are trained (a fresh optimizer over them alone, §8 item 11),
   with the oracle task id and weight 1: SGD at ``optim.lr.representation`` (5.0), momentum 0, weight
   decay 0, per-step cosine to ``final_lr_ratio``·lr (5e-3), ``optim.epochs`` (10) epochs of batch
   ``optim.batch_size`` (128); CE over t's classes of ``logit_scale · cos(image, prompt text)``, with the
   text features of t's prompts re-encoded every step through t's text residuals (prompts truncated to
   the longest EOT + 1, exact, §7 item 2). After every epoch the val accuracy (oracle task, w = 1, no
   Gaussian) is measured and the best epoch's residuals are restored at the end (§5.1) when
   ``select_best_on_val`` and the task has a val split.
3. ``predict(batch)`` (§4.2): the evaluated dataset is the batch's task (MTIL gives it; the classes
   scored are its own, ``batch.candidates``); for each sample S_b = max over learned tasks k of
   log N(f_b; μ_k, Σ_k) on its frozen normalised feature f_b, k_b the argmax, and
   w_b = σ(S_b/scale − shift) (scale 512, shift 1). With ``calibration.task_select: batch`` (the
   reference) the batch uses the majority task of the k_b
   (ties: lowest task index), the vision residual is scaled per sample by w_b (each sample's own
   likelihood, even when its own k_b lost the vote, §8 item 2) and the text residual by mean_b(w_b).
   With ``task_select: sample`` each sample uses its own k_b and its own w_b for both its image and
   its own text features (§4.3: the reference crashes in this mode, so the text weighting is ours);
   computed by grouping the samples by selected task. The text classifier follows the scenario's
   protocol (``data.protocol``, :meth:`PromptBank.classifier`): the first template (DIKI's), or under
   ``zscl`` ZSCL's template ensemble, every template encoded through the same residual at the same
   weight (docs/diki_mtil_protocol.md#the-protocol-choice).

The frozen features of every test set are computed once per run and cached (``method.feature_cache``,
:mod:`clcli.cache`, §7 item 4): an eval batch named by the evaluator (test set, position in its loader)
gets its features from the cache (bit-identical), any other batch computes them.

Batch-wise selection makes results depend on the evaluation batch (``eval.batch_size`` 256, unshuffled,
a last partial batch votes alone; §8 item 1).

Deviations from the reference, all deliberate: one optimizer per task over that task's residuals only
(exact under plain SGD, §8 item 11); the unused frozen pass during training/validation is skipped
(§7 item 1); the CE runs on float32 logits computed from the (fp16) features, where the reference's
logits stay fp16 (§5.2); the Gaussian is fitted from an unshuffled pass in float64 (same statistics
up to summation order); vote ties go to the lowest task id; ``param_dtype: fp32`` and
``task_select: sample`` are options, not the reference. With no learned task (never the case in the
training loop) ``predict`` returns zero-shot CLIP instead of crashing (§8 item 13).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from clcli import distributed
from clcli import optim as optim_lib
from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.cache import mode_problems as feature_cache_problems
from clcli.data.scenario import Scenario, Task
from clcli.engine import Runtime, extract_features, fit
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.methods.clip_baselines import (
    PromptBank,
    classifier_lr_problems,
    clip_problems,
    cosine_logits,
    ensemble_mean,
    not_positive,
)
from clcli.models.clip import ClipBackbone
from clcli.models.residual_attention import DikiClip
from clcli.stats import GaussianStats

log = logging.getLogger("clcli")

DIKI_DEPTH = 8  # residual pools in the first 8 of ViT-B/16's 12 blocks, both encoders (spec §3.2)
PARAM_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
TASK_SELECT = ("batch", "sample")
CALIBRATION = {"scale": 512.0, "shift": 1.0, "cov_ridge": 1e-7, "task_select": "batch"}  # spec §4 defaults
# Per-sample text weighting encodes the dataset's prompts once per distinct weight; this many prompts
# go through the text tower per call (SUN397: 20 samples x 397 classes), bounding activation memory.
MAX_PROMPTS_PER_PASS = 8192


def calibration_weight(score: torch.Tensor, scale: float = 512.0, shift: float = 1.0) -> torch.Tensor:
    """DIKI's residual weight w = σ(S/scale − shift) for a log-likelihood S (spec §4.2): S = 512 → 0.5,
    S = 0 → σ(−1) ≈ 0.2689, monotone in S. ``scale`` = 512 is the reference's hard-coded constant
    (§8 item 9), not necessarily the feature width."""
    return torch.sigmoid(score / scale - shift)


def majority_task(tasks: torch.Tensor) -> int:
    """The most frequent task id of a batch (spec §4.2 step 6). Ties go to the lowest task id (the
    reference takes the top-1 of the counts, whose tie order is unspecified)."""
    values, counts = torch.unique(tasks, return_counts=True)  # values sorted ascending
    return int(values[torch.argmax(counts)])  # argmax returns the first maximum


def calibrate(stats: GaussianStats, features: torch.Tensor, learned: list[int], scale: float, shift: float):
    """Per sample: best task k_b, its log-likelihood S_b (float64) and weight w_b (float32), from
    the normalised frozen ``features`` [B, D] and the Gaussians of the ``learned`` tasks."""
    scores = stats.log_prob(features, learned)  # [B, K], float64
    best, arg = scores.max(dim=1)
    tasks = torch.as_tensor(learned, device=arg.device)[arg]
    return tasks, best, calibration_weight(best, scale, shift).float()


def _resolve_depth(value, blocks: int, key: str, model_name: str, problems: list[str]) -> int:
    """Blocks with residual pools in an encoder of ``blocks`` blocks (the value's type is checked by
    :meth:`DIKI.config_problems`)."""
    if value is None:  # DIKI's 8, or every block of a smaller stand-in (tiny_clip has 3)
        return min(DIKI_DEPTH, blocks)
    if isinstance(value, int) and value > blocks:
        problems.append(
            f"method.{key}={value} exceeds the {blocks} blocks of backbone {model_name!r}: set "
            f"method.{key} to at most {blocks}, or null (DIKI's {DIKI_DEPTH}, capped at the block count)."
        )
    return value


class TaskLoss(torch.nn.Module):
    """DIKI's training loss for task ``task``, the module :func:`clcli.engine.fit` trains (through DDP
    in a multi-process run): CE over the task's classes of ``logit_scale · cos(image, prompt text)``
    with the oracle task and weight 1 (the reference's frozen-feature pass is skipped, §7 item 1). The
    text features of the task's prompts go through its text residuals with gradient, re-encoded every
    step (§7 item 7). Only task ``task``'s residual pools require a gradient
    (``pools.freeze_all_but``), and a step uses all of them; DDP ignores the frozen CLIP."""

    def __init__(self, model: DikiClip, task: int, tokens: torch.Tensor, start: int):
        super().__init__()
        self.model, self.task, self.tokens, self.start = model, task, tokens, start

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        img = self.model.encode_image(x, task=self.task)
        txt = self.model.encode_text(self.tokens, task=self.task)
        return F.cross_entropy(cosine_logits(img, txt, self.model.logit_scale), y - self.start)


class DIKI:
    """DIKI on a frozen open_clip CLIP (see the module docstring for the algorithm and spec sections).

    Args (``conf/method/diki.yaml``):
        depth_vision, depth_text: leading blocks with residual pools in each encoder; ``null`` =
            DIKI's 8 (spec §3.2), capped at the block count of smaller backbones; an integer larger
            than the block count is refused.
        n_tokens: residual keys/values per block and task (8).
        param_dtype: ``fp16`` (the reference, §5.2), ``fp32`` (master copy; a deviation) or ``bf16``.
        calibration: ``scale`` (512), ``shift`` (1.0), ``cov_ridge`` (1e-7, added to every covariance),
            ``task_select`` (``batch`` = reference, or ``sample``).
        select_best_on_val: keep the best epoch by val accuracy when the task has a val split.
        feature_cache: ``memory`` (default) | ``disk`` | ``off``: cache of the frozen image features
            (:mod:`clcli.cache`, spec §7 item 4). Each test set is encoded by the frozen CLIP once
            per run instead of once per evaluation stage; ``disk`` also keeps the test and train
            features in ``feature_cache_dir`` for later runs (the Gaussians then need no frozen
            pass either). Exact: an eval batch gets cached features only when it is bit-for-bit
            one of the dataset's loader batches, else they are computed as without the cache.
        feature_cache_dir: folder of the ``disk`` entries.
    """

    def __init__(self, backbone, optim, runtime: Runtime, depth_vision: int | None = None,
                 depth_text: int | None = None, n_tokens: int = 8, param_dtype: str = "fp16",
                 calibration: dict | None = None, select_best_on_val: bool = True, feature_cache: str = "memory",
                 feature_cache_dir: str | None = None):
        problems = self.config_problems(optim, type(backbone), depth_vision=depth_vision, depth_text=depth_text,
                                        n_tokens=n_tokens, param_dtype=param_dtype, calibration=calibration,
                                        feature_cache=feature_cache, feature_cache_dir=feature_cache_dir)
        if not isinstance(backbone, ClipBackbone):  # the depths below need CLIP's towers
            raise ConfigError(problems)
        cal = {**CALIBRATION, **dict(calibration or {})}
        m = backbone.model
        dv = _resolve_depth(depth_vision, len(m.visual.transformer.resblocks), "depth_vision", backbone.model_name, problems)
        dt = _resolve_depth(depth_text, len(m.transformer.resblocks), "depth_text", backbone.model_name, problems)
        if problems:
            raise ConfigError(problems)

        self.backbone = backbone.to(runtime.device)
        self.optim, self.rt = optim, runtime
        self.calibration = cal
        self.select_best_on_val = bool(select_best_on_val)
        self.param_dtype = param_dtype
        self.model = DikiClip(backbone, depth_vision=dv, depth_text=dt, n_tokens_vision=n_tokens,
                              n_tokens_text=n_tokens, param_dtype=PARAM_DTYPES[param_dtype]).to(runtime.device)
        # float64 covariances: 1e-7 jitter on near-singular 512x512 matrices (spec §8 item 8).
        self.stats = GaussianStats(backbone.feature_dim, ridge=float(cal["cov_ridge"]), cov_dtype=torch.float64)
        self.bank: PromptBank | None = None
        self.history: list[dict] = []  # per trained task: losses, val accuracies, best epoch, lrs
        # Text features that are exact to reuse: weight 0 (= zero-shot CLIP, key task None) and weight
        # exactly 1 (sigmoid saturated) per (dataset, task); any other weight is recomputed (spec §7 item 6).
        self._text_cache: dict[tuple[int, int | None], torch.Tensor] = {}
        # Frozen image features of the test sets (and, on disk, of the train sets), spec §7 item 4.
        self.features = FeatureCache(feature_cache, feature_cache_dir)
        self.frozen = FrozenEvalFeatures(self.features, backbone, runtime)  # test sets' frozen features

    @staticmethod
    def config_problems(optim, backbone=None, *, depth_vision=None, depth_text=None, n_tokens=8, param_dtype="fp16",
                        calibration=None, feature_cache="memory", feature_cache_dir=None, **_) -> list[str]:
        """Problems of DIKI's keys, learning rates and backbone class (``clcli validate`` and the
        constructor); the constructor adds the depths against the backbone's block counts."""
        problems: list[str] = clip_problems(backbone, "diki") + classifier_lr_problems(optim, "diki")
        for key, value in (("depth_vision", depth_vision), ("depth_text", depth_text)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                problems.append(f"method.{key}: expected null or an integer >= 0, got {value!r}.")
        cal = {**CALIBRATION, **dict(calibration or {})}
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            problems.append(f"method.n_tokens: expected an integer >= 1, got {n_tokens!r}.")
        if param_dtype not in PARAM_DTYPES:
            problems.append(f"method.param_dtype: expected one of {', '.join(PARAM_DTYPES)}, got {param_dtype!r}.")
        if isinstance(cal["scale"], bool) or not isinstance(cal["scale"], (int, float)) or cal["scale"] <= 0:
            problems.append(f"method.calibration.scale: must be > 0, got {cal['scale']!r}.")
        if isinstance(cal["shift"], bool) or not isinstance(cal["shift"], (int, float)):
            problems.append(f"method.calibration.shift: expected a number, got {cal['shift']!r}.")
        if isinstance(cal["cov_ridge"], bool) or not isinstance(cal["cov_ridge"], (int, float)) or cal["cov_ridge"] < 0:
            problems.append(f"method.calibration.cov_ridge: must be >= 0, got {cal['cov_ridge']!r}.")
        if cal["task_select"] not in TASK_SELECT:
            problems.append(f"method.calibration.task_select: expected one of {', '.join(TASK_SELECT)}, "
                            f"got {cal['task_select']!r}.")
        unknown = sorted(set(cal) - set(CALIBRATION))
        if unknown:
            problems.append(f"method.calibration: unknown key(s) {unknown}.")
        problems += feature_cache_problems(feature_cache, feature_cache_dir)
        if not_positive(optim, "lr.representation"):
            problems.append("optim.lr.representation: DIKI trains its residual pools with it; must be > 0 (5.0 in the paper).")
        return problems

    # ------------------------------------------------------------------ protocol
    @staticmethod
    def scenario_problems(kind, data_name: str = "") -> list[str]:
        """DIKI needs each dataset evaluated over its own classes (``clcli validate`` asks before
        anything is built, :meth:`prepare_scenario` again on the built scenario)."""
        if kind.task_label_space:
            return []
        return [f"method=diki needs a domain-class incremental (MTIL) scenario, where each dataset is evaluated "
                f"over its own classes; data={data_name} is {kind.name}. Use data=mtil, mtil_order2, mtil_fewshot "
                "or synthetic_mtil."]

    def prepare_scenario(self, scenario: Scenario) -> Scenario:
        if problems := self.scenario_problems(scenario.kind, scenario.name):
            raise ConfigError(problems)
        self.bank = PromptBank(self.backbone, scenario)
        return scenario

    def begin_task(self, task: Task) -> None:
        """Residual pools for the task, then its Gaussian before any training step (spec §4.1)."""
        while self.model.num_tasks <= task.index:
            self.model.add_task()
        if task.index not in self.stats:
            for f in self._train_features(task):
                self.stats.update(f, torch.full((f.shape[0],), task.index, dtype=torch.long, device=f.device))
            self.stats.finalize()

    def make_optimizer(self, params: list[torch.nn.Parameter], steps_per_epoch: int):
        """``optim.optimizer`` (plain SGD in the reference) over the current task's residuals only,
        with the per-step cosine from ``lr`` to ``final_lr_ratio``·lr over ``epochs``·``steps_per_epoch``
        steps (spec §5.1)."""
        o = self.optim
        opt = optim_lib.make_optimizer(o, [(params, float(o.lr.representation))])
        sched = optim_lib.make_scheduler(o, opt, steps_per_epoch)
        return opt, sched

    def train_task(self, task: Task) -> None:
        o, rt, t = self.optim, self.rt, task.index
        self._text_cache = {k: v for k, v in self._text_cache.items() if k[1] is None}  # keep zero-shot only
        self.model.pools.freeze_all_but(t)
        params = self.model.residual_parameters(t)
        loader = rt.loader(task.train, o.batch_size, shuffle=True)
        opt, sched = self.make_optimizer(params, len(loader))
        # built (and, multi-process, wrapped in DDP) once for the task's epochs: only task t's residuals train
        net = distributed.data_parallel(TaskLoss(self.model, t, self.bank.tokens(task.labels, rt.device), task.labels.start))

        use_val = self.select_best_on_val and task.val is not None and len(task.val) > 0
        record = {"task": t, "name": task.name, "lr_start": opt.param_groups[0]["lr"], "train_loss": [],
                  "val_acc": [], "best_epoch": None}
        best_acc, best_state = -1.0, None
        for epoch in range(o.epochs):
            # One epoch per fit() call so that validation can run between epochs; the per-step
            # schedule lives in `sched` and continues across calls.
            record["train_loss"] += fit(net, loader, epochs=1, optimizer=opt, scheduler=sched, rt=rt,
                                        where=f"task {t} ({task.name}) [{epoch + 1}/{o.epochs}]",
                                        num_classes=task.num_classes)
            if use_val:
                acc = self._oracle_accuracy(task, task.val)
                record["val_acc"].append(acc)
                if acc > best_acc:  # strictly better: the earliest of equal epochs is kept
                    best_acc, record["best_epoch"] = acc, epoch
                    best_state = [p.detach().clone() for p in params]
                log.info("task %d (%s) epoch %d/%d: val acc %.2f", t, task.name, epoch + 1, o.epochs, acc)
        if best_state is not None and record["best_epoch"] != o.epochs - 1:
            with torch.no_grad():
                for p, b in zip(params, best_state):
                    p.copy_(b)
            log.info("task %d (%s): restored the best val epoch %d (%.2f%%)", t, task.name,
                     record["best_epoch"] + 1, best_acc)
        record["lr_end"] = opt.param_groups[0]["lr"]  # after the last step: final_lr_ratio·lr
        self.model.pools.freeze_all_but(None)
        self.history.append(record)

    def end_task(self, task: Task) -> None:
        """Nothing: the task's Gaussian is fitted in begin_task, before training (spec §4.1)."""

    @torch.no_grad()
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        images, dataset, c = batch.images, batch.task.index, batch.candidates  # MTIL: the evaluated dataset is given
        scale = self.model.logit_scale
        learned = self.stats.keys
        frozen = self.frozen(batch)  # cached across stages where exact (§7 item 4)
        if not learned:  # nothing learned yet: the model is zero-shot CLIP (the reference crashes, §8 item 13)
            return cosine_logits(frozen, self._text(dataset, c, None, 0.0), scale)
        tasks, _, w = calibrate(self.stats, frozen, learned, self.calibration["scale"], self.calibration["shift"])
        if self.calibration["task_select"] == "batch":
            k = majority_task(tasks)
            img = self.model.encode_image(images, task=k, weight=w)  # per-sample vision weight
            return cosine_logits(img, self._text(dataset, c, k, w.mean()), scale)  # batch-mean text weight
        logits = torch.empty(images.shape[0], len(c), device=images.device, dtype=torch.float32)
        for k in torch.unique(tasks).tolist():  # group the samples by their own task
            idx = torch.nonzero(tasks == k).squeeze(1)
            img = self.model.encode_image(images[idx], task=k, weight=w[idx]).float()
            txt = self._per_sample_text(dataset, c, k, w[idx]).float()  # [n, C, D]
            logits[idx] = scale * torch.einsum("nd,ncd->nc", img, txt)
        return logits

    # ------------------------------------------------------------------ helpers
    def _train_features(self, task: Task):
        """Batches of frozen normalised features of ``task.train_plain`` for its Gaussian: from the
        disk cache (same batches, same bits, so the same float64 sums) or computed."""
        if self.features.mode == "disk":
            stored = self.features.features(self.backbone, task.train_plain, self.rt, name=task.name, split="train",
                                            description=f"Gaussian {task.name}")
            for f in stored.split(self.rt.eval_batch_size):  # extract_features' batches: the same sums
                yield f.to(self.rt.device, torch.float32)
            return
        for f, _ in extract_features(self.backbone.features, task.train_plain, self.rt, description=f"Gaussian {task.name}"):
            yield f

    def _text(self, dataset: int, candidates: range, task: int | None, weight) -> torch.Tensor:
        """The text classifier of ``dataset`` (its ``candidates``) with ``task``'s residual scaled by the
        scalar ``weight``, under the scenario's protocol (:meth:`PromptBank.classifier`: the first template,
        or ZSCL's template ensemble with every template encoded through the same residual); cached only
        where reuse is exact (weight 0 = zero-shot CLIP, weight exactly 1)."""
        w = float(weight)
        if task is None or w == 0.0:
            key = (dataset, None)
        elif w == 1.0:
            key = (dataset, task)
        else:
            return self._encode_classifier(candidates, task, weight)
        if key not in self._text_cache:
            self._text_cache[key] = self._encode_classifier(candidates, key[1], None if key[1] is None else 1.0)
        return self._text_cache[key]

    def _encode_classifier(self, candidates: range, task: int | None, weight) -> torch.Tensor:
        return self.bank.classifier(lambda tokens: self.model.encode_text(tokens, task=task, weight=weight),
                                    candidates, self.rt.device)

    def _per_sample_text(self, dataset: int, candidates: range, task: int, weights: torch.Tensor) -> torch.Tensor:
        """``[n, C, D]``: for sample b, the dataset's C class features with ``task``'s text residual
        scaled by the sample's own w_b (``task_select: sample``), under the protocol (an ensemble
        combines every template's features per weight, :func:`ensemble_mean`). Each distinct weight is
        encoded once; several weights share one text-tower call (one weight per prompt row)."""
        sets = self.bank.eval_token_sets(candidates, self.rt.device)
        ensemble = self.bank.ensemble(candidates)
        n_cls = len(candidates)
        uniq, inverse = torch.unique(weights, return_inverse=True)
        feats: list[torch.Tensor | None] = [None] * len(uniq)
        rest = []
        for j, w in enumerate(uniq.tolist()):
            if w in (0.0, 1.0):
                feats[j] = self._text(dataset, candidates, task, w)
            else:
                rest.append(j)
        per_call = max(1, MAX_PROMPTS_PER_PASS // n_cls)
        for s in range(0, len(rest), per_call):
            chunk = rest[s : s + per_call]
            wc = uniq[chunk].repeat_interleave(n_cls)  # prompt row j*C + c gets weight j
            outs = [self.model.encode_text(tok.repeat(len(chunk), 1), task=task, weight=wc).view(len(chunk), n_cls, -1)
                    for tok in sets]
            out = ensemble_mean(outs) if ensemble else outs[0]
            for j, f in zip(chunk, out):
                feats[j] = f
        return torch.stack(feats)[inverse]

    @torch.inference_mode()
    def _oracle_accuracy(self, task: Task, dataset) -> float:
        """Top-1 (%) on ``dataset`` with the oracle task and weight 1; never calls the Gaussian (§5.1)."""
        t = task.index
        txt = self.model.encode_text(self.bank.tokens(task.labels, self.rt.device), task=t)
        correct = total = 0
        for x, y in self.rt.loader(dataset, self.rt.eval_batch_size, shuffle=False):
            with self.rt.autocast():
                logits = cosine_logits(self.model.encode_image(x.to(self.rt.device), task=t), txt, 1.0)
            correct += int((logits.argmax(1).cpu() + task.labels.start == y).sum())
            total += len(y)
        return 100.0 * correct / max(total, 1)

    # ------------------------------------------------------------------ persistence and facts
    def state_dict(self) -> dict:
        return {
            "num_tasks": self.model.num_tasks,
            "pools": self.model.pools.state_dict(),
            "stats": self.stats.state_dict(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        while self.model.num_tasks < state["num_tasks"]:
            self.model.add_task()
        self.model.pools.load_state_dict(state["pools"])
        self.model.pools.freeze_all_but(None)
        self.stats.load_state_dict(state["stats"])
        self.history = list(state["history"])
        self._text_cache.clear()

    def summary(self) -> dict:
        pools = self.model.pools
        per_task = self.model.num_residual_parameters_per_task
        clip = sum(p.numel() for p in self.backbone.model.parameters())
        names = {r["task"]: r["name"] for r in self.history}
        return {
            "residual_parameters_per_task": {names.get(t, str(t)): per_task for t in range(pools.num_tasks)},
            "residual_parameters_total": per_task * pools.num_tasks,
            "clip_parameters": clip,
            "residual_fraction_of_clip": per_task * pools.num_tasks / clip,
            "depth_vision": pools.depths["vision"],
            "depth_text": pools.depths["text"],
            "n_tokens": pools.n_tokens["vision"],
            "param_dtype": self.param_dtype,
            "calibration": dict(self.calibration),
            "tasks": [{k: v for k, v in r.items()} for r in self.history],
            "covariance_jitter": {str(k): v for k, v in self.stats.jitter.items()},
            "feature_cache": self.frozen.report(),
        }
