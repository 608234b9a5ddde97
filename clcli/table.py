"""``clcli table DIR``: fold a sweep's ``results.json`` files into mean ± std tables beside the
papers' numbers (DESIGN principle 7: a paper table is data).

Usage::

    clcli table DIR [--format md|csv|latex] [--output FILE] [--plot FILE] [--plot-x KEY]

``--plot-x KEY`` (``clcli.series``) draws each headline metric against a swept config key instead.

What it does, in order:

1. **Load.** Every ``results.json`` under ``DIR`` (recursively). Directory names are never parsed:
   everything comes from the file (``run`` = Hydra's config-group choices, ``config`` = the resolved
   config, ``metrics``, ``scenario.kind``, ``paper``). A file that is not valid JSON or lacks one of
   these keys stops the command with exit code 2 and names the file.
2. **Group.** Runs whose ``run`` choices and ``config`` are identical except for the keys that only
   name the repetition or the machine form one group (one table row). Ignored: ``seed`` and
   ``train_seed``; ``device``, ``resume``, ``redo_diverged``, ``paths``, ``loader``, ``checkpoint``,
   ``guard`` (where and how safely it ran; ``precision`` and ``eval`` are kept: they change numerics,
   e.g. DIKI's batch-wise task vote depends on ``eval.batch_size``); the ``paper`` block
   (metadata); the ``sweep`` choice (which preset launched the run); and any leaf whose name ends in
   ``seed`` and whose value equals the run's ``seed`` (interpolations such as
   ``data.class_order_seed: ${seed}``).
3. **Summarise.** Per group and headline metric: mean, *sample* standard deviation (``ddof=1``) and
   ``n`` (runs with a value) over the group's *complete* runs (``status``); runs that stopped early
   (``diverged``) are never averaged in but counted in an ``outcome`` column (``diverged 1/3``), next to
   runs with collapse warnings (``collapse 2/3``). With ``n = 1`` the std is undefined and shown as ``–`` (empty in CSV),
   never as a misleading 0. Headline metrics: class-incremental (SLCA, arXiv 2303.05118;
   docs/metrics.md#last-acc): ``last_acc``, ``inc_acc``, ``forgetting``; MTIL (ZSCL's definitions, used by DIKI,
   arXiv 2407.05342; docs/metrics.md#mtil-transfer): ``transfer``, ``avg``, ``last``, plus a per-dataset table.
4. **Compare.** When the group's runs carry a ``paper`` block (written from the experiment file's
   ``paper:`` key), the paper value and ``Δ = ours − paper`` stand beside each metric; values listed
   in ``paper.unverified`` are marked ``*``; sources and notes are printed under the table.

Row labels: the run choices that vary between groups (an ``experiment`` name replaces the choices
it determines; ``optim`` is left out where it equals ``data``, the default), plus the config values that differ between groups with the same choices (e.g.
``optim.lr.representation=0.001`` in a learning-rate sweep). Choices shared by every group go into
the table title.

The ``paper:`` block of an experiment file (conf/experiment/*/*.yaml)::

    paper:
      last_acc: 91.53        # keys = our metric names; null = not available here
      inc_acc: 94.09
      unverified: [inc_acc]  # values no accessible source confirms (printed with *)
      source: "..."          # where each number comes from
      note: "..."            # caveats, or what to transcribe from which paper
      per_dataset:           # MTIL only: lists in training order (matched by position)
        datasets: [...]
        transfer: [null, 88.4, ...]

Outputs: the rich table(s) on stdout; ``--format``/``--output``: markdown, LaTeX (booktabs
``tabular``) or CSV (one row per group, raw numbers, ``_mean/_std/_n/_paper/_diff`` columns);
``--plot``: bars of the headline metrics with std error bars plus accuracy curves (Agg backend).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clcli.evaluation import SCENARIO_KINDS, scenario_kind


# Config keys that say *where/how* a run ran or *which repetition* it is, not *what* was run.
IGNORED_CONFIG_KEYS = {"seed", "train_seed", "device", "resume", "redo_diverged", "paths", "loader", "checkpoint",
                       "guard", "paper", "hydra"}
IGNORED_CHOICES = {"sweep"}  # the preset that launched a run does not change it
CHOICE_ORDER = ("experiment", "method", "data", "backbone", "optim")

# Row order follows the papers' tables: pre-training block, benchmark column order, method row order.
DATA_RANK = {"split_cifar100": 0, "split_imagenet_r": 1, "split_cub200": 2, "split_cars196": 3,
             "mtil": 0, "mtil_order2": 1, "mtil_fewshot": 2}
METHOD_RANK = {"zeroshot": 0, "seq_ft": 1, "clip_ft": 1, "frozen": 2, "slow_learner": 3, "slca": 4, "diki": 5,
               "joint": 9}

DASH = "–"
UNVERIFIED_MARK = "*"


class TableError(Exception):
    """A problem with the input directory or a results file; the message names the file."""


# ----------------------------------------------------------------------------------- loading


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_results(root: Path) -> list[dict]:
    """Every results.json under ``root`` (sorted by path), each with ``_path`` added."""
    root = Path(root)
    if not root.is_dir():
        raise TableError(f"'{root}' is not a directory.")
    paths = sorted(root.rglob("results.json"))
    if not paths:
        raise TableError(f"no results.json under '{root}' (a finished `clcli train` run writes one into its run dir).")
    return [_load_one(p) for p in paths]


def _load_one(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TableError(f"'{path}' is not a readable JSON file ({exc}).") from exc
    problems = validate_results(res)
    if problems:
        raise TableError(f"'{path}' is not a clcli results file: {'; '.join(problems)}.")
    res["_path"] = str(path)
    return res


def validate_results(res: Any) -> list[str]:
    """The structural problems of one results dict (empty = usable)."""
    if not isinstance(res, dict):
        return [f"expected a JSON object, got {type(res).__name__}"]
    problems = []
    fmt = res.get("format")
    if fmt is not None and not str(fmt).startswith("clcli-results-"):
        problems.append(f"unknown format {fmt!r}")
    for key in ("run", "metrics", "config", "scenario"):
        if not isinstance(res.get(key), dict):
            problems.append(f"missing or non-object '{key}'")
    if "seed" not in res:
        problems.append("missing 'seed'")
    if isinstance(res.get("scenario"), dict) and not isinstance(res["scenario"].get("kind"), str):
        problems.append("missing 'scenario.kind'")
    if isinstance(res.get("metrics"), dict) and isinstance(res.get("scenario"), dict):
        for m in headline_metrics(res["scenario"].get("kind")):
            v = res["metrics"].get(m)
            if v is not None and not _is_number(v):
                problems.append(f"metrics.{m} is not a number ({v!r})")
    if res.get("paper") is not None and not isinstance(res.get("paper"), dict):
        problems.append("'paper' must be an object or null")
    if not isinstance(res.get("status", "complete"), str):
        problems.append("'status' must be a string")
    return problems


def status_of(res: dict) -> str:
    """``complete`` unless the run says otherwise (results written before runs had a status were
    complete: a failed run wrote none)."""
    return res.get("status", "complete")


def outcome_text(runs: list[dict]) -> str:
    """How the runs ended, where not all completed cleanly: ``diverged 1/3``, ``collapse 2/3``."""
    n, parts = len(runs), []
    statuses = Counter(status_of(r) for r in runs if status_of(r) != "complete")
    parts += [f"{st} {k}/{n}" for st, k in sorted(statuses.items())]
    collapsed = sum(any(w.get("kind") == "collapse" for w in r.get("warnings") or []) for r in runs)
    if collapsed:
        parts.append(f"collapse {collapsed}/{n}")
    return "; ".join(parts)


def headline_metrics(kind: str | None) -> tuple[str, ...]:
    """The headline metrics of a ``scenario.kind`` (:class:`clcli.evaluation.ScenarioKind`)."""
    return scenario_kind(kind).headline


def kind_title(kind: str) -> str:
    known = SCENARIO_KINDS.get(kind)
    return known.title if known is not None else kind


def ordered_kinds(kinds) -> list[str]:
    """Distinct scenario kinds in table order (class-incremental first)."""
    return sorted(set(kinds), key=lambda k: (scenario_kind(k).rank, k))


# ----------------------------------------------------------------------------------- grouping


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
    def of(cls, values: list) -> "Stat":
        vals = np.array([v for v in values if _is_number(v) and not math.isnan(v)], dtype=float)
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
        """The runs that finished every task: the only ones a mean or curve is taken over."""
        return [r for r in self.runs if status_of(r) == "complete"]

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
        return float(v) if _is_number(v) else None

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


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def group_runs(results: list[dict]) -> list[Group]:
    """Group runs by (choices, grouping config), label and sort the groups (see the module docstring)."""
    groups: dict[str, Group] = {}
    for res in results:
        choices, config = grouping_choices(res), grouping_config(res)
        key = _canon([choices, config, res["scenario"]["kind"]])
        groups.setdefault(key, Group(choices, config)).runs.append(res)
    out = list(groups.values())
    _label(out)
    out.sort(key=_sort_key)
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if _is_number(v):
        return repr(v)
    return json.dumps(v, default=str)


def _choice_keys(groups: list[Group]) -> list[str]:
    seen = {k for g in groups for k in g.choices}
    return [k for k in CHOICE_ORDER if k in seen] + sorted(seen - set(CHOICE_ORDER))


def varying_choices(groups: list[Group]) -> list[str]:
    """Choices that differ between groups (candidates for the row labels)."""
    return [k for k in _choice_keys(groups) if len({g.choices.get(k) for g in groups}) > 1]


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
    return {k: groups[0].choices.get(k) for k in _choice_keys(groups)
            if len({g.choices.get(k) for g in groups}) == 1 and groups[0].choices.get(k) is not None and "/" not in k
            and not (k == "optim" and groups[0].choices.get("optim") == groups[0].choices.get("data"))}


def _label(groups: list[Group]) -> None:
    """Readable, unique labels: varying choices + config values that differ among siblings (groups
    with the same choices, e.g. the points of a learning-rate sweep)."""
    shown = varying_choices(groups)
    implied = {k for k in shown if k != "experiment" and _determined_by_experiment(groups, k)}
    siblings: dict[str, list[Group]] = {}
    for g in groups:
        siblings.setdefault(_canon(g.choices), []).append(g)
    for sib in siblings.values():
        keys = sorted({k for g in sib for k in g.config})
        diff = [k for k in keys if len({_canon(g.config.get(k, "<unset>")) for g in sib}) > 1]
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
        parts += [f"{k}={_fmt_value(v)}" for k, v in g.config_diff.items()]
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
    return (0, float(v), "") if _is_number(v) else (1, 0.0, _canon(v))


def _sort_key(g: Group) -> tuple:
    c = g.choices
    return (scenario_kind(g.kind).rank, str(c.get("backbone", "")), DATA_RANK.get(c.get("data"), 99),
            str(c.get("data", "")), METHOD_RANK.get(c.get("method"), 50), str(c.get("method", "")),
            str(c.get("experiment", "")), _canon(c), tuple(_value_key(v) for v in g.config_diff.values()))


# ----------------------------------------------------------------------------------- tables


@dataclass
class TextTable:
    """A rendered-agnostic table of strings: title, header, rows, notes under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    sections: list[int] = field(default_factory=list)  # row indices that start a new block (rule above)


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}"


