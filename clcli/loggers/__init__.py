"""Experiment loggers: the ``logger`` config group (``conf/logger/*.yaml``).

A run reports to a :class:`Loggers` fan-out on its :class:`~clcli.engine.Runtime`: the resolved
config and the environment once (:meth:`Loggers.log_hparams`), scalars with a step
(:meth:`Loggers.log_metrics`), and how it ended (:meth:`Loggers.finish`). Each backend (``csv``,
``tensorboard``, ``wandb``, ``mlflow``) is a module of this package that imports its tracker when the
config names it; a missing package is a config problem naming its extra (:meth:`Loggers.config_problems`).

What is logged, with step = the number of epochs trained so far in the run:

- ``train/*`` after every epoch of :func:`clcli.engine.fit`: ``task``, ``epoch`` (within the task),
  ``loss`` (the epoch's mean), ``lr_<i>`` (optimizer group i's learning rate at the epoch's start),
  ``images_per_s``; the same records are results.json's ``history``;
- ``acc/<task name>`` and ``acc/after_task`` after every task (its row of the accuracy matrix; a
  method that trains nothing logs task t's row at step t + 1);
- ``final/<metric>`` (the headline metrics) at the end, and the status (``complete``, ``diverged``,
  ``failed``) in :meth:`Loggers.finish`.

Only rank 0 of a multi-process run builds backends (:func:`build`); the others get an empty fan-out.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

_open: list[Loggers] = []  # fan-outs not finished yet (see closing)


class Loggers:
    """Fan-out over backends, each with ``log_hparams(config, env)``, ``log_metrics(metrics, step)``
    and ``finish(status)``. ``Loggers()`` logs nothing. Backends are given as partials called with
    the run directory (how the ``logger`` config group builds them)."""

    def __init__(self, run_dir: str | Path | None = None, **backends):
        self.backends = {name: make(Path(run_dir)) for name, make in backends.items()} if backends else {}
        if self.backends:
            _open.append(self)

    @staticmethod
    def config_problems(run_dir=None, **backends) -> list[str]:
        """Backends whose tracker is not installed, named with the extra that installs it, and each
        backend's own ``config_problems`` (what ``clcli validate`` reports; trackers are imported
        only when a run starts)."""
        from hydra.utils import get_object

        problems = []
        for name, node in backends.items():
            try:
                cls = get_object(node["_target_"])
            except Exception:  # noqa: BLE001 - clcli.config reports a target that cannot be imported
                continue
            module, extra = getattr(cls, "requires", (None, None))
            if module is not None and find_spec(module) is None:
                problems.append(f"logger.{name}: the {module} package is not installed; install it with "
                                f"pip install 'clcli[{extra}]', or choose other loggers (e.g. logger=csv).")
            if hasattr(cls, "config_problems"):  # the backend's own value checks
                problems += cls.config_problems(**{k: v for k, v in node.items() if not str(k).startswith("_")})
        return problems

    def log_hparams(self, config: dict, env: dict) -> None:
        for b in self.backends.values():
            b.log_hparams(config, env)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log finite numbers (integers stay integers: task, epoch) under tracker-safe keys
        (letters, digits, ``_-./`` and spaces)."""
        clean = {metric_key(k): int(v) if isinstance(v, numbers.Integral) else float(v) for k, v in metrics.items()
                 if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            for b in self.backends.values():
                b.log_metrics(clean, step)

    def finish(self, status: str) -> None:
        """Close every backend once, recording ``status``."""
        backends, self.backends = self.backends, {}
        if self in _open:
            _open.remove(self)
        for b in backends.values():
            b.finish(status)


def build(node, run_dir: Path) -> Loggers:
    """The fan-out the ``logger`` node describes (``None`` or ``logger=[]``: none)."""
    if node is None or not [k for k in node if not str(k).startswith("_")]:
        return Loggers()
    from hydra.utils import instantiate

    return instantiate(node, run_dir=str(run_dir))


@contextlib.contextmanager
def closing() -> Iterator[None]:
    """Finish, as ``failed``, every fan-out built in the block and still open when it ends (an
    exception): trackers then show the run as failed instead of running forever."""
    start = len(_open)
    try:
        yield
    finally:
        while len(_open) > start:
            _open[-1].finish("failed")


def metric_key(key: str) -> str:
    """``key`` with every character outside ``[A-Za-z0-9_\\-./ ]`` replaced by ``_`` (MLflow's rule,
    applied for every backend so that the keys agree)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(key))


def epoch_metrics(record: dict) -> dict:
    """The ``train/*`` scalars of one results.json ``history`` record."""
    out = {"train/task": record["task"], "train/epoch": record["epoch"], "train/loss": record["loss"],
           "train/images_per_s": record["images_per_s"]}
    out.update({f"train/lr_{i}": lr for i, lr in enumerate(record["lrs"])})
    return out


def accuracy_step(history: list[dict], task: int) -> int:
    """The step of task ``task``'s accuracy row: the epochs trained up to its end (at least task + 1)."""
    return max(sum(h["task"] is not None and h["task"] <= task for h in history), task + 1)


def log_accuracy(loggers: Loggers, history: list[dict], task: int, row: dict) -> None:
    """Task ``task``'s row of the accuracy matrix (``{task name: accuracy %}``; NaN: not evaluated)."""
    loggers.log_metrics({"acc/after_task": task, **{f"acc/{name}": v for name, v in row.items()}},
                        accuracy_step(history, task))


def replay(loggers: Loggers, history: list[dict], rows: list[dict]) -> None:
    """Log again what a resumed run restored (the epochs in ``history``, the accuracy row of every
    finished task in ``rows``), so that the trackers' new run holds the whole run."""
    for task, row in enumerate(rows):
        for step, record in enumerate(history, 1):
            if record["task"] == task:
                loggers.log_metrics(epoch_metrics(record), step)
        log_accuracy(loggers, history, task, row)


def log_final(loggers: Loggers, history: list[dict], finished: int, metrics: dict) -> None:
    """The headline metrics as ``final/<name>``, at the last step."""
    step = max(len(history), accuracy_step(history, finished - 1) if finished else 0)
    loggers.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step)


def flatten(config, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` for the leaves of nested dicts; lists and ``None`` become strings
    (what hyper-parameter tables take)."""
    out = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out
