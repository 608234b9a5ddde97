"""``logger=wandb``: a Weights & Biases run (``pip install 'clcli[wandb]'``), offline by default.

Offline, the run lives in ``<run dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it later (a
compute node without network, a SLURM job). The W&B run config is the resolved clcli config plus
an ``environment`` entry; the status is in the run summary. W&B's console capture is off: the
console belongs to clcli (:mod:`clcli.console`).
"""
from __future__ import annotations

from pathlib import Path

from clcli.errors import ConfigError

MODES = ("offline", "online", "disabled")


class WandbLogger:
    requires = ("wandb", "wandb")  # (module, clcli extra): checked by clcli validate

    def __init__(self, run_dir: Path, mode: str = "offline", project: str = "clcli", entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags=()):
        if problems := self.config_problems(mode):
            raise ConfigError(problems)
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, name=name or run_dir.name, group=group,
                              tags=[str(t) for t in tags or ()], dir=str(run_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))

    @staticmethod
    def config_problems(mode: str = "offline", **_) -> list[str]:
        return [] if mode in MODES else [f"logger.wandb.mode: expected one of {', '.join(MODES)}, got '{mode}'."]

    def log_hparams(self, config: dict, env: dict) -> None:
        self.run.config.update({**config, "environment": env}, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "complete" else 1)
