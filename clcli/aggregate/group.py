"""Grouping and statistics: runs that differ only in the repetition form one group (one table row).

Runs whose ``run`` choices and ``config`` are identical except for the keys that only name the
repetition or the machine form one group. Ignored: ``seed`` and ``train_seed``; ``device``,
``resume``, ``redo_diverged``, ``paths``, ``loader``, ``checkpoint``, ``guard`` (where and how safely
it ran; ``precision`` and ``eval`` are kept: they change numerics, e.g. DIKI's batch-wise task vote
depends on ``eval.batch_size``); the ``paper`` block (metadata); the ``sweep`` choice (which preset
launched the run); and any leaf whose name ends in ``seed`` and whose value equals the run's ``seed``
(interpolations such as ``data.class_order_seed: ${seed}``).

Per group and headline metric (:func:`clcli.aggregate.kinds.headline_metrics`): mean, *sample*
standard deviation (``ddof=1``) and ``n`` (runs with a value) over the group's *complete* runs
(``status``); runs that stopped early (``diverged``) are never averaged in but counted in the outcome
(``diverged 1/3``), next to runs with collapse warnings (``collapse 2/3``). With ``n = 1`` the std is
undefined (``None``, shown as ``–``), never a misleading 0.

Row labels: the run choices that vary between groups (an ``experiment`` name replaces the choices it
determines; ``optim`` is left out where it equals ``data``, the default), plus the config values that
differ between groups with the same choices (e.g. ``optim.lr.representation=0.001`` in a
learning-rate sweep). Choices shared by every group go into the table title (:func:`common_choices`).
Groups are sorted as the papers' tables: scenario kind, backbone, benchmark, method (:data:`METHOD_RANK`),
then without before with classifier alignment (``method.ca.enabled``: L2P, then L2P + CA).
"""
from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clcli.aggregate.kinds import headline_metrics
from clcli.aggregate.load import collapsed, complete_runs, is_number, status_of
from clcli.evaluation import scenario_kind

# Config keys that say *where/how* a run ran or *which repetition* it is, not *what* was run.
IGNORED_CONFIG_KEYS = {"seed", "train_seed", "device", "resume", "redo_diverged", "paths", "loader", "checkpoint",
                       "guard", "paper", "hydra"}
IGNORED_CHOICES = {"sweep"}  # the preset that launched a run does not change it
CHOICE_ORDER = ("experiment", "method", "data", "backbone", "optim")

# Row order follows the papers' tables: pre-training block, benchmark column order, method row order.
DATA_RANK = {"split_cifar100": 0, "split_imagenet_r": 1, "split_cub200": 2, "split_cars196": 3,
             "mtil": 0, "mtil_order2": 1, "mtil_fewshot": 2}
# Methods as SLCA's table lists them (joint training, the upper bound, first; the prompt baselines before
# SLCA; SLCA++ after it), MTIL's as DIKI's (zero-shot first); a method without classifier alignment
# comes directly before its `method.ca.enabled=true` variant (:func:`_sort_key`).
METHOD_RANK = {"joint": 0, "zeroshot": 1, "seq_ft": 2, "clip_ft": 2, "frozen": 3, "l2p": 4, "dualprompt": 5,
               "coda_prompt": 6, "slow_learner": 7, "slca": 8, "slcapp": 9, "diki": 10, "zscl": 10}

DASH = "–"


