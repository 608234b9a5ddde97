"""The rich table printed at the end of a run."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clcli.report import headline, outcome_lines


def print_summary(results: dict, console: Console) -> None:
    run = results["run"]
    names = [t["name"] for t in results["tasks"]]
    table = Table(title=f"{run.get('method')} | {run.get('data')} | {run.get('backbone')} | seed {results['seed']}")
    table.add_column("after task")
    for n in names:
        table.add_column(n, justify="right")
    for i, row in enumerate(results["accuracy_matrix"]):
        table.add_row(names[i], *["" if v is None else f"{v:.1f}" for v in row])
    console.print(table)
    status = results.get("status", "complete")
    partial = status != "complete"
    metrics = "  ".join(f"[bold]{k}[/bold] {v:.2f}" for k, v in headline(results, partial=partial).items() if v is not None)
    if partial:
        metrics = f"[red]{status}[/red] after {results.get('finished_tasks', 0)} finished task(s)  {metrics}"
    console.print(f"{metrics}   ({results['timings']['total_s']:.0f} s)")
    for line in outcome_lines(results):
        console.print(f"[yellow]{escape(line)}[/yellow]")
