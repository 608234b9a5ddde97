"""Optimizers and schedules built fresh for every task from ``cfg.optim``.

Two learning rates: ``lr.representation`` (the backbone / adapted representation: SLCA's slow
learner 1e-4, 0 freezes it) and ``lr.classifier`` (the heads, 1e-2; only methods with a classifier
head read it). The optimizer itself is a config component, ``optim.optimizer`` (the ``optim/optimizer``
group: ``sgd``, ``sgd_plain``, ``adamw``): a ``_partial_`` ``_target_`` called with the parameter
groups and their learning rates, so its keys are its constructor's arguments and nothing else.
Schedules are stepped per epoch (``multistep``, ``cosine``, ``constant``) or per step
(``cosine_steps``, DIKI's per-iteration cosine to ``final_lr_ratio·lr``; ``warmup_cosine``, ZSCL's
linear warm-up over ``warmup`` steps then cosine to 0, docs/diki_mtil_protocol.md#continual-ft-zscl-recipe).
``iterations`` (null = epoch-based) trains a fixed number of steps instead of epochs
(:func:`clcli.engine.fit_iterations`); ``label_smoothing`` is read by the CLIP fine-tuning methods.
``coda_cosine`` is CODA-Prompt's per-epoch factor cos(99π·e / (200·(E−1)))
(docs/prompt_baselines.md#hyper-parameters-per-benchmark).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger("clcli")

SCHEDULES = ("multistep", "cosine", "constant", "cosine_steps", "warmup_cosine", "coda_cosine")
# The ``optim`` keys each schedule reads; ``check_config`` refuses one its schedule does not read.
SCHEDULE_KEYS = {"multistep": ("milestones", "gamma"), "cosine": ("final_lr_ratio",),
                 "cosine_steps": ("final_lr_ratio",), "constant": (),
                 "warmup_cosine": ("warmup",), "coda_cosine": ()}
# The keys of ``cfg.optim`` some code reads (``check_config`` refuses any other); ``optimizer`` is the
# component node, checked against its ``_target_``'s signature. ``lr.classifier`` belongs to the
# methods with a classifier head, which check it themselves.
OPTIM_KEYS = ("lr.representation", "lr.classifier", "epochs", "batch_size", "schedule", "milestones", "gamma",
              "final_lr_ratio", "optimizer", "iterations", "warmup", "label_smoothing")
# Optional ``optim`` keys only some methods read: a method class lists those it reads in its ``optim_keys``
# attribute (the iteration-trained CLIP methods: clip_ft, zscl, moe_adapters); ``check_config`` refuses a
# non-null one for any other method (an epoch-based method would silently ignore it).
METHOD_OPTIM_KEYS = ("iterations", "label_smoothing")
# Arguments of the optimizer the code passes itself (never config keys of ``optim.optimizer``).
OPTIMIZER_ARGS = ("params", "lr")

Groups = list[tuple[Iterable[torch.nn.Parameter], float]]


def optimizer_factory(optim) -> Callable[..., torch.optim.Optimizer]:
    """``optim.optimizer`` instantiated as a partial: call it with param groups (and ``lr``)."""
    from hydra.utils import instantiate

    return instantiate(optim.optimizer, _partial_=True)


def build(factory: Callable[..., torch.optim.Optimizer], groups: Groups) -> torch.optim.Optimizer:
    """``factory`` over ``(params, lr)`` groups; groups with lr 0 or no trainable tensor are dropped."""
    param_groups = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        if params and lr > 0:
            param_groups.append({"params": params, "lr": lr})
    if not param_groups:
        raise ValueError("nothing to optimize: every parameter group is empty or has lr 0")
    return factory(param_groups, lr=param_groups[0]["lr"])


def make_optimizer(optim, groups: Groups) -> torch.optim.Optimizer:
    """The run's optimizer (``optim.optimizer``) over ``(params, lr)`` groups, fresh for a task."""
    return build(optimizer_factory(optim), groups)


def sgd(groups: Groups, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over ``(params, lr)`` groups (classifier alignment's own optimizer, ``method.ca``)."""
    return build(functools.partial(torch.optim.SGD, momentum=momentum, weight_decay=weight_decay), groups)


def warmup_cosine(step: int, warmup: int, last: int) -> float:
    """ZSCL's lr factor at optimizer step ``step`` (0-based) of a task whose last step is ``last``
    (= ``optim.iterations``): ``(step+1)/warmup`` during the warm-up, then
    ``½(1 + cos(π(step − warmup)/(last − warmup)))`` — 1 right after the warm-up, 0 at ``last``
    (docs/diki_mtil_protocol.md#continual-ft-zscl-recipe)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(last - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
              milestones=(), gamma: float = 0.1, final_lr_ratio: float = 0.0, warmup: int = 0,
              iterations: int | None = None):
    """A ``LambdaLR`` multiplying each group's lr; ``per_step`` tells the caller when to step it.
    ``warmup_cosine`` ends at step ``iterations`` (or, epoch-based, at the last step of the last epoch)."""
    if schedule == "multistep":
        ms = sorted(milestones)
        fn = lambda e: gamma ** sum(e >= m for m in ms)  # noqa: E731
    elif schedule == "cosine":
        fn = lambda e: final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "cosine_steps":
        total = max(epochs * steps_per_epoch, 1)
        fn = lambda s: final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    elif schedule == "constant":
        fn = lambda e: 1.0  # noqa: E731
    elif schedule == "warmup_cosine":
        last = iterations if iterations is not None else max(epochs * steps_per_epoch - 1, 1)
        fn = functools.partial(warmup_cosine, warmup=int(warmup), last=int(last))
    elif schedule == "coda_cosine":
        fn = lambda e: math.cos(99 * math.pi * e / (200 * max(epochs - 1, 1)))  # noqa: E731
    else:
        raise ValueError(f"optim.schedule: unknown '{schedule}' (known: {', '.join(SCHEDULES)})")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    sched.per_step = schedule in ("cosine_steps", "warmup_cosine")
    return sched


def make_scheduler(optim, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The run's schedule (``optim.schedule`` and its keys) for ``opt``. A multistep milestone past
    ``optim.epochs`` is legal (a shortened check run) but never reached: logged once per call."""
    epochs = optim.get("epochs") or 1  # iteration-based tasks have none
    late = [m for m in optim.get("milestones", ()) if m >= epochs] if optim.schedule == "multistep" else []
    if late:
        log.warning("optim.milestones %s: at or past optim.epochs=%d, so the lr does not drop there in this run",
                    late, epochs)
    return scheduler(opt, optim.schedule, epochs, steps_per_epoch,
                     milestones=optim.get("milestones", ()), gamma=optim.get("gamma", 0.1),
                     final_lr_ratio=optim.get("final_lr_ratio", 0.0), warmup=optim.get("warmup") or 0,
                     iterations=optim.get("iterations"))
