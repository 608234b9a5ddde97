"""Tables: the groups as renderer-agnostic tables of strings, beside the papers' numbers.

When a group's runs carry a ``paper`` block (written from the experiment file's ``paper:`` key), the
paper value, its kind (``paper.kinds``: where the number comes from;
docs/slca_protocol.md#experiment-presets-and-published-numbers) and ``Δ = ours − paper`` stand
beside each headline metric; values listed in ``paper.unverified`` are marked ``*``; sources and
notes go under the table. Optional metrics of the scenario kind
(:attr:`clcli.evaluation.ScenarioKind.optional`, e.g. the representation probe's ``probe_last``)
get a column when some group has them. MTIL groups also get a
per-dataset table. The ``paper:`` block of an experiment file (conf/experiment/*/*.yaml)::

    paper:
      last_acc: 91.53        # keys = our metric names; null = not available here
      inc_acc: 94.09
      kinds: {last_acc: figure, inc_acc: recalled}  # table | figure | derived | secondary | recalled
      unverified: [inc_acc]  # values no accessible source confirms (printed with *)
      source: "..."          # where each number comes from
      note: "..."            # caveats, or what to transcribe from which paper
      per_dataset:           # MTIL only: lists in training order (matched by position)
        datasets: [...]
        transfer: [null, 88.4, ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field

from clcli.aggregate.group import DASH, Group, common_choices
from clcli.aggregate.kinds import headline_metrics, kind_title, ordered_kinds
from clcli.evaluation import scenario_kind

UNVERIFIED_MARK = "*"


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


def _protocol_cell(g: Group) -> str:
    """Our protocol, and the paper's where it differs (docs/diki_mtil_protocol.md#the-protocol-choice)."""
    ours, theirs = g.protocol or DASH, g.paper_protocol
    return ours if theirs is None or ours.split()[0] == theirs else f"{ours} (paper: {theirs})"


def _title(kind: str, groups: list[Group]) -> str:
    common = " ".join(f"{k}={v}" for k, v in common_choices(groups).items())
    return f"{kind_title(kind)} results" + (f" [{common}]" if common else "")


def headline_table(groups: list[Group], kind: str) -> TextTable:
    """Rows = groups of one scenario kind; per headline metric ``mean ± std (n=K)`` and, where any
    group has a paper value for it, ``paper`` and ``Δ`` (ours − paper) columns."""
    gs = [g for g in groups if g.kind == kind]
    metrics = tuple(headline_metrics(kind)) + tuple(
        m for m in scenario_kind(kind).optional if any(g.stat(m).n for g in gs))
    with_paper = {m: any(g.paper_value(m) is not None for g in gs) for m in metrics}
    with_kind = {m: any(g.paper_kind(m) for g in gs) for m in metrics}
    with_outcome = any(g.outcome for g in gs)
    with_protocol = any(g.protocol for g in gs)  # MTIL: which protocol (templates, splits) each row used
    header = ["group", "seeds"] + (["protocol"] if with_protocol else []) + (["outcome"] if with_outcome else [])
    for m in metrics:
        header.append(m)
        if with_paper[m]:
            header += [f"{m} paper"] + ([f"{m} kind"] if with_kind[m] else []) + [f"{m} Δ"]
    rows = []
    for g in gs:
        row = [g.label, ",".join(map(str, g.seeds))] + ([_protocol_cell(g)] if with_protocol else []) + \
            ([g.outcome or DASH] if with_outcome else [])
        for m in metrics:
            s = g.stat(m)
            row.append(s.text())
            if with_paper[m]:
                p = g.paper_value(m)
                row += [_paper_cell(g, m)] + ([g.paper_kind(m) or DASH] if with_kind[m] else [])
                row += [DASH if p is None or s.mean is None else _signed(s.mean - p)]
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
