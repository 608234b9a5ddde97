"""``clcli eval RUN_DIR [task=K] [overrides] [--output DIR]``: evaluate a run again from its checkpoints.

The run's configuration is read back (:mod:`clcli.finished_run`) and checked against its checkpoints;
overrides may only say where the data is and what to compute on (:data:`EVAL_KEYS`). Backbone, method
and scenario are built by the training's own :func:`clcli.train.build`, each stored ``task_XX.pt``
(with its statistics merged back by :class:`clcli.results.RunStore`) is loaded and
:func:`clcli.engine.evaluate` fills its row of the accuracy matrix; the scenario's metrics follow
(docs/metrics.md#accuracy-matrix). A row whose state is not stored (``checkpoint.keep: last`` keeps only
the newest task's) stays empty and is listed with the reason: it is never copied from the old results.

The output is a new folder (``RUN_DIR/eval``, ``eval-1``, ... or ``--output DIR``), written in a hidden
sibling and renamed into place at the end: ``reevaluation.json`` (results.json's fields plus a
``reevaluation`` block: which run and checkpoints, when, the overrides, per row whether it equals the
run's own), accuracy_matrix.csv, summary.md and the plots. The file is not called results.json so that
``clcli table`` never counts a re-evaluation as another run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from clcli.config import check_config
from clcli.engine import evaluate, resolve_device, seed_everything
from clcli.errors import ConfigError
from clcli.evaluation import AccuracyMatrix
from clcli.finished_run import FinishedRun, open_run
from clcli.report import headline, write_outputs
from clcli.results import atomic_write_text, environment

# What `clcli eval` may change: where the data is and what it computes on. Everything else is part of
# what was trained (method.*, optim.*, seed, data.*, backbone.*, precision, ...) and is refused.
EVAL_KEYS = {
    "paths.data_dir": "where the datasets are (values under the old data dir move with it)",
    "paths.cache_dir": "where feature caches are (values under the old cache dir move with it)",
    "device": "auto | cpu | cuda[:N]",
    "loader.num_workers": "data-loading processes",
    "eval.batch_size": "evaluation batch size (DIKI's batch-wise task vote depends on it)",
    "method.feature_cache": "memory | disk | off (exact either way)",
    "method.feature_cache_dir": "where method.feature_cache=disk keeps features",
}
RESULTS_NAME = "reevaluation.json"
FORMAT = "clcli-reevaluation-v1"


# ----------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clcli eval", description="Evaluate a finished run again from its checkpoints.",
        epilog="overrides (key=value) may set only: " + ", ".join(EVAL_KEYS))
    parser.add_argument("run_dir", type=Path, help="the run dir of a `clcli train` run")
    parser.add_argument("overrides", nargs="*", help="task=K (only the state after task K) and key=value overrides")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder to write into (new or empty); default: the next free RUN_DIR/eval[-N]")
    return parser.parse_args(argv)


def split_overrides(items: list[str]) -> tuple[int | None, dict]:
    """``task=K`` and the ``key=value`` overrides, parsed with Hydra's grammar; every refused item is
    reported at once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    problems, task, values = [], None, {}
    for item in items:
        try:
            (o,) = OverridesParser.create().parse_overrides([item])
        except OverrideParseException as exc:
            problems.append(f"'{item}': not a key=value override ({str(exc).splitlines()[0]}).")
            continue
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package or o.is_sweep_override():
            problems.append(f"'{item}': clcli eval takes plain key=value overrides (no +, ~, @package or sweeps).")
        elif key == "task":
            value = o.value()
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"task={value!r}: expected a task index (an integer >= 0, as in checkpoints/task_XX.pt).")
            task = value
        elif key not in EVAL_KEYS:
            problems.append(
                f"{key}: clcli eval cannot change what was trained ({key} belongs to the run's trained "
                f"configuration). It takes only where the data is and what to compute on: {', '.join(EVAL_KEYS)}. "
                "To evaluate another configuration, train it.")
        else:
            values[key] = o.value()
    if problems:
        raise ConfigError(problems)
    return task, values


