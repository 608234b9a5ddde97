"""``clcli`` dispatcher: ``train`` and ``validate`` hand the rest of argv to Hydra; ``table``,
``data``, ``eval``, ``export-stats``, ``ls`` and ``cp`` are plain argparse commands; ``-sc`` answers
the shell completion script Hydra generates (``clcli train --shell-completion install=bash``)."""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

USAGE = """usage: clcli <command> [args]

commands:
  train [overrides]      run an experiment (Hydra overrides, -m for sweeps, --cfg job to print the config)
  validate [overrides]   check a configuration (keys, values, data dirs, weight files) and exit
  table DIR              aggregate results.json files under DIR into a mean ± std table
  data prepare NAME      turn a downloaded dataset into the folder layout clcli reads
  data download NAME     download, verify, extract and prepare imagenet_r or cub200 (resumable)
  eval RUN_DIR [task=K] [key=value] [--output DIR]
                         evaluate a finished run again from its checkpoints (paths.data_dir=, device=,
                         eval.batch_size= may change); writes RUN_DIR/eval[-N]/ or DIR
  export-stats RUN_DIR --output F.npz|F.safetensors [--task K] [--force]
                         write the Gaussian statistics stored in a run's checkpoints
  ls [GROUP]             list the config groups and their options (presets), with what each is
  cp GROUP/OPTION FILE   copy a preset to FILE for editing (never overwrites); use it with --config-dir
  --version              print clcli's version

Shell completion: eval "$(clcli train --shell-completion install=bash)"

Examples:
  clcli train                                   # SLCA on split_digits with EfficientNet-Lite0 (offline)
  clcli train method=slca data=split_cifar100 backbone=vit_b16_in21k
  clcli train experiment=slca/slca_cifar100_in21k seed=1996
  clcli train -m optim.lr.representation=1e-4,1e-3 seed=1993,1996,1997
"""

EXIT_INCOMPLETE = 3  # a run (or some job of a sweep) ended diverged or failed; 2 is bad input

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _config_dir() -> str:
    """conf/ sits at the repo top level (editable install) or is shipped inside the package."""
    top = Path(__file__).resolve().parent.parent / "conf"
    return str(top) if (top / "config.yaml").is_file() else CONFIG_DIR


def _hydra_main(task_fn):
    import hydra

    @hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
    def _main(cfg):
        return task_fn(cfg)

    return _main


def _train(cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from clcli.rundir import guarded_run
    from clcli.train import run

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode != RunMode.MULTIRUN:
        # a failure goes into the run's log; an empty run dir of a bad-input failure is removed (clcli.rundir)
        results = _guarded(lambda: guarded_run(lambda: run(cfg, run_dir, choices), run_dir, f"{hc.job.name}.log"))
        if results.get("status", "complete") != "complete":
            failure = (results.get("failure") or {}).get("message", "")
            print(f"clcli: the run did not complete ({results['status']}): {failure} Results so far: "
                  f"{run_dir / 'results.json'}.", file=sys.stderr)
            sys.exit(EXIT_INCOMPLETE)
        return results
    return _sweep_job(lambda: run(cfg, run_dir, choices), hc, run_dir)


def _sweep_job(job, hc, run_dir: Path) -> dict:
    """Run one job of a sweep and record its outcome (``clcli.sweep``); nothing a job raises stops
    the sweep: a bad-input error prints its paragraph, anything else its traceback (job log)."""
    import logging

    from clcli import sweep
    from clcli.report import headline

    record = {"num": hc.job.num, "overrides": list(hc.overrides.task), "run_dir": str(run_dir)}
    try:
        results = job()
        status = results.get("status", "complete")
        record.update(status=status, headline=headline(results, partial=True), warnings=len(results.get("warnings") or []),
                      message=(results.get("failure") or {}).get("message", ""))
    except Exception as exc:  # noqa: BLE001 - recorded as the job's outcome; the sweep goes on
        cause = _clcli_cause(exc)
        if cause is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
            from clcli.rundir import failure_text, write_to_log

            print(f"clcli: error: {cause}", file=sys.stderr)
            write_to_log(run_dir, failure_text(cause))  # the job's log keeps it too
        else:
            logging.getLogger("clcli").exception("job #%s failed", hc.job.num)
        record.update(status="error", message=str(cause or f"{type(exc).__name__}: {exc}"))
    sweep.record_job(hc.sweep.dir, record)
    return record


def _clcli_cause(exc: BaseException):
    """The ClcliError behind ``exc``: itself or its explicit cause (Hydra wraps errors raised while
    instantiating a config as ``InstantiationException(...) from err``)."""
    from clcli.errors import ClcliError

    err: BaseException | None = exc
    while err is not None and not isinstance(err, ClcliError):
        err = err.__cause__
    return err


_invalid_jobs: list[str] = []


def _validate(cfg, quiet: bool = False):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from rich.console import Console
    from rich.markup import escape

    from clcli.config import check_config
    from clcli.errors import ConfigError

    problems = _guarded(lambda: check_config(cfg))
    console = Console(stderr=quiet)
    hc = HydraConfig.get()
    # a sweep validates every job: say which one each verdict is about
    job = escape(f"{' '.join(hc.overrides.task) or '(no overrides)'}: ") if hc.mode == RunMode.MULTIRUN else ""
    if problems:
        if quiet and not job:  # a single run: the same paragraph as any other bad-input error
            print(f"clcli: error: {ConfigError(problems)}", file=sys.stderr)
        else:
            console.print(f"{job}[red]{len(problems)} problem(s):[/red]", highlight=False)
            for p in problems:
                console.print(f"  - {p}", markup=False, highlight=False)
        _invalid_jobs.append(job)  # every job of a sweep is checked; the exit code comes at the end
        return
    if not quiet:
        console.print(f"{job}[green]configuration is valid[/green]", highlight=False)


# Hydra flags after which `clcli train` runs no job (it prints, or completes the shell): no pre-check.
_NO_JOB_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                 "--package", "-p", "--resolve"}


