"""Sweeps that always run to the end: every job's outcome is recorded, and one summary follows.

A job of ``clcli train -m`` never stops the sweep: a training outcome (``diverged``) is written into
the job's results.json by the run loop, and any other error of a job (unreadable data, a bug) is
logged with its traceback and recorded as ``error``. Each job writes one small record,
``<sweep dir>/.clcli/jobs/<job number>.json`` (overrides, status, headline metrics, run dir, why),
from whichever process runs it: in-process (basic launcher), a joblib worker, or a SLURM job. The
Hydra callback :class:`SweepReport` clears the records when the sweep starts and, once every job
has returned, prints one line per job; the CLI then exits 3 if some job did not complete.

Hydra keeps a job's return value in the launching process only for the basic launcher, and its
multirun-end callback gets no job results at all; files in the sweep dir reach the launching process
under every launcher, hence the records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.experimental.callback import Callback

from clcli import distributed
from clcli.results import atomic_write_text

RECORDS = Path(".clcli") / "jobs"

# Set in the launching process when a sweep ends: the jobs that did not complete.
last_incomplete: list[dict] | None = None


def record_job(sweep_dir: str | Path, record: dict) -> None:
    """Write one job's record (``num``, ``overrides``, ``status``, ``headline``, ``run_dir``,
    ``message``) into the sweep dir (rank 0 of a multi-process job)."""
    if distributed.is_main():
        atomic_write_text(Path(sweep_dir) / RECORDS / f"{int(record['num']):05d}.json", json.dumps(record, default=str))


def read_records(sweep_dir: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / RECORDS).glob("*.json"))]


def incomplete(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") != "complete"]


def print_report(records: list[dict], console, sweep_dir: str | Path = "") -> None:
    """One line per job (number, status, headline metrics, overrides), then which jobs did not complete.
    A job that stopped early shows the metrics of the tasks it finished, marked ``partial``."""
    from rich.table import Table
    from rich.text import Text

    if not records:
        return
    table = Table(title=Text(f"sweep {sweep_dir}: {len(records)} job(s)"), title_justify="left")
    for name in ("#", "status", "headline", "overrides"):
        table.add_column(name, overflow="fold", no_wrap=name != "overrides")
    for r in records:
        style = "green" if r["status"] == "complete" else "red"
        metrics = " ".join(f"{k} {v:.2f}" for k, v in (r.get("headline") or {}).items() if v is not None)
        if r["status"] != "complete" and metrics:
            metrics = f"partial: {metrics}"
        warn = f" ({r['warnings']} warning(s))" if r.get("warnings") else ""
        table.add_row(str(r["num"]), Text(r["status"] + warn, style=style), Text(metrics),
                      Text(" ".join(r["overrides"]) or "(none)"))
    console.print(table)
    bad = incomplete(records)
    if bad:
        console.print(f"{len(bad)} of {len(records)} job(s) did not complete:", style="red", highlight=False)
        for r in bad:
            console.print(f"  #{r['num']} ({' '.join(r['overrides'])}): {r['status']}: {r.get('message', '')}",
                          markup=False, highlight=False, soft_wrap=True)  # one line per job, for grep


class SweepReport(Callback):
    """Clears the job records when a sweep starts; prints the per-job summary when it ends."""

    def on_multirun_start(self, config, **kwargs) -> None:
        global last_incomplete
        last_incomplete = None
        if distributed.env_world_size() > 1 and int(os.environ.get("RANK", "0")) != 0:
            return  # torchrun: the group starts with the first job; rank 0 alone clears
        for p in (Path(config.hydra.sweep.dir) / RECORDS).glob("*.json"):
            p.unlink()

    def on_multirun_end(self, config, **kwargs) -> None:
        global last_incomplete
        import sys

        from rich.console import Console

        if not distributed.is_main():  # under torchrun every process runs the sweep; rank 0 reports
            return
        records = read_records(config.hydra.sweep.dir)
        if records:  # `clcli validate` runs its checks as a sweep too, and writes no records
            print_report(records, Console(stderr=True, width=None if sys.stderr.isatty() else 200),
                         config.hydra.sweep.dir)
            last_incomplete = incomplete(records)
