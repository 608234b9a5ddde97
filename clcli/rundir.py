"""A single run's directory when the run fails (README "Resume, validation, failures"): a failed run
leaves a trace, an empty one leaves nothing.

- The error goes into the run's log (``<run dir>/clcli.log``): the clcli paragraph of a bad-input
  error, or the traceback of anything else. The console shows it already (``clcli.cli._guarded``
  or Hydra), so it is written to the log file's handler only.
- A bad-input error (:class:`clcli.errors.ClcliError`) raised before the run wrote anything removes
  the run dir, but only when Hydra created that dir for this run (:class:`RunDirRecord` notes whether
  it existed before) and it still holds nothing but what Hydra wrote into it (``.hydra/`` and the
  log). A dir with results, checkpoints, or anything else is never deleted.
"""
from __future__ import annotations

import logging
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback

from clcli.errors import ClcliError

HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into <run dir>/.hydra

# Run dirs (resolved) that did not exist when their run started, as recorded by RunDirRecord.
_created: set[Path] = set()


class RunDirRecord(Callback):
    """Hydra callback: before a single run, note whether its ``hydra.run.dir`` exists yet (Hydra
    creates it just after)."""

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.instance()
        before = hc.cfg
        hc.set_config(config)  # as run_job does next, so that `${hydra:...}` in the dir resolves
        try:
            run_dir = Path(str(config.hydra.run.dir)).resolve()
        finally:
            hc.cfg = before
        if not run_dir.exists():
            _created.add(run_dir)


def _log_files(run_dir: Path) -> list[logging.FileHandler]:
    """The root logger's file handlers writing into ``run_dir`` (Hydra's job log)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == run_dir.resolve()]


def only_hydra_files(run_dir: Path, log_name: str) -> bool:
    """True when ``run_dir`` holds nothing but Hydra's ``.hydra/`` files and the job log."""
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            if any(not p.is_file() or p.name not in HYDRA_FILES for p in entry.iterdir()):
                return False
        elif entry.name != log_name or not entry.is_file():
            return False
    return True


def write_to_log(run_dir: Path, text: str) -> bool:
    """Append an ERROR record to the run's log file only (not the console); False without one."""
    handlers = _log_files(run_dir)
    record = logging.LogRecord("clcli", logging.ERROR, __file__, 0, text, None, None)
    for h in handlers:
        h.handle(record)
        h.flush()
    return bool(handlers)


def _clcli_error(exc: BaseException) -> ClcliError | None:
    """``exc`` or its explicit cause when a ClcliError (Hydra wraps errors raised while instantiating)."""
    err: BaseException | None = exc
    while err is not None and not isinstance(err, ClcliError):
        err = err.__cause__
    return err


def failure_text(exc: BaseException) -> str:
    """A clcli error's paragraph, or the traceback of anything else."""
    err = _clcli_error(exc)
    if err is not None:
        return f"the run failed: {err}"
    return "the run failed:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def guarded_run(job: Callable[[], dict], run_dir: Path, log_name: str) -> dict:
    """Run ``job`` (one run into ``run_dir``); on an exception, remove the run dir when it was empty
    and the error is bad input, else write the error into the run's log; then re-raise."""
    run_dir = Path(run_dir).resolve()
    try:
        return job()
    except SystemExit:
        raise
    except BaseException as exc:  # KeyboardInterrupt included: the log says where the run stopped
        if _clcli_error(exc) is not None and run_dir in _created and run_dir.is_dir() and only_hydra_files(run_dir, log_name):
            for h in _log_files(run_dir):  # close the job log before its file goes
                logging.getLogger().removeHandler(h)
                h.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            write_to_log(run_dir, failure_text(exc))
        raise
    finally:
        _created.discard(run_dir)