def _check_jobs(rest: list[str], quiet: bool) -> int:
    """Validate the configuration of every job that ``rest`` describes (one, or every job of a sweep)
    in this process, writing nothing; returns the number of invalid jobs. Launcher settings are
    dropped: the checks are cheap, and a joblib worker or a SLURM job could not report back."""
    _invalid_jobs.clear()
    scratch = tempfile.mkdtemp(prefix="clcli-validate-")
    argv = [a for a in rest if not re.match(r"^[+~]*hydra([./])launcher", a)]
    sys.argv = ["clcli validate", *_after_overrides(argv, [
        "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", "hydra.run.dir=.",
        f"hydra.sweep.dir={scratch}", "hydra/launcher=basic"])]
    try:
        _run_hydra(lambda cfg: _validate(cfg, quiet=quiet))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return len(_invalid_jobs)


# Hydra's flags that take a value (the next word is not an override).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun"}


def _after_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with ``extra`` overrides right after its last override: Hydra's argparse takes one run
    of overrides, so ``a=1,2 -m`` + extra must not become ``a=1,2 -m extra``."""
    last, i = -1, 0
    while i < len(argv):
        if argv[i].startswith("-"):
            i += 2 if argv[i] in _VALUE_FLAGS else 1
            continue
        last, i = i, i + 1
    return [*argv[: last + 1], *extra, *argv[last + 1:]]


def _run_hydra(task_fn) -> None:
    """Hydra's main on ``sys.argv``, with Hydra's own composition errors (unknown option or key,
    malformed override) printed as one clcli paragraph with a suggestion, exit 2
    (``clcli.hydra_errors``). With HYDRA_FULL_ERROR=1 Hydra reports them itself."""
    from clcli.hydra_errors import translate

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return _hydra_main(task_fn)()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting 1
    try:
        return _hydra_main(task_fn)()
    except Exception as exc:
        err = translate(exc, sys.argv[1:])
        if err is None:
            raise
        print(f"clcli: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


_COMMANDS = ("train", "validate", "table", "data", "eval", "export-stats", "ls", "cp")
_SHELL_COMPLETION = {"--shell-completion", "-sc"}


def _complete(rest: list[str]) -> None:
    """Answer ``clcli -sc query=SHELL``, the call of Hydra's completion script, for the line in
    ``COMP_LINE``: the command names; after ``train`` / ``validate`` Hydra's own completion of
    overrides (on the line without the command word), except ``group=...`` which the presets on disk
    answer (Hydra completes no nested option such as ``experiment=slca/...``); presets after ``ls`` /
    ``cp``. Anything else (``install=bash``) is Hydra's."""
    line = os.environ.get("COMP_LINE")
    query = next((a.split("=", 1)[1] for a in rest if a.startswith("query=")), None)
    if line is None or query is None:
        sys.argv = ["clcli", "-sc", *rest]  # the generated script then registers and calls `clcli`
        return _run_hydra(lambda cfg: None)
    from clcli import presets

    words, new_word = line.split(), line.endswith(" ")
    done = len(words) - (0 if new_word else 1)  # words before the one being completed
    partial = "" if new_word or done == 0 else words[-1]
    if done < 2:
        candidates = list(_COMMANDS)
    elif words[1] in ("train", "validate"):
        from clcli.hydra_errors import user_config_dirs

        m = re.match(r"^(\+?)([\w/]+)=", partial)
        cat = presets.catalog(presets.config_dirs(user_config_dirs(words))) if m else {}
        if not m or m.group(2) not in cat:
            return _complete_with_hydra(line, rest)
        candidates = [f"{m.group(1)}{m.group(2)}={o.name}" for o in cat[m.group(2)]]
    elif words[1] in ("ls", "cp") and done == 2:
        cat = presets.catalog(presets.config_dirs())
        candidates = list(cat) if words[1] == "ls" else [o.spec for opts in cat.values() for o in opts]
    else:
        candidates = []
    print(("\n" if query == "fish" else " ").join(c for c in candidates if c.startswith(partial)))