def apply_overrides(config: dict, overrides: dict) -> tuple[dict, dict]:
    """A copy of the resolved ``config`` with ``overrides`` applied, and the values moved with a path.

    The resolved config no longer holds interpolations such as ``${paths.data_dir}/cifar100``, so a new
    ``paths.X`` moves every string value equal to the old one or under it (``old/...``); returns them as
    ``{dotted key: [old, new]}`` so the user sees what moved."""
    effective, moved = copy.deepcopy(config), {}
    for key, value in overrides.items():
        if key.startswith("paths."):
            old = _get(effective, key)
            if isinstance(old, str) and old and value is not None:
                for path, leaf in _leaves(effective):
                    if path != key and isinstance(leaf, str) and (leaf == old or leaf.startswith(old.rstrip("/") + "/")):
                        new = str(value) + leaf[len(old):]
                        _set(effective, path, new)
                        moved[path] = [leaf, new]
        if _get(effective, key, missing=True) is _MISSING:
            raise ConfigError([f"{key}: the run's configuration has no such key, so it cannot be overridden."])
        _set(effective, key, value)
    return effective, moved


_MISSING = object()


def _get(d: dict, key: str, missing: bool = False):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING if missing else None
        d = d[part]
    return d


def _set(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, path + ".")
        else:
            yield path, v


# ----------------------------------------------------------------------------------- rows


def rows_to_evaluate(run: FinishedRun, num_tasks: int, task: int | None) -> tuple[list[int], dict[int, str]]:
    """The tasks whose stored state is evaluated again, and for every other row why it is not."""
    stored, newest = run.checkpoints(), run.newest_task()
    keep = (run.config.get("checkpoint") or {}).get("keep", "last")
    status = (run.results or {}).get("status", "complete" if run.results else "stopped before results.json")

    def why_not(t: int) -> str:
        if t > newest:
            return f"the run saved no state after this task (it ended after task {newest}; status: {status})"
        if t in stored:
            return f"not asked for (task={task})"
        if keep == "last":
            return (f"checkpoint.keep=last: only the newest task's full state (task_{newest:02d}.pt) was kept; "
                    "train with checkpoint.keep=all to keep every task's")
        return f"checkpoint task_{t:02d}.pt is missing from {run.store.ckpt_dir} (deleted?)"

    if task is not None:
        if task >= num_tasks:
            raise ConfigError([f"task={task}: the run has tasks 0..{num_tasks - 1}."])
        if task not in stored:
            raise ConfigError([f"task={task}: its state is not stored: {why_not(task)}. Stored: "
                               f"{', '.join(f'task={t}' for t in sorted(stored))}."])
    rows = [task] if task is not None else sorted(t for t in stored if t < num_tasks)
    return rows, {t: why_not(t) for t in range(num_tasks) if t not in rows}


