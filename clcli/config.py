"""Semantic checks of a composed config: every problem listed at once, before anything is loaded.

Hydra refuses an unknown key in ``key=value`` (struct mode), but ``+key=value`` adds any key; so
:func:`key_problems` refuses every key no code reads: the primary config's own keys, ``optim``'s keys
(:data:`clcli.optim.OPTIM_KEYS`) and, for a component with a ``_target_`` (``method``, ``backbone``,
``data``, ``data.source``, ``optim.optimizer``), the arguments of its target. Then come the checks
that need meaning: generic ranges and schedules here, and the checks each component owns: the
method's ``config_problems(optim, backbone_class, backbone_cfg=..., **keys)`` (its nested keys, the
learning rates and backbone it needs), the backbone's ``config_problems(**keys)`` (weights files), the
data's ``problems()`` (task splits, missing data). ``clcli validate <overrides>`` prints them;
``clcli train`` runs them first.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from clcli.optim import METHOD_OPTIM_KEYS, OPTIM_KEYS, OPTIMIZER_ARGS, SCHEDULE_KEYS, SCHEDULES, build, optimizer_factory

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FREE_KEYS = ("paper",)  # an experiment's metadata (`clcli table` prints it): any keys
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# Constructor arguments the training loop passes itself, never config keys: component -> (args, what sets them).
PASSED_ARGS = {
    "method": (("backbone", "optim", "runtime"), "the training loop passes it"),
    "optim.optimizer": (OPTIMIZER_ARGS, "the learning rates are optim.lr.representation / optim.lr.classifier"),
}


# ----------------------------------------------------------------------------------- helpers


def number_problem(key: str, value: Any, *, minimum: float | None = None, strict: bool = False,
                   integer: bool = False, optional: bool = False) -> list[str]:
    """``[problem]`` when ``value`` is not a number (an integer) within range, else ``[]``."""
    expected = "an integer" if integer else "a number"
    if value is None:
        return [] if optional else [f"{key}: expected {expected}, got null."]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return [f"{key}: expected {expected}, got {value!r}."]
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        return [f"{key}: must be {'>' if strict else '>='} {minimum}, got {value}."]
    return []


def select_number(cfg, key: str, problems: list[str], *, label: str | None = None, **rule):
    """Check ``cfg.<key>`` with :func:`number_problem` (a missing ``???`` value or a broken
    interpolation is a problem, not an exception); returns the value when it has the right type."""
    label = label or key
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as exc:  # noqa: BLE001 - missing (???) or a broken interpolation
        problems.append(f"{label}: {exc}")
        return None
    found = number_problem(label, value, **rule)
    problems.extend(found)
    typed = not any(" expected " in p for p in found)
    return value if typed else None


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``word`` (difflib ratio >= 0.6), for a "did you mean" hint."""
    match = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_problem(path: str, known: Iterable[str]) -> str:
    """``path`` is read by nothing: say so, with the closest known name and the known ones."""
    where, _, name = path.rpartition(".")
    known = sorted(set(known))
    match = closest(name, known)
    hint = f" Did you mean {where + '.' if where else ''}{match}?" if match else ""
    return (f"{path}: unknown key, nothing reads it.{hint} {where or 'The top level'} takes: {', '.join(known)}. "
            "Fix the name, or drop the override (a +key=value override adds any key).")


def dict_key_problems(value, known: Iterable[str], path: str, required: bool = True) -> list[str]:
    """Unknown keys of a plain dict a component reads (e.g. ``method.ca``), and, when ``required``,
    the known keys it lacks."""
    known = tuple(known)
    keys = list(value.keys()) if hasattr(value, "keys") else []
    problems = [unknown_key_problem(f"{path}.{k}", known) for k in keys if k not in known]
    if required:
        problems += [f"{path}.{k}: missing; {path} needs {', '.join(known)}." for k in known if k not in keys]
    return problems


def _flat(d: dict, prefix: str = ""):
    """``(dotted path, value)`` of the leaves of a plain dict; a component (a dict with a ``_target_``)
    is one leaf."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and "_target_" not in v:
            yield from _flat(v, path + ".")
        else:
            yield path, v


def _with_prefixes(paths: Iterable[str]) -> set[str]:
    out = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def target_class(target: str):
    """The class a ``_target_`` builds: the target itself, or a factory's return annotation."""
    obj = get_object(target)
    if inspect.isclass(obj):
        return obj
    returned = typing.get_type_hints(obj).get("return")
    return returned if inspect.isclass(returned) else None