def _paper_cell(g: Group, m: str) -> str:
    p = g.paper_value(m)
    if p is None:
        return DASH
    return f"{p:.2f}" + (UNVERIFIED_MARK if g.paper_unverified(m) else "")


def _paper_notes(groups: list[Group]) -> list[str]:
    notes, any_unverified = [], False
    for g in groups:
        p = g.paper
        if not p:
            continue
        any_unverified |= bool(p.get("unverified"))
        text = "; ".join(str(p[k]) for k in ("source", "note") if p.get(k))
        if text:
            notes.append(f"{g.label}: {text}")
    if any_unverified:
        notes.insert(0, f"{UNVERIFIED_MARK} paper value not confirmed by an accessible source (paper.unverified).")
    return notes


STAT_NOTE = f"mean ± sample std (ddof=1) over seeds; n = runs with a value; std {DASH} when n = 1."
OUTCOME_NOTE = ("outcome: runs that did not finish (e.g. diverged k/n) are left out of every mean; collapse k/n: "
                "runs where some task's training loss stayed at chance level (results.json warnings).")


def _title(kind: str, groups: list[Group]) -> str:
    common = " ".join(f"{k}={v}" for k, v in common_choices(groups).items())
    return f"{kind_title(kind)} results" + (f" [{common}]" if common else "")


