"""Semantic checks of a composed config: every problem listed at once, before anything is loaded.

Hydra already rejects unknown keys and groups (struct mode); ``check_config`` adds the checks that
need meaning: ranges, milestones within epochs, task splits, method/backbone compatibility, missing
data and weight files. ``clcli validate <overrides>`` prints them; ``clcli train`` runs them first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from clcli.optim import SCHEDULES

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _num(cfg, key: str, problems: list[str], *, minimum: float | None = None, strict: bool = False, integer: bool = False,
         optional: bool = False):
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as exc:  # missing (???) or a broken interpolation
        problems.append(f"{key}: {exc}")
        return None
    if value is None:
        if not optional:
            problems.append(f"{key}: expected {'an integer' if integer else 'a number'}, got null.")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        problems.append(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}.")
        return None
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        problems.append(f"{key}: must be {'>' if strict else '>='} {minimum}, got {value}.")
    return value


def _method_problems(cfg: DictConfig) -> list[str]:
    """The method class's own checks of its keys (``config_problems``, the same the constructor runs),
    so that ``clcli validate`` reports them without loading a backbone."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    target = cfg.method.get("_target_")
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 - a bad _target_ is reported, not raised
        return [f"method._target_: cannot import '{target}' ({exc})."]
    check = getattr(cls, "config_problems", None)
    if check is None:
        return []
    try:
        kwargs = OmegaConf.to_container(cfg.method, resolve=True)
        kwargs.pop("_target_", None)
        return list(check(cfg.optim, **kwargs))
    except Exception as exc:  # noqa: BLE001 - e.g. a missing (???) value: reported, never raised
        return [f"method: cannot check the keys of {target} ({type(exc).__name__}: {exc})."]


def check_config(cfg: DictConfig) -> list[str]:
    """Return every problem found in ``cfg`` (empty list = valid). Cheap: no data, no weights."""
    problems: list[str] = []
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        problems.append(f"device: expected auto, cpu or cuda[:N], got '{cfg.device}'.")
    elif str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device} but no CUDA GPU is visible; use device=auto or device=cpu.")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision: expected one of {', '.join(PRECISIONS)}, got '{cfg.precision}'.")
    _num(cfg, "seed", problems, minimum=0, integer=True)
    _num(cfg, "train_seed", problems, minimum=0, integer=True, optional=True)
    if cfg.loader.num_workers != "auto":
        _num(cfg, "loader.num_workers", problems, minimum=0, integer=True)
    for key in ("tf32", "compile", "channels_last"):
        if not isinstance(cfg.perf[key], bool):
            problems.append(f"perf.{key}: expected true or false, got {cfg.perf[key]!r}.")
    _num(cfg, "eval.batch_size", problems, minimum=1, integer=True)
    _num(cfg, "guard.max_loss_factor", problems, minimum=1)
    _num(cfg, "guard.chance_loss_ratio", problems, minimum=0)
    if cfg.checkpoint.keep not in ("all", "last"):
        problems.append(f"checkpoint.keep: expected all or last, got '{cfg.checkpoint.keep}'.")

    # optimization
    o = cfg.optim
    _num(cfg, "optim.lr.representation", problems, minimum=0)
    _num(cfg, "optim.lr.classifier", problems, minimum=0, strict=True)
    epochs = _num(cfg, "optim.epochs", problems, minimum=1, integer=True)
    _num(cfg, "optim.batch_size", problems, minimum=1, integer=True)
    _num(cfg, "optim.momentum", problems, minimum=0)
    _num(cfg, "optim.weight_decay", problems, minimum=0)
    if o.schedule not in SCHEDULES:
        problems.append(f"optim.schedule: unknown '{o.schedule}' (known: {', '.join(SCHEDULES)}).")
    if o.schedule == "multistep" and isinstance(epochs, int):
        bad = [m for m in o.milestones if not isinstance(m, int) or not 0 < m <= epochs]
        if bad:
            problems.append(f"optim.milestones {list(o.milestones)}: every milestone must be an epoch in 1..{epochs} (optim.epochs); bad: {bad}.")

    # method-specific keys
    m = cfg.method
    if "ca" in m:
        _num(cfg, "method.ca.epochs", problems, minimum=0, integer=True)
        _num(cfg, "method.ca.samples_per_class", problems, minimum=1, integer=True)
        _num(cfg, "method.ca.lr", problems, minimum=0, strict=True)
        _num(cfg, "method.stats.ridge", problems, minimum=0, strict=True)
    problems.extend(_method_problems(cfg))
    required = m.get("requires_backbone")
    if required and cfg.backbone.get("kind", "timm") != required:
        problems.append(
            f"method={m._target_.rsplit('.', 1)[-1]} needs a {required} backbone (e.g. backbone=clip_vit_b16 "
            f"or backbone=tiny_clip), but backbone is a {cfg.backbone.get('kind', 'timm')} model."
        )

    # backbone files
    ckpt = cfg.backbone.get("checkpoint_path")
    if ckpt and not Path(ckpt).is_file():
        problems.append(
            f"backbone.checkpoint_path: file '{ckpt}' does not exist. Point it at the weights file "
            "(e.g. backbone.checkpoint_path=/path/to/weights.pth)."
        )

    # data (instantiating a data config is cheap: sources only stat their folders)
    try:
        data = instantiate(cfg.data)
        problems.extend(data.problems())
    except Exception as exc:
        problems.append(f"data: cannot build '{cfg.data.get('name', '?')}': {exc}")
    return problems