def outcome_text(runs: list[dict]) -> str:
    """How the runs ended, where not all completed cleanly: ``diverged 1/3``, ``collapse 2/3``."""
    n, parts = len(runs), []
    statuses = Counter(status_of(r) for r in runs if status_of(r) != "complete")
    parts += [f"{st} {k}/{n}" for st, k in sorted(statuses.items())]
    n_collapsed = sum(map(collapsed, runs))
    if n_collapsed:
        parts.append(f"collapse {n_collapsed}/{n}")
    return "; ".join(parts)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (``optim.milestones: [18]``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def grouping_config(res: dict) -> dict[str, Any]:
    """The flattened config leaves that define *what* was run (see the module docstring)."""
    seed = res.get("seed")
    flat = flatten({k: v for k, v in res["config"].items() if k not in IGNORED_CONFIG_KEYS})
    # `class_order_seed: ${seed}` and the like are resolved to the run's seed: they vary with it.
    return {k: v for k, v in flat.items() if not (k.rsplit(".", 1)[-1].endswith("seed") and v == seed and seed is not None)}


def grouping_choices(res: dict) -> dict[str, str]:
    return {k: v for k, v in res["run"].items() if k not in IGNORED_CHOICES and not k.startswith("hydra")}


@dataclass
class Stat:
    """Mean and sample std (ddof=1) of the values present; std is None when n < 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list) -> Stat:
        vals = np.array([v for v in values if is_number(v) and not math.isnan(v)], dtype=float)
        if vals.size == 0:
            return cls(None, None, 0)
        return cls(float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else None, int(vals.size))

    def text(self, digits: int = 2, with_n: bool = True) -> str:
        if self.n == 0:
            return DASH
        std = DASH if self.std is None else f"{self.std:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {std}" + (f" (n={self.n})" if with_n else "")


@dataclass
class Group:
    """Runs that differ only in seed (and machine-level keys): one table row."""

    choices: dict[str, str]
    config: dict[str, Any]
    runs: list[dict] = field(default_factory=list)
    label: str = ""
    config_diff: dict[str, Any] = field(default_factory=dict)  # values that tell it from its siblings

    @property
    def kind(self) -> str:
        return self.runs[0]["scenario"]["kind"]

    @property
    def protocol(self) -> str | None:
        """MTIL: the protocol the runs used (results.json ``scenario.protocol.name``; ``diki``, ``zscl``),
        with the splits noted where ZSCL's own splits were not built for every dataset."""
        p = self.runs[0]["scenario"].get("protocol")
        if not isinstance(p, dict):
            return None
        name = str(p.get("name"))
        splits = set((p.get("splits") or {}).values())
        return f"{name} (CoOp splits)" if name == "zscl" and "coop" in splits else name

    @property
    def paper_protocol(self) -> str | None:
        """The protocol the paper's numbers were measured under (``paper.protocol``), if given."""
        v = (self.paper or {}).get("protocol")
        return str(v) if v else None

    @property
    def metrics(self) -> tuple[str, ...]:
        return headline_metrics(self.kind)

    @property
    def seeds(self) -> list:
        return sorted((r.get("seed") for r in self.runs), key=lambda s: (str(type(s)), s))

    @property
    def task_names(self) -> tuple[str, ...]:
        tasks = self.runs[0].get("tasks") or self.runs[0]["scenario"].get("tasks") or []
        return tuple(str(t.get("name", i)) for i, t in enumerate(tasks))

    @property
    def complete(self) -> list[dict]:
        return complete_runs(self.runs)

    @property
    def outcome(self) -> str:
        return outcome_text(self.runs)

    def stat(self, metric: str) -> Stat:
        return Stat.of([r["metrics"].get(metric) for r in self.complete])

    def per_dataset(self, metric: str) -> list[Stat]:
        """Per-dataset MTIL values (``metrics.per_dataset[metric]``), one Stat per dataset."""
        lists = [((r["metrics"].get("per_dataset") or {}).get(metric) or []) for r in self.complete]
        width = max((len(v) for v in lists), default=0)
        return [Stat.of([v[i] if i < len(v) else None for v in lists]) for i in range(width)]

    @property
    def paper(self) -> dict | None:
        blocks = [r.get("paper") for r in self.runs if r.get("paper")]
        return blocks[0] if blocks else None

    def paper_value(self, metric: str) -> float | None:
        v = (self.paper or {}).get(metric)
        return float(v) if is_number(v) else None

    def paper_kind(self, metric: str) -> str | None:
        """Where the paper value comes from (``paper.kinds``: table, figure, derived, secondary, recalled)."""
        kind = ((self.paper or {}).get("kinds") or {}).get(metric)
        return str(kind) if kind and self.paper_value(metric) is not None else None

    def paper_unverified(self, metric: str) -> bool:
        return metric in ((self.paper or {}).get("unverified") or [])

    def paper_per_dataset(self, metric: str) -> list | None:
        """Positional match: the paper's list follows the training order like ours; None if lengths differ."""
        values = ((self.paper or {}).get("per_dataset") or {}).get(metric)
        return values if isinstance(values, list) and len(values) == len(self.task_names) else None

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy after each task, mean and std over runs: ``metrics.seen_acc`` (CIL) or, for
        MTIL, the mean of each accuracy-matrix row (all datasets, future ones included)."""
        curves = []
        for r in self.complete:
            c = r["metrics"].get("seen_acc")
            if c is None and r.get("accuracy_matrix"):
                c = [np.mean([v for v in row if v is not None]) if any(v is not None for v in row) else np.nan
                     for row in r["accuracy_matrix"]]
            if c:
                curves.append([np.nan if v is None else float(v) for v in c])
        if not curves:
            return np.array([]), np.array([])
        width = max(len(c) for c in curves)
        arr = np.array([c + [np.nan] * (width - len(c)) for c in curves], dtype=float)
        with warnings.catch_warnings():  # an all-NaN column (missing point) stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            std = np.nanstd(arr, axis=0, ddof=1) if len(curves) > 1 else np.zeros(width)
            return np.nanmean(arr, axis=0), np.nan_to_num(std)


def canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def group_runs(results: list[dict]) -> list[Group]:
    """Group runs by (choices, grouping config), label and sort the groups (see the module docstring)."""
    groups: dict[str, Group] = {}
    for res in results:
        choices, config = grouping_choices(res), grouping_config(res)
        key = canon([choices, config, res["scenario"]["kind"]])
        groups.setdefault(key, Group(choices, config)).runs.append(res)
    out = list(groups.values())
    _label(out)
    out.sort(key=_sort_key)
    return out


def fmt_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if is_number(v):
        return repr(v)
    return json.dumps(v, default=str)


def ordered_choices(groups: list[Group]) -> list[str]:
    seen = {k for g in groups for k in g.choices}
    return [k for k in CHOICE_ORDER if k in seen] + sorted(seen - set(CHOICE_ORDER))


def varying_choices(groups: list[Group]) -> list[str]:
    """Choices that differ between groups (candidates for the row labels)."""
    return [k for k in ordered_choices(groups) if len({g.choices.get(k) for g in groups}) > 1]


def _determined_by_experiment(groups: list[Group], key: str) -> bool:
    """True when every experiment name maps to one value of ``key`` (the name already says it)."""
    by_exp: dict[Any, set] = {}
    for g in groups:
        if g.choices.get("experiment") is not None:
            by_exp.setdefault(g.choices["experiment"], set()).add(g.choices.get(key))
    return bool(by_exp) and all(len(v) == 1 for v in by_exp.values())


def common_choices(groups: list[Group]) -> dict[str, str]:
    """Choices shared by every group (the title); a nested group's choice (``optim/optimizer``) only
    where it varies: its parent option already names it."""
    return {k: groups[0].choices.get(k) for k in ordered_choices(groups)
            if len({g.choices.get(k) for g in groups}) == 1 and groups[0].choices.get(k) is not None and "/" not in k
            and not (k == "optim" and groups[0].choices.get("optim") == groups[0].choices.get("data"))}


def _label(groups: list[Group]) -> None:
    """Readable, unique labels: varying choices + config values that differ among siblings (groups
    with the same choices, e.g. the points of a learning-rate sweep)."""
    shown = varying_choices(groups)
    implied = {k for k in shown if k != "experiment" and _determined_by_experiment(groups, k)}
    siblings: dict[str, list[Group]] = {}
    for g in groups:
        siblings.setdefault(canon(g.choices), []).append(g)
    for sib in siblings.values():
        keys = sorted({k for g in sib for k in g.config})
        diff = [k for k in keys if len({canon(g.config.get(k, "<unset>")) for g in sib}) > 1]
        for g in sib:
            g.config_diff = {k: g.config.get(k) for k in diff}
    for g in groups:
        parts = []
        for k in shown:
            v = g.choices.get(k)
            if v is None or (k in implied and g.choices.get("experiment") is not None):
                continue  # an experiment name already says which method/data/backbone it uses
            if k == "optim" and v == g.choices.get("data"):
                continue  # the default `optim: ${data}`: nothing to tell
            parts.append(str(v) if k == "experiment" else f"{k}={v}")
        parts += [f"{k}={fmt_value(v)}" for k, v in g.config_diff.items()]
        if not parts:  # a single group, or groups told apart by nothing shown: name the run itself
            parts = [str(g.choices[k]) for k in ("experiment", "method", "data", "backbone") if g.choices.get(k)]
        g.label = " ".join(parts) or "run"
    counts = Counter(g.label for g in groups)
    seen: Counter = Counter()
    for g in groups:  # never two rows with the same name
        if counts[g.label] > 1:
            seen[g.label] += 1
            g.label = f"{g.label} #{seen[g.label]}"


def _value_key(v: Any) -> tuple:
    return (0, float(v), "") if is_number(v) else (1, 0.0, canon(v))


def _sort_key(g: Group) -> tuple:
    c = g.choices
    return (scenario_kind(g.kind).rank, str(c.get("backbone", "")), DATA_RANK.get(c.get("data"), 99),
            str(c.get("data", "")), METHOD_RANK.get(c.get("method"), 50), str(c.get("method", "")),
            g.config.get("method.ca.enabled") is True, str(c.get("experiment", "")), canon(c),
            tuple(_value_key(v) for v in g.config_diff.values()))

