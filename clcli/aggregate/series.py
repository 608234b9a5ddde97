"""``clcli table DIR --plot-x KEY``: each headline metric against a swept config key.

The SLCA paper's case for the slow learner is a curve: accuracy against the representation learning
rate. This module turns a sweep into such curves. Runs are grouped as ``clcli table`` groups them,
except that ``KEY`` is left out of the grouping: each group becomes one *series* (a line), and
within a series the runs are split by their value of ``KEY`` (one *point*, mean ± sample std over
seeds of the complete runs). Points where runs stopped early are marked (``diverged k/n``), and so are
points with collapse warnings; a point whose every run diverged has no mean but still appears.

``KEY`` is a dotted key of the resolved config (``optim.lr.representation``) or a config-group choice
(``method``). Numeric keys are sorted numerically and drawn on a log axis when every value is
positive and they span two decades or more, or the key names a learning rate.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clcli.aggregate.group import DASH, Stat, canon, flatten, fmt_value, group_runs, outcome_text
from clcli.aggregate.kinds import headline_metrics, kind_title, ordered_kinds
from clcli.aggregate.load import TableError, collapsed, complete_runs, is_number
from clcli.aggregate.tables import TextTable


@dataclass
class Point:
    """The runs of one series at one value of the swept key."""

    x: Any
    runs: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> list[dict]:
        return complete_runs(self.runs)

    @property
    def incomplete(self) -> int:
        return len(self.runs) - len(self.complete)

    @property
    def collapsed(self) -> int:
        return sum(map(collapsed, self.runs))

    def stat(self, metric: str) -> Stat:
        return Stat.of([r["metrics"].get(metric) for r in self.complete])


@dataclass
class Series:
    label: str
    kind: str
    points: list[Point]


def swept_value(res: dict, key: str) -> Any:
    """The run's value of ``key``: a resolved config leaf, else a config-group choice; KeyError if neither."""
    flat = flatten(res["config"])
    if key in flat:
        return flat[key]
    if key in res["run"]:
        return res["run"][key]
    raise KeyError(key)


def _varying_keys(results: list[dict]) -> list[str]:
    values: dict[str, set] = {}
    for r in results:
        for k, v in {**flatten(r["config"]), **r["run"]}.items():
            values.setdefault(k, set()).add(canon(v))
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in ("seed",) and not k.startswith("hydra"))


def build_series(results: list[dict], key: str) -> list[Series]:
    """One series per group of runs that differ in nothing but ``key`` and the seed."""
    missing = [r["_path"] for r in results if not _has(r, key)]
    if missing:
        raise TableError(f"--plot-x {key}: no such config key or group choice in {missing[0]}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}. Keys that vary "
                         f"between the runs under this directory: {', '.join(_varying_keys(results)) or 'none'}.")
    stripped = []
    for r in results:  # the grouping sees every run without the swept key (a choice: without its node)
        path = key.split(".") if key in flatten(r["config"]) else [key]
        config = _without(r["config"], path)
        stripped.append({**r, "config": config, "run": {k: v for k, v in r["run"].items() if k != key}, "_orig": r})
    out = []
    for g in group_runs(stripped):
        points: dict[str, Point] = {}
        for s in g.runs:
            x = swept_value(s["_orig"], key)
            points.setdefault(canon(x), Point(x)).runs.append(s["_orig"])
        ordered = sorted(points.values(), key=lambda p: (0, float(p.x), "") if is_number(p.x) else (1, 0.0, canon(p.x)))
        out.append(Series(g.label, g.kind, ordered))
    return out


def _has(res: dict, key: str) -> bool:
    try:
        swept_value(res, key)
        return True
    except KeyError:
        return False


def _without(config: dict, path: list[str]) -> dict:
    if not path or path[0] not in config:
        return config
    if len(path) == 1:
        return {k: v for k, v in config.items() if k != path[0]}
    inner = config[path[0]]
    return {**config, path[0]: _without(inner, path[1:]) if isinstance(inner, dict) else inner}


def log_axis(key: str, xs: list) -> bool:
    nums = [float(x) for x in xs if is_number(x)]
    if len(nums) != len(xs) or not nums or min(nums) <= 0:
        return False
    names_lr = "lr" in key.split(".") or key.split(".")[-1].startswith("lr")
    return names_lr or max(nums) / min(nums) >= 100


# ----------------------------------------------------------------------------------- tables