def _parameters(target: str) -> tuple[set[str], bool]:
    """Keyword arguments ``target`` accepts, and whether it takes any (``**kwargs``). A factory with
    ``**kwargs`` that declares the class it returns accepts that class's arguments."""
    obj = get_object(target)
    params = inspect.signature(obj).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if var_kw and not inspect.isclass(obj) and (cls := target_class(target)) is not None:
        more, var_kw = _parameters(f"{cls.__module__}.{cls.__qualname__}")
        names |= more
    return names, var_kw


# ----------------------------------------------------------------------------------- unknown keys


@lru_cache(maxsize=1)
def _primary() -> tuple[frozenset[str], frozenset[str]]:
    """(config groups, leaf paths) of the primary config ``conf/config.yaml``."""
    from clcli.cli import _config_dir

    raw = OmegaConf.to_container(OmegaConf.load(Path(_config_dir()) / "config.yaml"), resolve=False)
    # groups that put a node of their name in the config (not `experiment: null`, a _global_ preset)
    groups = {next(iter(e)).split()[-1] for e in raw.pop("defaults", []) if isinstance(e, dict) and next(iter(e.values()))}
    raw.pop("hydra", None)
    return frozenset(groups), frozenset(p for p, _ in _flat(raw))


def _component_problems(node: dict, where: str) -> list[str]:
    """Keys of a ``_target_`` component that its target does not take (nested components too)."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        return [f"{where}._target_: missing; {where} needs the class or function that builds it."]
    try:
        accepted, any_key = _parameters(target)
    except Exception as exc:  # noqa: BLE001 - a bad _target_ is reported, not raised
        return [f"{where}._target_: cannot import '{target}' ({type(exc).__name__}: {exc})."]
    passed, why = PASSED_ARGS.get(where, ((), ""))
    problems = []
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key in passed:
            problems.append(f"{where}.{key}: not a config key ({why}); remove it.")
        elif key not in accepted and not any_key:
            moved = _moved_keys(target).get(key)
            problems.append(f"{where}.{key}: replaced by {moved}; remove {where}.{key} and set {moved}={value!r} "
                            "instead." if moved else unknown_key_problem(f"{where}.{key}", accepted - set(passed)))
        elif isinstance(value, dict) and "_target_" in value:
            problems += _component_problems(value, f"{where}.{key}")
    return problems


def _moved_keys(target: str) -> dict[str, str]:
    """A component class's ``moved_keys`` (old key -> the key that replaced it), or none."""
    try:
        return dict(getattr(target_class(target), "moved_keys", None) or {})
    except Exception:  # noqa: BLE001 - an unimportable target is reported elsewhere
        return {}


def _plain_problems(node: dict, allowed: Iterable[str], where: str) -> list[str]:
    """Leaves of a plain node that are not among ``allowed`` (dotted paths relative to the node)."""
    allowed = set(allowed)
    problems = []
    for path, value in _flat(node):
        if path not in allowed:
            problems.append(unknown_key_problem(f"{where}.{path}", _with_prefixes(allowed)))
        elif isinstance(value, dict) and "_target_" in value:
            problems += _component_problems(value, f"{where}.{path}")
    return problems


def key_problems(cfg: DictConfig) -> list[str]:
    """Every key of ``cfg`` that no code reads, named, with the closest known name."""
    groups, leaves = _primary()
    raw = OmegaConf.to_container(cfg, resolve=False)
    problems = []
    top_leaves = {p.split(".")[0] for p in leaves}
    for key, value in raw.items():
        if key in FREE_KEYS or key == "hydra":
            continue
        if key == "optim" and isinstance(value, dict):
            problems += _plain_problems(value, OPTIM_KEYS, "optim")
        elif key in groups and isinstance(value, dict):
            problems += _component_problems(value, key)
        elif key in top_leaves and isinstance(value, dict):
            prefix = key + "."
            problems += _plain_problems(value, [p[len(prefix):] for p in leaves if p.startswith(prefix)], key)
        elif key not in top_leaves and key not in groups:
            problems.append(unknown_key_problem(key, top_leaves | groups | set(FREE_KEYS)))
    return problems


# ----------------------------------------------------------------------------------- owners' checks