def headline_table(groups: list[Group], kind: str) -> TextTable:
    """Rows = groups of one scenario kind; per headline metric ``mean ± std (n=K)`` and, where any
    group has a paper value for it, ``paper`` and ``Δ`` (ours − paper) columns."""
    gs = [g for g in groups if g.kind == kind]
    metrics = headline_metrics(kind)
    with_paper = {m: any(g.paper_value(m) is not None for g in gs) for m in metrics}
    with_outcome = any(g.outcome for g in gs)
    header = ["group", "seeds"] + (["outcome"] if with_outcome else [])
    for m in metrics:
        header.append(m)
        if with_paper[m]:
            header += [f"{m} paper", f"{m} Δ"]
    rows = []
    for g in gs:
        row = [g.label, ",".join(map(str, g.seeds))] + ([g.outcome or DASH] if with_outcome else [])
        for m in metrics:
            s = g.stat(m)
            row.append(s.text())
            if with_paper[m]:
                p = g.paper_value(m)
                row += [_paper_cell(g, m), DASH if p is None or s.mean is None else _signed(s.mean - p)]
        rows.append(row)
    notes = [STAT_NOTE] + ([OUTCOME_NOTE] if with_outcome else [])
    return TextTable(_title(kind, gs), header, rows, [*notes, *_paper_notes(gs)])


