"""Rendering one run's results: results.json, accuracy_matrix.csv, summary.md and the two plots,
plus the headline metrics and outcome sentences the console summary and sweep report reuse.
Files go through :mod:`clcli.results`' atomic writer; the metrics are defined in docs/metrics.md."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from clcli import distributed
from clcli import results as store
from clcli.evaluation import scenario_kind


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


def write_outputs(run_dir: Path, results: dict) -> None:
    """results.json, accuracy_matrix.csv, summary.md and the plots (rank 0 only)."""
    if not distributed.is_main():
        return
    store.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, default=float))
    mat = results["accuracy_matrix"]
    names = task_names(results)
    lines = ["after_task," + ",".join(names)]
    for i, row in enumerate(mat):
        lines.append(f"{names[i]}," + ",".join(_fmt(v) for v in row))
    store.atomic_write_text(run_dir / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    store.atomic_write_text(run_dir / "summary.md", summary_markdown(results))
    write_plots(run_dir, results)


def task_names(results: dict) -> list[str]:
    """The tasks' names in training order: the labels of every table and plot of a run."""
    return [t["name"] for t in results["tasks"]]


def headline(results: dict, partial: bool = False) -> dict[str, float | None]:
    """The headline metrics of a results dict; ``partial``: of the finished tasks of a run that
    stopped early (``partial_metrics``) when it has no complete ones."""
    m = results["metrics"]
    if partial and results.get("status", "complete") != "complete":
        m = results.get("partial_metrics") or {}
    return {k: m.get(k) for k in scenario_kind(results["scenario"]["kind"]).headline}


def outcome_lines(results: dict) -> list[str]:
    """Plain sentences about how the run ended: its failure (status != complete) and its warnings."""
    lines = []
    status = results.get("status", "complete")
    if status != "complete":
        f = results.get("failure") or {}
        done = results.get("finished_tasks", 0)
        lines.append(f"status: {status} in task {f.get('task')} ({f.get('stage')}); {done} of "
                     f"{len(results['tasks'])} tasks finished. {f.get('message', '')}".rstrip())
    for w in results.get("warnings") or []:
        lines.append(f"warning ({w.get('kind')}, task {w.get('task')}, epoch {w.get('epoch')}, "
                     f"loss {w.get('loss', float('nan')):.4g}): {w.get('message', '')}")
    return lines


def summary_markdown(results: dict) -> str:
    run = results["run"]
    out = [f"# {run.get('method')} on {run.get('data')} ({run.get('backbone')}), seed {results['seed']}", ""]
    status = results.get("status", "complete")
    out += [f"Status: **{status}**", ""]
    out.append("| metric | value |\n|---|---|")
    out += [f"| {k} | {_fmt(v)} |" for k, v in headline(results).items()]
    if status != "complete" and results.get("partial_metrics"):
        out += [f"| {k} (first {results.get('finished_tasks')} tasks) | {_fmt(v)} |"
                for k, v in headline(results, partial=True).items()]
    names = task_names(results)
    out += ["", "Accuracy matrix (%; row = after task, column = task):", "",
            "| after \\ task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, row in enumerate(results["accuracy_matrix"]):
        out.append(f"| {names[i]} | " + " | ".join(_fmt(v) for v in row) + " |")
    outcome = outcome_lines(results)
    if outcome:
        out += ["", "## Outcome", "", *[f"- {line}" for line in outcome]]
    out += ["", f"Total time: {results['timings']['total_s']:.1f} s", ""]
    return "\n".join(out)


def _matrix(results: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]], dtype=float)


def _task_axis(ax, names: list[str], axis: str = "x") -> None:
    """One tick per task at its index, labelled with its name (the curve and the heatmap alike)."""
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if axis == "x":
        set_ticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    else:
        set_ticks(range(len(names)), names, fontsize=7)


def curve_figure(results: dict):
    """The accuracy curve: after each task (x: one tick per task, its name), the accuracy on the
    seen classes, or for a per-dataset scenario (MTIL) one line per dataset. A matplotlib
    ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure

    mat, names = _matrix(results), task_names(results)
    T = len(names)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if scenario_kind(results["scenario"]["kind"]).per_dataset:
        for j in range(T):
            ax.plot(range(T), mat[:, j], marker="o", label=names[j])
        ax.legend(fontsize=7, ncol=2)
        ax.set_ylabel("top-1 accuracy (%)")
    else:
        seen = results["metrics"].get("seen_acc") or (results.get("partial_metrics") or {}).get("seen_acc") or []
        ax.plot(range(len(seen)), seen, marker="o")
        ax.set_ylabel("accuracy on seen classes (%)")
    _task_axis(ax, names)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_xlabel("after task")
    status = results.get("status", "complete")
    ax.set_title(f"{results['run'].get('method')} / {results['run'].get('data')}"
                 + ("" if status == "complete" else f" ({status})"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def matrix_figure(results: dict):
    """The accuracy matrix as a heatmap (row: after task, column: evaluated task)."""
    from matplotlib.figure import Figure

    mat, names = _matrix(results), task_names(results)
    T = len(names)
    fig = Figure(figsize=(1 + 0.6 * T, 0.8 + 0.5 * T))
    ax = fig.add_subplot()
    im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w" if mat[i, j] < 60 else "k")
    _task_axis(ax, names, "x")
    _task_axis(ax, names, "y")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after task")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_plots(run_dir: Path, results: dict) -> None:
    """accuracy_curve.png (:func:`curve_figure`) and accuracy_matrix.png (:func:`matrix_figure`)."""
    store.atomic_write_bytes(run_dir / "accuracy_curve.png", _png(curve_figure(results)))
    store.atomic_write_bytes(run_dir / "accuracy_matrix.png", _png(matrix_figure(results)))