def series_table(series: list[Series], key: str) -> TextTable:
    """Rows = series × value of ``key``; per metric ``mean ± std (n=K)`` over the complete runs."""
    kinds = ordered_kinds(s.kind for s in series)
    metrics = list(dict.fromkeys(m for k in kinds for m in headline_metrics(k)))
    rows = []
    for s in series:
        for p in s.points:
            cells = [p.stat(m).text() if m in headline_metrics(s.kind) else DASH for m in metrics]
            rows.append([s.label, fmt_value(p.x), str(len(p.runs)), outcome_text(p.runs) or DASH, *cells])
    notes = ["mean ± sample std (ddof=1) over seeds of the complete runs; diverged runs are counted, never averaged."]
    return TextTable(f"metrics against {key}", ["series", key, "runs", "outcome", *metrics], rows, notes)


def series_csv(series: list[Series], key: str) -> str:
    """One row per series × value, raw numbers: ``<metric>_mean/_std/_n`` and run counts."""
    kinds = ordered_kinds(s.kind for s in series)
    metrics = list(dict.fromkeys(m for k in kinds for m in headline_metrics(k)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["series", "kind", key, "n_runs", "n_complete", "n_incomplete", "n_collapse",
                *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]])
    for s in series:
        for p in s.points:
            row = [s.label, s.kind, fmt_value(p.x), len(p.runs), len(p.complete), p.incomplete, p.collapsed]
            for m in metrics:
                st = p.stat(m)
                row += ["" if st.mean is None else repr(st.mean), "" if st.std is None else repr(st.std), st.n]
            w.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- plot


def plot_series(series: list[Series], key: str, path: Path) -> None:
    """One panel per headline metric (a row per scenario kind): a line per series with sample-std
    error bars; runs that did not finish drawn as crosses on the axis floor in the series' colour,
    labelled with their count; points with collapse warnings circled. Agg backend; format from the file suffix."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = ordered_kinds(s.kind for s in series)
    ncols = max(len(headline_metrics(k)) for k in kinds)
    fig = Figure(figsize=(4.6 * ncols, 3.8 * len(kinds)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), ncols, squeeze=False)
    xs_all = [p.x for s in series for p in s.points]
    log = log_axis(key, xs_all)
    categorical = not all(is_number(x) for x in xs_all)
    cats = list(dict.fromkeys(fmt_value(x) for x in xs_all))
    to_x = (lambda x: cats.index(fmt_value(x))) if categorical else float
    for r, kind in enumerate(kinds):
        for c, metric in enumerate(headline_metrics(kind)):
            ax = axes[r, c]
            floor = []  # (x, text, color) of points with runs that did not finish
            for s in (s for s in series if s.kind == kind):
                pts = [(to_x(p.x), p.stat(metric)) for p in s.points]
                have = [(x, st) for x, st in pts if st.mean is not None]
                line = ax.errorbar([x for x, _ in have], [st.mean for _, st in have], yerr=[st.std or 0 for _, st in have],
                                   marker="o", markersize=4, capsize=3, label=s.label)
                color = line[0].get_color()
                for p in s.points:
                    st = p.stat(metric)
                    if p.collapsed and st.mean is not None:
                        ax.plot([to_x(p.x)], [st.mean], "o", markersize=11, markerfacecolor="none", color=color)
                    if p.incomplete:
                        floor.append((to_x(p.x), f"{p.incomplete}/{len(p.runs)}", color))
            lo, _ = ax.get_ylim()
            for i, (x, text, color) in enumerate(floor):
                ax.plot([x], [lo], "x", color=color, markersize=9, markeredgewidth=2, clip_on=False)
                ax.annotate(text, (x, lo), textcoords="offset points", xytext=(5, 3 + 9 * (i % 3)), fontsize=7, color=color)
            if log:
                ax.set_xscale("log")
            if categorical:
                ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=7)
            ax.set_xlabel(key)
            ax.set_ylabel(f"{metric} (%)")
            ax.set_title(f"{kind_title(kind)}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
        handles, labels = axes[r, 0].get_legend_handles_labels()
        if any(p.incomplete for s in series for p in s.points):
            handles.append(axes[r, 0].plot([], [], "x", color="black", markeredgewidth=2)[0])
            labels.append("did not finish (k/n runs)")
        if any(p.collapsed for s in series for p in s.points):
            handles.append(axes[r, 0].plot([], [], "o", markerfacecolor="none", color="gray", markersize=9)[0])
            labels.append("collapse warning")
        axes[r, 0].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(f"mean ± sample std over seeds against {key}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
