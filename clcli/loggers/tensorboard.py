"""``logger=tensorboard``: event files under ``<run dir>/<subdir>`` (``pip install 'clcli[tensorboard]'``).

Scalars per step; the flattened config as hyper-parameters (TensorBoard's HPARAMS tab, next to the
``final/*`` metrics) and the config and environment as text. A resumed run replays the history it
restored (:func:`clcli.loggers.replay`): the writer purges earlier event files' steps from step 1 on,
so TensorBoard shows every step once.
"""
from __future__ import annotations

import json
from pathlib import Path

from clcli.loggers import flatten

FINAL_METRICS = ("final/last_acc", "final/inc_acc", "final/forgetting", "final/transfer", "final/avg", "final/last")


class TensorBoardLogger:
    requires = ("tensorboard", "tensorboard")  # (module, clcli extra): checked by clcli validate

    def __init__(self, run_dir: Path, subdir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir), purge_step=1)

    def log_hparams(self, config: dict, env: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the HPARAMS tab: every flattened config key against the final metrics (logged at the end)
        for summary in hparams(flatten(config), {k: 0.0 for k in FINAL_METRICS}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        self.writer.add_text("environment", "```\n" + json.dumps(env, indent=2, default=str) + "\n```", 0)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()