def _owner_problems(cfg: DictConfig, group: str, *args, **extra) -> list[str]:
    """The ``config_problems`` of the class ``cfg.<group>`` builds (the same checks its constructor
    runs), called with ``args``, the group's keys and ``extra`` keywords, so that ``clcli validate``
    reports them without loading anything."""
    node = cfg[group]
    target = node.get("_target_")
    try:
        cls = target_class(target)
    except Exception:  # noqa: BLE001 - key_problems reports a target that cannot be imported
        return []
    check = getattr(cls, "config_problems", None)
    if check is None:
        return []
    try:
        kwargs = OmegaConf.to_container(node, resolve=True)
        for key in HYDRA_KEYS:
            kwargs.pop(key, None)
        return list(check(*args, **kwargs, **extra))
    except Exception as exc:  # noqa: BLE001 - e.g. a missing (???) value: reported, never raised
        return [f"{group}: cannot check the keys of {target} ({type(exc).__name__}: {exc})."]


def _optim_problems(cfg: DictConfig) -> list[str]:
    """``optim``: the representation lr, epochs, batch size, the schedule and the keys it reads, and
    the optimizer component built once on a dummy tensor (its own argument checks)."""
    problems: list[str] = []
    o = cfg.optim
    select_number(cfg, "optim.lr.representation", problems, minimum=0)
    iterations = o.get("iterations")
    if iterations is None:
        epochs = select_number(cfg, "optim.epochs", problems, minimum=1, integer=True)
    else:  # iteration-based tasks (clcli.engine.fit_iterations): epochs is not read
        epochs = None
        select_number(cfg, "optim.iterations", problems, minimum=1, integer=True)
    if o.get("warmup") is not None:
        select_number(cfg, "optim.warmup", problems, minimum=0, integer=True)
    if o.get("label_smoothing") is not None and not number_problem("x", o.label_smoothing) and \
            not 0 <= o.label_smoothing < 1:
        problems.append(f"optim.label_smoothing: must be in [0, 1), got {o.label_smoothing}.")
    select_number(cfg, "optim.batch_size", problems, minimum=1, integer=True)
    if o.schedule not in SCHEDULES:
        problems.append(f"optim.schedule: unknown '{o.schedule}' (known: {', '.join(SCHEDULES)}).")
    else:
        reads = SCHEDULE_KEYS[o.schedule]
        for key in sorted({k for keys in SCHEDULE_KEYS.values() for k in keys} - set(reads)):
            if key in o:
                users = [s for s, keys in SCHEDULE_KEYS.items() if key in keys]
                problems.append(f"optim.{key}: not read by optim.schedule={o.schedule} (only by {', '.join(users)}); "
                                f"remove it (~optim.{key}) or choose a schedule that reads it.")
        if o.schedule == "multistep":
            if "milestones" not in o:
                problems.append("optim.milestones: optim.schedule=multistep needs the epochs after which the lr "
                                "drops (e.g. +optim.milestones=[18]).")
            elif isinstance(epochs, int):
                # a milestone past the last epoch is legal (no drop in this run: optim.epochs=1 for a check)
                bad = [m for m in o.milestones if not isinstance(m, int) or m < 1]
                if bad:
                    problems.append(f"optim.milestones {list(o.milestones)}: every milestone must be a positive "
                                    f"epoch number (the lr drops after it); bad: {bad}.")
    if "optimizer" not in o:
        problems.append("optim.optimizer: missing; choose one with optim/optimizer=sgd (or sgd_plain, adamw).")
    elif not _component_problems(OmegaConf.to_container(o.optimizer, resolve=False), "optim.optimizer"):
        try:
            build(optimizer_factory(o), [([torch.nn.Parameter(torch.zeros(1))], 1.0)])
        except Exception as exc:  # noqa: BLE001 - the optimizer's own argument checks, reported
            problems.append(f"optim.optimizer: {o.optimizer.get('_target_')} refuses its arguments "
                            f"({type(exc).__name__}: {exc}).")
    return problems


@lru_cache(maxsize=1)
def _method_optim_readers() -> dict[str, tuple[str, tuple[str, ...]]]:
    """``_target_`` -> (option name, the :data:`~clcli.optim.METHOD_OPTIM_KEYS` it reads) of every
    ``conf/method/*.yaml`` (the ``optim_keys`` attribute of the class it builds)."""
    from clcli.cli import _config_dir

    out = {}
    for f in sorted((Path(_config_dir()) / "method").glob("*.yaml")):
        node = OmegaConf.load(f)  # `@package _global_` options nest it under `method`
        target = (node.get("method") or {}).get("_target_") or node.get("_target_")
        if not isinstance(target, str):
            continue
        try:
            out[target] = (f.stem, tuple(getattr(target_class(target), "optim_keys", ())))
        except Exception:  # noqa: BLE001 - a broken option is reported when it is chosen
            continue
    return out


