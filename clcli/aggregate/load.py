"""Loading: every ``results.json`` under a directory, checked before anything is grouped.

Directory names are never parsed: everything comes from the file (``run`` = Hydra's config-group
choices, ``config`` = the resolved config, ``metrics``, ``scenario.kind``, ``paper``). A file that is
not valid JSON or lacks one of these keys raises :class:`TableError` naming the file (``clcli table``
exits with code 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clcli.aggregate.kinds import headline_metrics


class TableError(Exception):
    """A problem with the input directory or a results file; the message names the file."""


def is_number(v: Any) -> bool:
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
            if v is not None and not is_number(v):
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


def complete_runs(runs: list[dict]) -> list[dict]:
    """The runs that finished every task: the only ones a mean or a curve is taken over."""
    return [r for r in runs if status_of(r) == "complete"]


def collapsed(res: dict) -> bool:
    """Whether some task of the run collapsed to chance level (a ``warnings`` entry)."""
    return any(w.get("kind") == "collapse" for w in res.get("warnings") or [])

