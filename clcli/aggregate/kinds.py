"""Scenario kinds as the tables see them: headline metrics, titles and table order
(:class:`clcli.evaluation.ScenarioKind`)."""
from __future__ import annotations

from clcli.evaluation import SCENARIO_KINDS, scenario_kind


def headline_metrics(kind: str | None) -> tuple[str, ...]:
    """The headline metrics of a ``scenario.kind`` (:class:`clcli.evaluation.ScenarioKind`)."""
    return scenario_kind(kind).headline


def kind_title(kind: str) -> str:
    known = SCENARIO_KINDS.get(kind)
    return known.title if known is not None else kind


def ordered_kinds(kinds) -> list[str]:
    """Distinct scenario kinds in table order (class-incremental first)."""
    return sorted(set(kinds), key=lambda k: (scenario_kind(k).rank, k))

