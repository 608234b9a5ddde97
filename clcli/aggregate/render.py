"""Renderers: rich (terminal), markdown, LaTeX (booktabs ``tabular``, notes as comments) and CSV
(one row per group, raw numbers, ``_mean/_std/_n/_paper/_diff`` columns)."""
from __future__ import annotations

import csv
import io

from clcli.aggregate.group import DASH, Group, fmt_value, ordered_choices
from clcli.aggregate.kinds import headline_metrics, ordered_kinds
from clcli.aggregate.tables import TextTable
from clcli.evaluation import scenario_kind


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
    choices, seeds, per headline metric (and optional metric some run has, e.g. ``probe_last``)
    ``_mean/_std/_n/_paper/_paper_unverified/_paper_kind/_diff``, MTIL
    per-dataset ``per_dataset.<metric>.<dataset>_mean/_std``, the paper's source and note."""
    choice_keys = ordered_choices(groups)
    kinds = ordered_kinds(g.kind for g in groups)
    metrics = list(dict.fromkeys(m for k in kinds for m in headline_metrics(k)))
    metrics += [m for k in kinds for m in scenario_kind(k).optional
                if m not in metrics and any(g.kind == k and g.stat(m).n for g in groups)]
    pd_cols = list(dict.fromkeys((m, name) for g in groups if scenario_kind(g.kind).per_dataset
                                 for m in g.metrics for name in g.task_names))
    header = ["group", "kind", *choice_keys, "config_diff", "seeds", "n_runs", "n_complete", "outcome"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n", f"{m}_paper", f"{m}_paper_unverified", f"{m}_paper_kind", f"{m}_diff"]
    header += [f"per_dataset.{m}.{name}_{s}" for m, name in pd_cols for s in ("mean", "std")]
    header += ["paper_source", "paper_note", "result_files"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for g in groups:
        row = [g.label, g.kind, *[g.choices.get(k, "") for k in choice_keys],
               ";".join(f"{k}={fmt_value(v)}" for k, v in g.config_diff.items()),
               " ".join(map(str, g.seeds)), len(g.runs), len(g.complete), g.outcome]
        for m in metrics:
            if m not in g.metrics and m not in scenario_kind(g.kind).optional:
                row += [""] * 7
                continue
            s, p = g.stat(m), g.paper_value(m)
            row += [_num(s.mean), _num(s.std), s.n, _num(p), str(g.paper_unverified(m)).lower() if p is not None else "",
                    g.paper_kind(m) or "",
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