def per_dataset_tables(groups: list[Group]) -> list[TextTable]:
    """MTIL: one table per dataset sequence (order I, order II and MTIL-FS differ); rows = group ×
    metric (mean ± std over seeds, 1 decimal as the MTIL papers), plus the paper's row where given."""
    by_tasks: dict[tuple, list[Group]] = {}
    for g in groups:
        if scenario_kind(g.kind).per_dataset:
            by_tasks.setdefault(g.task_names, []).append(g)
    tables = []
    for names, gs in by_tasks.items():
        rows, sections = [], []
        for g in gs:
            sections.append(len(rows))
            for m in g.metrics:
                stats = g.per_dataset(m)
                cells = [stats[i].text(1, with_n=False) if i < len(stats) else DASH for i in range(len(names))]
                rows.append([g.label, m, *cells])
                paper = g.paper_per_dataset(m)
                if paper is not None:
                    mark = UNVERIFIED_MARK if g.paper_unverified(m) else ""
                    rows.append([g.label, f"{m} paper", *[DASH if v is None else f"{v:.1f}{mark}" for v in paper]])
        title = (f"{kind_title(gs[0].kind)} per dataset ({len(names)} datasets, training order): "
                 "mean ± sample std over seeds")
        tables.append(TextTable(title, ["group", "metric", *names], rows, sections=sections[1:]))
    return tables


def build_tables(groups: list[Group]) -> list[TextTable]:
    kinds = ordered_kinds(g.kind for g in groups)
    return [headline_table(groups, k) for k in kinds] + per_dataset_tables(groups)


# ----------------------------------------------------------------------------------- renderers


def render_rich(tables: list[TextTable], console) -> None:
    from rich.table import Table
    from rich.text import Text

    # Text(), not str: labels such as `optim.milestones=[18]` would otherwise be read as rich markup
    for t in tables:
        rt = Table(title=Text(t.title), title_justify="left")
        for i, h in enumerate(t.header):
            rt.add_column(Text(h), justify="left" if i < 2 else "right", overflow="fold")
        for i, row in enumerate(t.rows):
            rt.add_row(*map(Text, row), end_section=(i + 1) in t.sections)
        console.print(rt)
        for n in t.notes:
            console.print(f"  {n}", markup=False, highlight=False)
        console.print()


def render_markdown(tables: list[TextTable]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    out = []
    for t in tables:
        out += [f"### {t.title}", "", "| " + " | ".join(cell(h) for h in t.header) + " |",
                "|" + "|".join(["---"] * 2 + ["---:"] * (len(t.header) - 2)) + "|"]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
        if t.notes:
            out += [""] + [f"- {n}" for n in t.notes]
        out.append("")
    return "\n".join(out)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    s = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)
    return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(DASH, "--").replace("§", r"\S{}")


def _latex_comment(s: str) -> str:
    """Comments stay plain ASCII-ish so that any LaTeX engine reads the file."""
    return s.replace("±", "+/-").replace("Δ", "diff").replace(DASH, "--").replace("\n", " ")