def _complete_with_hydra(line: str, rest: list[str]) -> None:
    """Hydra's completion of overrides, on the line without the command word."""
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+\s+)\S+\s?", r"\1", line, count=1)
    sys.argv = ["clcli", "-sc", *rest]
    return _run_hydra(lambda cfg: None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clcli")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; pip install -e .)"


def _guarded(fn):
    """Print a ClcliError as one paragraph and exit 2 (traceback only with HYDRA_FULL_ERROR=1).
    Hydra wraps errors raised while instantiating a config; the cause chain is searched."""
    from clcli.errors import ClcliError

    try:
        return fn()
    except Exception as exc:
        err = exc if isinstance(exc, ClcliError) else _clcli_cause(exc)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"clcli: error: {err}", file=sys.stderr)
        sys.exit(2)


def _eval(rest: list[str]) -> None:
    """``clcli eval``: the work is in :mod:`clcli.evaluate_run`; bad input exits 2."""
    from clcli.evaluate_run import main as eval_main

    _guarded(lambda: eval_main(rest))


def _export_stats(rest: list[str]) -> None:
    """``clcli export-stats``: the work is in :mod:`clcli.export`; bad input exits 2."""
    from clcli.export import main as export_main

    _guarded(lambda: export_main(rest))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "--version":
        print(f"clcli {_version()}")
    elif command in _SHELL_COMPLETION:
        _complete(rest)
    elif command == "train":
        flags = {a.split("=")[0] for a in rest}
        if flags & _NO_JOB_FLAGS:  # prints (config, help, completion script) and runs nothing
            sys.argv = ["clcli" if flags & _SHELL_COMPLETION else "clcli train", *rest]
            _run_hydra(_train)
            return
        # Every job is checked before any job runs (a sweep's bad job would otherwise surface mid-sweep).
        if _check_jobs(rest, quiet=True):
            if len(_invalid_jobs) > 1 or _invalid_jobs[0]:
                print(f"clcli: error: {len(_invalid_jobs)} sweep job(s) have configuration problems (listed "
                      "above); no job was run.", file=sys.stderr)
            sys.exit(2)
        from clcli import sweep

        sweep.last_incomplete = None
        sys.argv = ["clcli train", *rest]  # Hydra parses sys.argv itself: without our subcommand word
        _hydra_main(_train)()
        if sweep.last_incomplete:
            sys.exit(EXIT_INCOMPLETE)
    elif command == "validate":
        # validate writes nothing: no .hydra/ or log, and a sweep's folders go to a scratch dir.
        if _check_jobs(rest, quiet=False):
            sys.exit(2)
    elif command == "table":
        from clcli.table import main as table_main

        table_main(rest)
    elif command == "data":
        from clcli.data.prepare import main as data_main

        data_main(rest)
    elif command == "eval":
        _eval(rest)
    elif command == "export-stats":
        _export_stats(rest)
    elif command in ("ls", "cp"):
        from clcli.presets import main as presets_main

        _guarded(lambda: presets_main(command, rest))
    else:
        print(f"clcli: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
