"""``clcli table --plot``: bars of the headline metrics with std error bars plus accuracy curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clcli.aggregate.group import Group
from clcli.aggregate.kinds import headline_metrics, kind_title, ordered_kinds
from clcli.evaluation import scenario_kind


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
