"""Accuracy matrix of counts and the papers' metrics as pure functions.

``AccuracyMatrix`` holds correct/total counts per (after-task row, evaluated-task column); accuracies
are percentages (0–100) like the papers report. Class-incremental metrics follow SLCA
(docs/metrics.md#accuracy-matrix): the accuracy after task t is top-1 over *all seen classes*
(sample-weighted over the seen tasks' test sets); Last-Acc is the final one, Inc-Acc the mean of the
per-task values each rounded to 2 decimals first. MTIL metrics follow ZSCL/DIKI (docs/metrics.md#mtil-transfer).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class AccuracyMatrix:
    """``T×T`` correct/total counts; ``-1`` totals mark cells that were not evaluated."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.correct = np.zeros((num_tasks, num_tasks), dtype=np.int64)
        self.total = np.full((num_tasks, num_tasks), -1, dtype=np.int64)

    def record(self, after: int, task: int, correct: int, total: int) -> None:
        self.correct[after, task], self.total[after, task] = int(correct), int(total)

    def percent(self) -> np.ndarray:
        """Accuracy in percent, NaN where not evaluated."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = 100.0 * self.correct / self.total
        out[self.total <= 0] = np.nan
        return out

    def prefix(self, k: int) -> AccuracyMatrix:
        """The first ``k`` tasks as a run of ``k`` tasks (rows and columns ``< k``)."""
        out = AccuracyMatrix(k)
        out.correct, out.total = self.correct[:k, :k].copy(), self.total[:k, :k].copy()
        return out

    def seen_accuracy(self) -> np.ndarray:
        """Per row: accuracy over every evaluated cell pooled (SLCA's top-1 over all seen classes)."""
        mask = self.total > 0
        c = np.where(mask, self.correct, 0).sum(1)
        n = np.where(mask, self.total, 0).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, 100.0 * c / np.maximum(n, 1), np.nan)

    def state_dict(self) -> dict:
        return {"correct": self.correct.tolist(), "total": self.total.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.correct = np.asarray(state["correct"], dtype=np.int64)
        self.total = np.asarray(state["total"], dtype=np.int64)
        self.num_tasks = self.correct.shape[0]


def last_acc(seen: np.ndarray) -> float:
    """Last-Acc: accuracy over all classes after the final task."""
    return float(seen[-1])


def inc_acc(seen: np.ndarray) -> float:
    """Inc-Acc: mean over tasks of the seen-class accuracy, each rounded to 2 decimals first."""
    return float(np.mean(np.round(seen, 2)))


def forgetting(acc: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018): for every task but the last, the best accuracy it
    had before the final step minus its final accuracy, averaged. ``acc`` is the T×T percent matrix
    of a class-incremental run (row = after task, column = task). 0 for a single task."""
    T = acc.shape[0]
    if T < 2:
        return 0.0
    drops = [np.nanmax(acc[j : T - 1, j]) - acc[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def mtil_metrics(acc: np.ndarray) -> dict:
    """Transfer / Avg / Last of a T×T MTIL matrix (rows = stages, columns = datasets in training
    order; docs/metrics.md#mtil-transfer). Per-dataset lists (Transfer has none for dataset 0, given as None)
    and means rounded to 1 decimal as the papers report them."""
    T = acc.shape[0]
    transfer = [None] + [float(np.mean(acc[:i, i])) for i in range(1, T)]
    avg = [float(np.mean(acc[:, i])) for i in range(T)]
    last = [float(acc[T - 1, i]) for i in range(T)]
    return {
        "transfer": round(float(np.mean(transfer[1:])), 1) if T > 1 else None,
        "avg": round(float(np.mean(avg)), 1),
        "last": round(float(np.mean(last)), 1),
        "per_dataset": {"transfer": transfer, "avg": avg, "last": last},
    }


def cil_metrics(matrix: AccuracyMatrix) -> dict:
    """Last-Acc, Inc-Acc, forgetting and the per-step seen-class accuracies of a CIL run."""
    seen = matrix.seen_accuracy()
    return {
        "last_acc": last_acc(seen),
        "inc_acc": inc_acc(seen),
        "forgetting": forgetting(matrix.percent()),
        "seen_acc": [float(v) for v in seen],
    }


@dataclass(frozen=True)
class ScenarioKind:
    """What a scenario kind means everywhere it matters: which tasks are evaluated and over which
    labels, its metrics, its headline columns, and how tables and plots name it. ``name`` is the
    ``scenario.kind`` string of results.json (old files keep loading: the strings never change)."""

    name: str
    title: str                     # table/plot titles
    headline: tuple[str, ...]      # headline metrics, in the papers' column order
    metrics: Callable[[AccuracyMatrix], dict]
    evaluates_future_tasks: bool   # after task t: every task (zero-shot transfer) or the seen ones
    task_label_space: bool         # a test image is classified over its own task's classes, else over all seen
    per_dataset: bool              # per-task metric lists (metrics.per_dataset): tables and curves per task
    curve_label: str               # y label of the accuracy-after-each-task curve of a group of runs
    rank: int                      # order of the kinds in tables and figures
    optional: tuple[str, ...] = ()  # metrics some methods add (tables show them where present)


CLASS_INCREMENTAL = ScenarioKind(
    name="class_incremental", title="Class-incremental", headline=("last_acc", "inc_acc", "forgetting"),
    metrics=cil_metrics, evaluates_future_tasks=False, task_label_space=False, per_dataset=False,
    curve_label="accuracy on seen classes (%)", rank=0,
    optional=("probe_last", "probe_inc"))  # the representation probe (clcli/probe.py)
DOMAIN_CLASS_INCREMENTAL = ScenarioKind(
    name="domain_class_incremental", title="MTIL", headline=("transfer", "avg", "last"),
    metrics=lambda m: mtil_metrics(m.percent()), evaluates_future_tasks=True, task_label_space=True,
    per_dataset=True, curve_label="mean accuracy, all datasets (%)", rank=1)
SCENARIO_KINDS = {k.name: k for k in (CLASS_INCREMENTAL, DOMAIN_CLASS_INCREMENTAL)}


def scenario_kind(name: str | None) -> ScenarioKind:
    """The kind named ``name`` (``scenario.kind`` of a results file); class-incremental for a name
    this version does not know, as results without a known kind were always read."""
    return SCENARIO_KINDS.get(name, CLASS_INCREMENTAL)  # type: ignore[arg-type]


def outcome_metrics(kind: ScenarioKind, matrix: AccuracyMatrix, finished: int) -> dict:
    """``metrics`` of a complete run. A run that stopped early has its headline metrics null (no
    table averages a run that did not finish) and ``partial_metrics``: the same metrics over the
    tasks it finished, as if the scenario had ended there (null when none finished)."""
    if finished == matrix.num_tasks:
        return {"metrics": kind.metrics(matrix)}
    partial = kind.metrics(matrix.prefix(finished)) if finished else None
    return {"metrics": {k: None for k in kind.headline}, "partial_metrics": partial, "finished_tasks": finished}
