"""``logger=csv`` (the default): ``metrics.csv`` in the run dir, one row per logged step.

The columns are ``step`` and every key logged so far (in first-seen order), the layout of
Lightning's CSV logger: a row holds the keys of one call (an epoch's ``train/*``, a task's ``acc/*``,
the ``final/*`` metrics) and leaves the others empty. The file is rewritten atomically after every
call, so it is complete at every moment. Hyper-parameters are not repeated here: the run dir has
them (``.hydra/config.yaml``, results.json ``config`` and ``environment``).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from clcli.results import atomic_write_text


class CSVLogger:
    def __init__(self, run_dir: Path, filename: str = "metrics.csv"):
        self.path = Path(run_dir) / filename
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []

    def log_hparams(self, config: dict, env: dict) -> None:
        """Nothing to write: the run's config and environment are in results.json and .hydra/."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.columns += [k for k in metrics if k not in self.columns]
        self.rows.append({"step": step, **metrics})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def finish(self, status: str) -> None:
        """Nothing to close: every ``log_metrics`` rewrote the whole file atomically."""