def render_latex(tables: list[TextTable]) -> str:
    """One booktabs ``tabular`` per table (``\\usepackage{booktabs}``); notes as LaTeX comments."""
    out = []
    for t in tables:
        out += [f"% {_latex_comment(t.title)}", "% requires \\usepackage{booktabs}",
                "\\begin{tabular}{ll" + "r" * (len(t.header) - 2) + "}", "\\toprule",
                " & ".join(latex_escape(h) for h in t.header) + " \\\\", "\\midrule"]
        for i, row in enumerate(t.rows):
            if i in t.sections:
                out.append("\\midrule")
            out.append(" & ".join(latex_escape(c) for c in row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        out += [f"% {_latex_comment(n)}" for n in t.notes]
        out.append("")
    return "\n".join(out)


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def render_csv(groups: list[Group]) -> str:
    """One row per group with raw numbers (full precision; empty = not available, e.g. std at n=1):
    choices, seeds, per headline metric ``_mean/_std/_n/_paper/_paper_unverified/_diff``, MTIL
    per-dataset ``per_dataset.<metric>.<dataset>_mean/_std``, the paper's source and note."""
    choice_keys = _choice_keys(groups)
    kinds = ordered_kinds(g.kind for g in groups)
    metrics = list(dict.fromkeys(m for k in kinds for m in headline_metrics(k)))
    pd_cols = list(dict.fromkeys((m, name) for g in groups if scenario_kind(g.kind).per_dataset
                                 for m in g.metrics for name in g.task_names))
    header = ["group", "kind", *choice_keys, "config_diff", "seeds", "n_runs", "n_complete", "outcome"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n", f"{m}_paper", f"{m}_paper_unverified", f"{m}_diff"]
    header += [f"per_dataset.{m}.{name}_{s}" for m, name in pd_cols for s in ("mean", "std")]
    header += ["paper_source", "paper_note", "result_files"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for g in groups:
        row = [g.label, g.kind, *[g.choices.get(k, "") for k in choice_keys],
               ";".join(f"{k}={_fmt_value(v)}" for k, v in g.config_diff.items()),
               " ".join(map(str, g.seeds)), len(g.runs), len(g.complete), g.outcome]
        for m in metrics:
            if m not in g.metrics:
                row += [""] * 6
                continue
            s, p = g.stat(m), g.paper_value(m)
            row += [_num(s.mean), _num(s.std), s.n, _num(p), str(g.paper_unverified(m)).lower() if p is not None else "",
                    _num(s.mean - p) if p is not None and s.mean is not None else ""]
        names = g.task_names if scenario_kind(g.kind).per_dataset else ()
        for m, name in pd_cols:
            if name in names:
                st = g.per_dataset(m)
                i = names.index(name)
                row += [_num(st[i].mean), _num(st[i].std)] if i < len(st) else ["", ""]
            else:
                row += ["", ""]
        paper = g.paper or {}
        row += [paper.get("source") or "", paper.get("note") or "", " ".join(r["_path"] for r in g.runs)]
        w.writerow(row)
    return buf.getvalue()


def render(fmt: str, groups: list[Group], tables: list[TextTable]) -> str:
    if fmt == "csv":
        return render_csv(groups)
    return render_markdown(tables) if fmt == "md" else render_latex(tables)


# ----------------------------------------------------------------------------------- plot


def write_plot(groups: list[Group], path: Path) -> None:
    """Per scenario kind, left: horizontal bars of the headline metrics per group with sample-std
    error bars and the paper's values as black crosses; right: accuracy after each task (CIL:
    ``metrics.seen_acc``; MTIL: mean over all datasets) per group, mean ± std band. Agg backend,
    so it works headless; the format follows the file suffix (png, pdf, svg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kinds = ordered_kinds(g.kind for g in groups)
    n_max = max(sum(g.kind == k for g in groups) for k in kinds)
    height = max(3.5, 0.25 * n_max * 3 + 1.5)
    fig = Figure(figsize=(14, height * len(kinds)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), 2, squeeze=False, gridspec_kw={"width_ratios": [1.2, 1]})
    for r, kind in enumerate(kinds):
        gs = [g for g in groups if g.kind == kind][::-1]  # first group on top
        metrics = [m for m in headline_metrics(kind) if any(g.stat(m).n for g in gs)]
        ax = axes[r, 0]
        y = np.arange(len(gs), dtype=float)
        h = 0.8 / max(1, len(metrics))
        for j, m in enumerate(metrics):
            st = [g.stat(m) for g in gs]
            pos = y + ((len(metrics) - 1) / 2 - j) * h  # first metric on top within a group
            ax.barh(pos, [s.mean if s.mean is not None else 0 for s in st], height=h,
                    xerr=[s.std or 0 for s in st], capsize=2, label=m)
            paper = [g.paper_value(m) for g in gs]
            pts = [(p, yy) for p, yy in zip(paper, pos) if p is not None]
            if pts:
                ax.plot(*zip(*pts), "kx", markersize=6, label="paper" if j == 0 else None)
        ax.set_yticks(y, [g.label for g in gs], fontsize=7)
        ax.set_xlabel("%")
        ax.set_title(f"{kind_title(kind)}: mean ± sample std over seeds", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax = axes[r, 1]
        for g in gs[::-1]:
            mean, std = g.curve()
            if mean.size:
                x = np.arange(1, mean.size + 1)
                ax.plot(x, mean, marker="o", markersize=3, label=g.label)
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel("after task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(scenario_kind(kind).curve_label)
        ax.grid(alpha=0.3)
        if len(gs) <= 16:
            ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------- CLI


FORMAT_BY_SUFFIX = {".md": "md", ".markdown": "md", ".csv": "csv", ".tex": "latex"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clcli table",
        description="Aggregate every results.json under DIR: one row per configuration (runs differing only "
                    "in seed are grouped), mean ± sample std (ddof=1) per headline metric, the paper's "
                    "numbers and the difference beside them.",
        epilog="std is shown as '–' (empty in CSV) when a group has a single run. Exit code 2: no results "
               "under DIR or an invalid results file (named).")
    p.add_argument("dir", metavar="DIR", type=Path, help="a run or sweep directory (searched recursively)")
    p.add_argument("--format", choices=("md", "csv", "latex"),
                   help="write the table in this format: to --output if given, else to stdout instead of the "
                        "rich table (default with --output: from its suffix .md/.csv/.tex)")
    p.add_argument("--output", metavar="FILE", type=Path, help="file for the --format table")
    p.add_argument("--plot", metavar="FILE", type=Path, help="comparison plot (png/pdf/svg): metric bars with std error bars and "
                                             "accuracy curves per group")
    p.add_argument("--plot-x", metavar="KEY", help="instead: each headline metric against this swept config key or group "
                   "choice (e.g. optim.lr.representation), one line per configuration, mean ± std over seeds; the "
                   "figure goes to --plot FILE (default DIR/metric_vs_KEY.png), --format/--output give the same series")
    return p


def _fail(msg: str) -> None:
    print(f"clcli table: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _warn(msg: str) -> None:
    print(f"clcli table: warning: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    fmt = args.format
    if args.output is not None and fmt is None:
        fmt = FORMAT_BY_SUFFIX.get(args.output.suffix.lower())
        if fmt is None:
            _fail(f"cannot tell the format of '{args.output}' from its suffix; add --format md|csv|latex.")
    if args.plot_x is not None:
        _plot_x_main(args, fmt)
        return
    try:
        groups = group_runs(load_results(args.dir))
    except TableError as exc:
        _fail(str(exc))
    for g in groups:
        dup = [s for s, c in Counter(map(str, (r.get("seed") for r in g.runs))).items() if c > 1]
        if dup:
            _warn(f"group '{g.label}' holds more than one run with seed {', '.join(dup)} (e.g. two sweeps of the "
                  "same config): they all count in its mean and std.")
        if len({_canon(r.get("paper")) for r in g.runs if r.get("paper")}) > 1:
            _warn(f"group '{g.label}': runs carry different paper blocks; showing the first ({g.runs[0]['_path']}).")
    tables = build_tables(groups)
    if fmt is not None and args.output is None:
        sys.stdout.write(render(fmt, groups, tables))
    else:
        from rich.console import Console

        # a pipe or file gets a wide table instead of rich's 80-column default
        console = Console(width=None if sys.stdout.isatty() else 250)
        render_rich(tables, console)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render(fmt, groups, tables))
        print(f"wrote {args.output} ({fmt})", file=sys.stderr)
    if args.plot is not None:
        write_plot(groups, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def _plot_x_main(args, fmt: str | None) -> None:
    """``--plot-x KEY``: the series table (rich, or --format/--output) and the metric-vs-KEY figure."""
    from clcli.series import build_series, plot_series, series_csv, series_table

    try:
        series = build_series(load_results(args.dir), args.plot_x)
    except TableError as exc:
        _fail(str(exc))
    tables = [series_table(series, args.plot_x)]
    text = (lambda: series_csv(series, args.plot_x) if fmt == "csv" else
            render_markdown(tables) if fmt == "md" else render_latex(tables))
    if fmt is not None and args.output is None:
        sys.stdout.write(text())
    else:
        from rich.console import Console

        render_rich(tables, Console(width=None if sys.stdout.isatty() else 250))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text())
        print(f"wrote {args.output} ({fmt})", file=sys.stderr)
    safe_key = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in args.plot_x)
    plot = args.plot if args.plot is not None else args.dir / f"metric_vs_{safe_key}.png"
    plot_series(series, args.plot_x, plot)
    print(f"wrote {plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
