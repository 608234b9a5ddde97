"""``logger=mlflow``: an MLflow run (``pip install 'clcli[mlflow]'``).

The default store is ``file:<run dir>/mlruns`` (offline, no server; ``mlflow ui --backend-store-uri
<run dir>/mlruns``). MLflow 3 keeps that file store in maintenance mode and refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true``, which is set here for ``file:`` stores unless you set it yourself.
``tracking_uri`` names another store (``sqlite:///...``, a server) to collect many runs in one place.
The flattened config goes in as params, the environment as ``env.*`` tags, the whole config as the
artifact ``config.json``; the status ends the run (complete: FINISHED, else FAILED).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from clcli.loggers import flatten

MAX_PARAM_CHARS, BATCH = 6000, 100  # MLflow's limits: a param value's length, params per log_batch call


class MLflowLogger:
    requires = ("mlflow", "mlflow")  # (module, clcli extra): checked by clcli validate

    def __init__(self, run_dir: Path, tracking_uri: str | None = None, experiment_name: str = "clcli",
                 run_name: str | None = None):
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records go through clcli's logging
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self.tracking_uri = tracking_uri or (run_dir / "mlruns").as_uri()
        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run = self.client.create_run(experiment_id, run_name=run_name or run_dir.name,
                                     tags={"clcli.run_dir": str(run_dir)})
        self.run_id = run.info.run_id

    def log_hparams(self, config: dict, env: dict) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        tags = [RunTag(f"env.{k}", str(v)) for k, v in flatten(env).items()]
        for i in range(0, max(len(params), len(tags)), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH], tags=tags[i:i + BATCH])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, status: str) -> None:
        self.client.set_tag(self.run_id, "clcli.status", status)
        self.client.set_terminated(self.run_id, "FINISHED" if status == "complete" else "FAILED")
