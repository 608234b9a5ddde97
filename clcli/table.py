"""``clcli table DIR``: fold a sweep's ``results.json`` files into mean ± std tables beside the
papers' numbers (DESIGN principle 7: a paper table is data). This module is the command line; the
work is done in :mod:`clcli.aggregate` (whose docstring describes grouping, statistics and the paper
comparison).

Usage::

    clcli table DIR [--format md|csv|latex] [--output FILE] [--plot FILE] [--plot-x KEY]

``--plot-x KEY`` (``clcli.aggregate.series``) draws each headline metric against a swept config key instead.

Outputs: the rich table(s) on stdout; ``--format``/``--output``: markdown, LaTeX (booktabs
``tabular``) or CSV (one row per group, raw numbers, ``_mean/_std/_n/_paper/_diff`` columns);
``--plot``: bars of the headline metrics with std error bars plus accuracy curves (Agg backend).
Exit code 2: no results under DIR, or an invalid results file (named).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from clcli.aggregate.group import canon, group_runs
from clcli.aggregate.load import TableError, load_results
from clcli.aggregate.plot import write_plot
from clcli.aggregate.render import render, render_latex, render_markdown, render_rich
from clcli.aggregate.tables import build_tables

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
        if len({canon(r.get("paper")) for r in g.runs if r.get("paper")}) > 1:
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
    from clcli.aggregate.series import build_series, plot_series, series_csv, series_table

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