def _eval_mode(method) -> None:
    """Every module of the method in eval mode, as the training loop evaluates (SLCA ends each stage
    with ``backbone.eval()``; the CLIP methods keep CLIP there): a freshly built backbone is in train
    mode, where dropout would change the predictions."""
    for value in vars(method).values():
        if isinstance(value, torch.nn.Module):
            value.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _finite(obj):
    """``obj`` with NaN floats as None (metrics of rows that were not evaluated): valid JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _percent_rows(counts: dict) -> list[list[float | None]]:
    m = AccuracyMatrix(len(counts["correct"]))
    m.load_state_dict(counts)
    return [[None if np.isnan(v) else float(v) for v in row] for row in m.percent()]


# ----------------------------------------------------------------------------------- the command


def reevaluate(run_dir: Path, task: int | None, overrides: dict, output: Path | None, console=None) -> tuple[dict, Path]:
    """Evaluate ``run_dir`` again; write the output folder and return (its results, its path)."""
    from rich.console import Console

    from clcli.train import build

    console = console or Console()
    run = open_run(run_dir)
    target = _check_output(output)
    effective, moved = apply_overrides(run.config, overrides)
    cfg = OmegaConf.create(effective)
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems)
    tasks_recorded = (run.results or {}).get("tasks")
    num_tasks = len(tasks_recorded) if tasks_recorded else None
    newest_state = run.verify(sorted(run.checkpoints()))  # every stored checkpoint, before any work
    if num_tasks is None:
        num_tasks = len(newest_state["matrix"]["correct"])
    rows, skipped = rows_to_evaluate(run, num_tasks, task)
    original_counts = (run.results or {}).get("counts") or newest_state["matrix"]
    original_source = "results.json counts" if (run.results or {}).get("counts") else (
        f"the accuracy matrix in task_{run.newest_task():02d}.pt")
    del newest_state

    t0 = time.perf_counter()
    built = build(cfg, resolve_device(cfg.device))
    method, scenario, rt = built.method, built.scenario, built.rt
    _check_scenario(run, scenario, moved)
    matrix = AccuracyMatrix(len(scenario))
    ckpts, per_row = run.checkpoints(), []
    with rt.live():
        for t in rt.track(rows, "re-evaluating", total=len(rows)):
            tick = time.perf_counter()
            state = run.store.state_at(ckpts[t])
            method.load_state_dict(state["method"])
            del state
            _eval_mode(method)
            seed_everything(built.train_seed * 1000 + t)  # the numbers the run's task t started from
            rt.task_index = t
            evaluate(method, scenario, t, matrix, rt)
            per_row.append({"task": t, "eval_s": time.perf_counter() - tick})

    results = _results(run, scenario, matrix, rows, skipped, effective, overrides, moved, rt, per_row,
                       original_counts, original_source, method, time.perf_counter() - t0)
    path = _write(run.dir, target, results)
    print_comparison(results, console)
    console.print(f"written: {path}", highlight=False)
    return results, path


def _check_output(output: Path | None) -> Path | None:
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError([f"--output {output}: exists and is not an empty folder; clcli eval never overwrites. "
                           "Give a new (or empty) folder, or leave --output out (a new RUN_DIR/eval[-N])."])
    return output


def _check_scenario(run: FinishedRun, scenario, moved: dict) -> None:
    """The rebuilt scenario must be the one the run was trained and evaluated on (same tasks, classes
    and test-set sizes), or its rows would not be comparable."""
    recorded = (run.results or {}).get("scenario")
    if recorded is None:
        return
    now = json.loads(json.dumps(scenario.manifest()))
    if now != recorded:
        where = f" (moved: {', '.join(f'{k}={v[1]}' for k, v in moved.items())})" if moved else ""
        raise ConfigError([
            f"data{where}: the scenario built now differs from the one in {run.dir / 'results.json'} (tasks, "
            "classes or number of images), so its rows would not be comparable with the run's. Point "
            "paths.data_dir at the data the run was trained on."])


def _results(run, scenario, matrix, rows, skipped, effective, overrides, moved, rt, per_row, original_counts,
             original_source, method, total_s) -> dict:
    """results.json's fields for the re-evaluated rows, plus the ``reevaluation`` block."""
    finished = run.newest_task() + 1
    with warnings.catch_warnings():  # metrics over rows not re-evaluated are NaN (then null), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = _finite(scenario.metrics(matrix, finished=finished))
    new_rows = [[None if np.isnan(v) else float(v) for v in row] for row in matrix.percent()]
    old_rows = _percent_rows(original_counts)
    old = {k: np.asarray(v) for k, v in original_counts.items()}
    compared = []
    for t in rows:
        equal = (np.array_equal(old["correct"][t], matrix.correct[t]) and np.array_equal(old["total"][t], matrix.total[t]))
        diffs = [abs(a - b) for a, b in zip(old_rows[t], new_rows[t]) if a is not None and b is not None]
        compared.append({"task": t, "name": scenario.tasks[t].name, "equal_to_original": bool(equal),
                         "max_abs_diff": max(diffs, default=0.0), "original": old_rows[t], "reevaluated": new_rows[t]})
    ckpts = run.checkpoints()
    original = run.results or {}
    block = {
        "run_dir": str(run.dir.resolve()),
        "config_source": run.source,
        "fingerprint": run.fingerprint,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "overrides": [f"{k}={v}" for k, v in overrides.items()],
        "moved_with_paths": moved,
        "checkpoints": [{"task": t, "file": str(ckpts[t].relative_to(run.dir)), "sha256": _sha256(ckpts[t])} for t in rows],
        "original_rows_from": original_source,
        "rows": compared,
        "all_equal": all(r["equal_to_original"] for r in compared),
        "not_reevaluated": [{"task": t, "name": scenario.tasks[t].name, "reason": why} for t, why in skipped.items()],
        "original_metrics": original.get("metrics"),
        "original_headline": headline(original, partial=True) if original else None,
    }
    return {
        "format": FORMAT,
        "status": original.get("status", "complete"),
        "failure": original.get("failure"),
        "warnings": original.get("warnings", []),
        "fingerprint": run.fingerprint,
        "run": run.choices,
        "seed": effective.get("seed"),
        "train_seed": effective.get("seed") if effective.get("train_seed") is None else effective.get("train_seed"),
        **metrics,
        "accuracy_matrix": new_rows,
        "counts": matrix.state_dict(),
        "class_order": scenario.class_order,
        "tasks": [{"name": t.name, "class_ids": list(map(int, t.class_ids)), "labels": [t.labels.start, t.labels.stop]}
                  for t in scenario.tasks],
        "scenario": scenario.manifest(),
        "method_summary": method.summary(),
        "timings": {"rows": per_row, "total_s": total_s},
        "environment": environment(rt.device),
        "paper": effective.get("paper"),
        "config": effective,
        "reevaluation": block,
    }