def _method_optim_problems(cfg: DictConfig) -> list[str]:
    """A non-null ``optim.iterations`` / ``optim.label_smoothing`` with a method that does not read it
    (its class's ``optim_keys``): refused, naming the methods that do."""
    target = cfg.method.get("_target_")
    try:
        cls = target_class(target)
    except Exception:  # noqa: BLE001 - key_problems reports it
        return []
    if cls is None:
        return []
    readers = _method_optim_readers()
    name = readers.get(target, (cls.__name__, ()))[0]
    reads = tuple(getattr(cls, "optim_keys", ()))
    problems = []
    for key in METHOD_OPTIM_KEYS:
        if cfg.optim.get(key) is not None and key not in reads:
            users = sorted(n for n, keys in readers.values() if key in keys)
            what = ("trains by epochs (optim.epochs)" if key == "iterations" else "has no label-smoothed loss")
            problems.append(f"optim.{key}: method={name} {what} and does not read it; only "
                            f"{', '.join(users)} do. Remove it (optim.{key}=null) or choose one of those methods.")
    return problems


def check_config(cfg: DictConfig) -> list[str]:
    """Return every problem found in ``cfg`` (empty list = valid). Cheap: no data, no weights."""
    problems = key_problems(cfg)
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        problems.append(f"device: expected auto, cpu or cuda[:N], got '{cfg.device}'.")
    elif str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device} but no CUDA GPU is visible; use device=auto or device=cpu.")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision: expected one of {', '.join(PRECISIONS)}, got '{cfg.precision}'.")
    select_number(cfg, "seed", problems, minimum=0, integer=True)
    select_number(cfg, "train_seed", problems, minimum=0, integer=True, optional=True)
    if cfg.loader.num_workers != "auto":
        select_number(cfg, "loader.num_workers", problems, minimum=0, integer=True)
    for key in ("tf32", "compile", "channels_last"):
        if not isinstance(cfg.perf[key], bool):
            problems.append(f"perf.{key}: expected true or false, got {cfg.perf[key]!r}.")
    select_number(cfg, "eval.batch_size", problems, minimum=1, integer=True)
    for split in ("train", "eval"):
        select_number(cfg, f"limit_batches.{split}", problems, minimum=1, integer=True, optional=True)
    select_number(cfg, "guard.max_loss_factor", problems, minimum=1)
    select_number(cfg, "guard.chance_loss_ratio", problems, minimum=0)
    if cfg.checkpoint.keep not in ("all", "last"):
        problems.append(f"checkpoint.keep: expected all or last, got '{cfg.checkpoint.keep}'.")
    problems += _optim_problems(cfg) + _method_optim_problems(cfg)

    # the components' own checks: the method (given the backbone's class and config node: e.g. a
    # prompt method reads backbone.model_name to refuse a CNN), the backbone, the data
    try:
        backbone_cls = target_class(cfg.backbone.get("_target_"))
    except Exception:  # noqa: BLE001 - key_problems reports it
        backbone_cls = None
    problems += _owner_problems(cfg, "method", cfg.optim, backbone_cls, backbone_cfg=cfg.backbone)
    problems += _owner_problems(cfg, "backbone")
    if "logger" in cfg:  # the trackers' packages and settings (clcli.loggers)
        problems += _owner_problems(cfg, "logger")
    if any(p.startswith("data.") for p in problems):
        return problems  # the data config's unknown keys are listed; it cannot be built with them
    try:  # instantiating a data config is cheap: sources only stat their folders
        data = instantiate(cfg.data)
        problems.extend(data.problems())
    except Exception as exc:
        problems.append(f"data: cannot build '{cfg.data.get('name', '?')}': {exc}")
        return problems
    return problems + _scenario_problems(cfg, getattr(data, "kind", None))


def _scenario_problems(cfg: DictConfig, kind) -> list[str]:
    """A method that needs a kind of scenario (``scenario_problems(kind, data_name)``, e.g. DIKI needs
    MTIL) checked against the kind the data config builds."""
    try:
        check = getattr(target_class(cfg.method.get("_target_")), "scenario_problems", None)
    except Exception:  # noqa: BLE001 - key_problems reports a target that cannot be imported
        return []
    return list(check(kind, cfg.data.get("name", "?"))) if check is not None and kind is not None else []
