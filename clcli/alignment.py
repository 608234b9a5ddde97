"""Classifier alignment (CA), shared by SLCA and the prompt methods.

SLCA's second stage (docs/slca_protocol.md#class-statistics, #classifier-alignment): after each task,
per-class Gaussians of the features of the task's train images (test transform, eval mode); from
task 1 on, a *copy* of all heads is trained on features sampled from every seen class's Gaussian,
with logit normalization. The copy serves the task's evaluation only. The prompt methods apply the
same stage to their prompted features (docs/prompt_baselines.md#classifier-alignment-on-prompts):
only the feature function differs, so this module takes it as an argument.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from clcli import optim as optim_lib
from clcli.config import dict_key_problems, number_problem
from clcli.engine import Runtime, extract_features
from clcli.errors import DivergenceError
from clcli.models.heads import TaskHeads
from clcli.stats import GaussianStats

# The keys of ``method.ca`` and ``method.stats`` the alignment reads (conf/method/slca.yaml documents them).
CA_KEYS = ("enabled", "epochs", "samples_per_class", "lr", "momentum", "weight_decay", "logit_norm_tau",
           "mean_scaling", "buggy_task_id")
STATS_KEYS = ("ridge", "batch_size")
# Optional ``method.ca`` keys (SLCA++, docs/slca_protocol.md#slca-alignment-and-feature-scales) and
# their values when absent (off: SLCA's behaviour).
CA_OPTIONAL = {"sample_shrink": 0.0, "feature_scale": 0.0}


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


def ca_sample_shrink(labels: list[int], n: int, task_index: int, task_of: list[int], current_task_size: int,
                     buggy_task_id: bool, mu: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """SLCA++'s per-sample shrink of alignment samples, ``[len(labels), n]``: sample i of class c is
    multiplied by ``1/(1 + s_i·(T − t_c))`` with ``s_i = mu + 0.02·(u_i − 0.5)``, ``u_i ~ U[0, 1)``
    (``mu`` = 0.02: s ∈ [0.01, 0.03]); t_c as in :func:`ca_mean_scale`
    (docs/slca_protocol.md#slca-alignment-and-feature-scales)."""
    T = task_index
    t_c = torch.tensor([c // current_task_size if buggy_task_id else task_of[c] for c in labels],
                       dtype=torch.float32, device=device)
    u = torch.rand(len(labels), n, generator=generator, device=device)
    s = mu + 0.02 * (u - 0.5)
    return 1.0 / (1.0 + s * (T - t_c)[:, None])


def ca_config_problems(ca: dict, stats: dict, ca_keys: tuple[str, ...] = CA_KEYS) -> list[str]:
    """Problems of ``method.ca.*`` and ``method.stats.*`` (names and ranges). Without alignment only
    ``ca.enabled`` is required. ``ca_keys``: the ``method.ca`` keys the method reads (a method may
    read more than :data:`CA_KEYS` and check those itself); the keys of :data:`CA_OPTIONAL` may be
    given or not."""
    problems = dict_key_problems(ca, tuple(ca_keys) + tuple(CA_OPTIONAL), "method.ca", required=False)
    problems += [f"method.ca.{k}: missing; classifier alignment (method.ca.enabled) needs it."
                 for k in (ca_keys if ca.get("enabled", True) else ("enabled",)) if k not in ca]
    problems += dict_key_problems(stats, STATS_KEYS, "method.stats")
    for key, value, rule in (
        ("method.ca.epochs", ca.get("epochs"), dict(minimum=0, integer=True)),
        ("method.ca.samples_per_class", ca.get("samples_per_class"), dict(minimum=1, integer=True)),
        ("method.ca.lr", ca.get("lr"), dict(minimum=0, strict=True)),
        ("method.ca.momentum", ca.get("momentum"), dict(minimum=0)),
        ("method.ca.weight_decay", ca.get("weight_decay"), dict(minimum=0)),
        ("method.ca.logit_norm_tau", ca.get("logit_norm_tau"), {}),
        ("method.ca.sample_shrink", ca.get("sample_shrink"), dict(minimum=0)),
        ("method.ca.feature_scale", ca.get("feature_scale"), dict(minimum=0)),
        ("method.stats.ridge", stats.get("ridge"), dict(minimum=0, strict=True)),
        ("method.stats.batch_size", stats.get("batch_size"), dict(minimum=1, integer=True)),
    ):
        if key.rsplit(".", 1)[-1] in (ca if key.startswith("method.ca") else stats):  # missing: reported above
            problems += number_problem(key, value, **rule)
    for key in ("enabled", "mean_scaling", "buggy_task_id"):
        if key in ca and not isinstance(ca[key], bool):
            problems.append(f"method.ca.{key}: expected true or false, got {ca[key]!r}.")
    return problems


def fit_statistics(stats: GaussianStats, features: Callable[[torch.Tensor], torch.Tensor], dataset, rt: Runtime,
                   batch_size: int) -> None:
    """Per-class mean/covariance of ``features(images)`` over ``dataset`` (a task's train images
    under the test transform; the caller puts its model in eval mode), one pass (multi-process:
    each rank a block of the images, sums reduced across ranks)."""
    for f, y in extract_features(features, dataset, rt, batch_size=batch_size, description="class statistics",
                                 shard=True):
        stats.update(f, y)
    stats.reduce()
    stats.finalize()


def align(heads: TaskHeads, stats: GaussianStats, ca: dict, task, task_of: list[int], rt: Runtime) -> TaskHeads:
    """Classifier alignment on features sampled from the class Gaussians (spec §5.3): trains and
    returns a copy of ``heads`` (``heads`` is left as it is). Memory: the stored factors plus one
    epoch's samples (one buffer, refilled every epoch); the shuffle gathers each batch through the
    permutation instead of copying the epoch. A non-finite loss raises :class:`DivergenceError`."""
    aligned = heads.copy()
    aligned.requires_grad_(True)
    labels = list(range(task.labels.stop))
    scale = (ca_mean_scale(labels, task.index, task_of, task.num_classes, ca["buggy_task_id"])
             if ca["mean_scaling"] else None)
    shrink = float(ca.get("sample_shrink", CA_OPTIONAL["sample_shrink"]))
    opt = optim_lib.sgd([(aligned.parameters(), ca["lr"])], momentum=ca["momentum"], weight_decay=ca["weight_decay"])
    sched = optim_lib.scheduler(opt, "cosine", ca["epochs"], 1)
    n, slices = ca["samples_per_class"], aligned.slices()
    x = None
    for epoch in rt.track(range(ca["epochs"]), "alignment epochs"):
        x, y = stats.sample(labels, n, mean_scale=scale, device=rt.device, out=x)  # one buffer, every epoch
        if shrink > 0:  # SLCA++: every sample shrunk by its own random factor (samples are grouped by class)
            factor = ca_sample_shrink(labels, n, task.index, task_of, task.num_classes, ca["buggy_task_id"], shrink,
                                      device=x.device)
            x.view(len(labels), n, -1).mul_(factor[:, :, None].to(x.dtype))
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
                    f"method.stats.ridge (now {stats.ridge:g}; a larger ridge tames near-singular "
                    "covariances). Checkpoints of finished tasks are kept."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    aligned.requires_grad_(False)
    return aligned