def _write(run_dir: Path, target: Path | None, results: dict) -> Path:
    """Write every file into a hidden sibling of the destination, then rename it into place: a
    destination appears complete or not at all, and an existing folder is never touched."""
    parent = target.parent if target is not None else run_dir
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".clcli-eval-", suffix=".tmp"))
    try:
        write_outputs(staging, results)
        os.replace(staging / "results.json", staging / RESULTS_NAME)
        summary = (staging / "summary.md").read_text()
        block = results["reevaluation"]
        note = (f"Re-evaluation of `{block['run_dir']}` ({block['when']}), overrides: "
                f"{' '.join(block['overrides']) or 'none'}. Re-evaluated rows: "
                f"{', '.join(str(r['task']) for r in block['rows'])}; equal to the run's own: "
                f"{'yes' if block['all_equal'] else 'no'}.")
        atomic_write_text(staging / "summary.md", f"{note}\n\n{summary}")
        if target is not None:
            _check_output(target)
            os.rename(staging, target)  # onto a missing or empty folder
            return target
        for n in itertools.count():
            final = run_dir / ("eval" if n == 0 else f"eval-{n}")
            if final.exists():
                continue
            with contextlib.suppress(OSError):  # created meanwhile by another process: take the next name
                os.rename(staging, final)
                return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def print_comparison(results: dict, console) -> None:
    """Original vs re-evaluated accuracies, one line per re-evaluated row, then the rows left out."""
    from rich.markup import escape
    from rich.table import Table

    block = results["reevaluation"]
    table = Table(title=f"re-evaluation of {block['run_dir']}")
    for name, justify in (("after task", "left"), ("original (%)", "right"), ("re-evaluated (%)", "right"),
                          ("equal", "center")):
        table.add_column(name, justify=justify)

    def fmt(row):
        return " ".join(f"{v:.1f}" for v in row if v is not None)

    for r in block["rows"]:
        same = "[green]yes[/green]" if r["equal_to_original"] else f"[red]no[/red] (max {r['max_abs_diff']:.2f})"
        table.add_row(escape(r["name"]), fmt(r["original"]), fmt(r["reevaluated"]), same)
    console.print(table)
    now = headline(results, partial=True)
    was = {k: (block["original_headline"] or {}).get(k) for k in now}
    console.print("  ".join(f"[bold]{k}[/bold] {_num(was[k])} -> {_num(v)}" for k, v in now.items()), highlight=False)
    for r in block["not_reevaluated"]:
        console.print(f"[yellow]not re-evaluated: {escape(r['name'])} (task {r['task']}): {escape(r['reason'])}[/yellow]",
                      highlight=False)


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    task, overrides = split_overrides(args.overrides)
    return reevaluate(args.run_dir, task, overrides, args.output)[0]
