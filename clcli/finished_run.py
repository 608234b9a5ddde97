"""A run directory read back for ``clcli eval`` and ``clcli export-stats``: the configuration it was
trained with, its Hydra choices, its results, and checkpoints checked against that configuration.

The configuration comes from ``results.json`` (``config``, resolved; ``run``, the choices): it is the
exact dict the run's fingerprint was computed from (:func:`clcli.results.config_fingerprint`), so it
can be checked against the checkpoints as it is, whatever happened to ``conf/`` or the environment
since. ``.hydra/`` is the fallback for a run stopped before it wrote results.json: its
``overrides.yaml`` would have to be composed again with today's ``conf/`` files (changed defaults give
another config), and its ``config.yaml`` keeps interpolations such as ``${oc.env:...}`` that resolve
against today's environment; runs started from Python have no ``.hydra/`` at all. Either way the
configuration must hash to the fingerprint its checkpoints carry, or the run dir is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from clcli.errors import CheckpointError, ConfigError
from clcli.results import RunStore, config_fingerprint

CHECKPOINT_NAME = re.compile(r"^task_(\d+)\.pt$")


@dataclass
class FinishedRun:
    """A run dir with the configuration it was trained with (``config``: resolved, as fingerprinted)."""

    dir: Path
    config: dict
    choices: dict
    results: dict | None  # results.json, None for a run stopped before writing it
    source: str  # the file the configuration was read from
    store: RunStore

    @property
    def fingerprint(self) -> str:
        return self.store.fingerprint

    def checkpoints(self) -> dict[int, Path]:
        """The stored ``task_XX.pt`` by task index (with ``checkpoint.keep: last`` only the newest)."""
        return {int(m.group(1)): p for p in self.store.checkpoints() if (m := CHECKPOINT_NAME.match(p.name))}

    def newest_task(self) -> int:
        """The index of the newest stored checkpoint (the tasks up to it finished)."""
        found = self.checkpoints()
        if not found:
            raise CheckpointError(
                f"Run dir '{self.dir}' has no checkpoints (no {self.store.ckpt_dir}/task_XX.pt): the run finished no "
                "task, or its checkpoints were deleted. Nothing to read.")
        return max(found)

    def verify(self, tasks: list[int], stats_upto: int | None = None) -> dict | None:
        """Check that the checkpoints of ``tasks`` and the statistics files of tasks up to ``stats_upto``
        (default: the newest of ``tasks``) are readable clcli files of this configuration, before any
        work; returns the newest checkpoint's loaded state (statistics not merged in), None without
        ``tasks``. Raises :class:`CheckpointError` naming the file and the fix."""
        found, newest = self.checkpoints(), None
        for t in sorted(tasks):
            newest = self.read(found[t], t)
        last = max(tasks) if stats_upto is None else stats_upto
        for t in range(last + 1):
            if self.store.stats_path(t).is_file():
                self.read(self.store.stats_path(t), t)
        return newest

    def read(self, path: Path, task: int) -> dict:
        """Load the checkpoint or statistics file ``path`` of task ``task`` (RunStore's safe load) and
        refuse it unless it belongs to this configuration and task."""
        try:
            state = self.store.load_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (run dir '{self.dir}': nothing was evaluated or written.)") from exc
        theirs = state.get("fingerprint")
        if theirs != self.fingerprint:
            raise CheckpointError(
                f"'{path}' was written by a run of another configuration (fingerprint {theirs}), but the "
                f"configuration in {self.source} hashes to {self.fingerprint}: the file was copied in from "
                f"another run, or {self.source} was edited after the run. Nothing was evaluated or written; "
                "restore the run dir's own files.")
        if int(state.get("task", -1)) != task:
            raise CheckpointError(f"'{path}' holds the state after task {state.get('task')}, not task {task} as its "
                                  "name says (renamed?). Nothing was evaluated or written; restore the original file.")
        return state


def open_run(run_dir: str | Path) -> FinishedRun:
    """Read ``run_dir``'s configuration (results.json, else .hydra/) and check it against the
    fingerprint results.json recorded; checkpoints are checked by :meth:`FinishedRun.verify`."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ConfigError([f"RUN_DIR '{d}': no such directory. Give the run dir of a `clcli train` run (the "
                           "folder holding results.json and checkpoints/)."])
    results = RunStore(d, "").existing_results()  # invalid JSON: CheckpointError naming the file
    if results is not None:
        config, choices, source = results.get("config"), results.get("run"), str(d / "results.json")
        if not isinstance(config, dict) or not isinstance(choices, dict):
            raise CheckpointError(f"'{source}' lacks the run's 'config' or 'run' (not written by `clcli train`?); "
                                  "without them the run cannot be rebuilt.")
    else:
        config, choices, source = _from_hydra(d)
    fingerprint = config_fingerprint(config)
    recorded = (results or {}).get("fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise CheckpointError(
            f"The 'config' in '{source}' hashes to {fingerprint}, but the run recorded fingerprint {recorded}: the "
            "config was edited after the run, or the run was written by a clcli version that fingerprints configs "
            "differently. Its checkpoints cannot be trusted to match it; nothing was evaluated or written. Restore "
            "the original results.json.")
    return FinishedRun(d, config, dict(choices), results, source, RunStore(d, fingerprint))


def _from_hydra(d: Path) -> tuple[dict, dict, str]:
    """The resolved config and choices Hydra saved in ``d/.hydra/`` (a run stopped before results.json)."""
    cfg_path, hydra_path = d / ".hydra" / "config.yaml", d / ".hydra" / "hydra.yaml"
    if not cfg_path.is_file():
        raise ConfigError([f"RUN_DIR '{d}': neither results.json nor .hydra/config.yaml is there, so the run's "
                           "configuration is unknown. Give the run dir of a `clcli train` run."])
    try:
        config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        choices = {}
        if hydra_path.is_file():
            raw = OmegaConf.select(OmegaConf.load(hydra_path), "hydra.runtime.choices", default=None)
            if raw is not None:
                choices = {k: v for k, v in OmegaConf.to_container(raw, resolve=False).items()
                           if not str(k).startswith("hydra")}
    except Exception as exc:  # noqa: BLE001 - any YAML or interpolation problem is reported the same way
        raise CheckpointError(f"'{cfg_path}' cannot be read back as a configuration ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}).") from exc
    return config, choices, str(cfg_path)
