"""``clcli`` dispatcher: ``train`` and ``validate`` hand the rest of argv to Hydra; ``table`` and
``data`` are plain argparse commands."""
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

Examples:
  clcli train                                   # SLCA on split_digits with EfficientNet-Lite0 (offline)
  clcli train method=slca data=split_cifar100 backbone=vit_b16_in21k
  clcli train -m optim.lr.representation=1e-4,1e-3 seed=1993,1996,1997
"""

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

    from clcli.train import run

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    return _guarded(lambda: run(cfg, Path(hc.runtime.output_dir), choices))


_invalid_jobs: list[str] = []


def _validate(cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from rich.console import Console
    from rich.markup import escape

    from clcli.config import check_config

    problems = _guarded(lambda: check_config(cfg))
    console = Console()
    hc = HydraConfig.get()
    # a sweep validates every job: say which one each verdict is about
    job = escape(f"{' '.join(hc.overrides.task) or '(no overrides)'}: ") if hc.mode == RunMode.MULTIRUN else ""
    if problems:
        console.print(f"{job}[red]{len(problems)} problem(s):[/red]", highlight=False)
        for p in problems:
            console.print(f"  - {p}", markup=False, highlight=False)
        _invalid_jobs.append(job)  # every job of a sweep is checked; the exit code comes at the end
        return
    console.print(f"{job}[green]configuration is valid[/green]", highlight=False)


def _guarded(fn):
    """Print a ClcliError as one paragraph and exit 2 (traceback only with HYDRA_FULL_ERROR=1).
    Hydra wraps errors raised while instantiating a config; the cause chain is searched."""
    from clcli.errors import ClcliError

    try:
        return fn()
    except Exception as exc:
        err: BaseException | None = exc
        while err is not None and not isinstance(err, ClcliError):
            err = err.__cause__ or err.__context__
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"clcli: error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in ("train", "validate"):
        # Hydra parses sys.argv itself: drop our subcommand word first.
        sys.argv = [f"clcli {command}", *rest]
        if command == "train":
            _hydra_main(_train)()
            return
        # validate writes nothing: no .hydra/ or log, and a sweep's folders go to a scratch dir. Its
        # jobs run in this process (basic launcher, whatever launcher the sweep names): the checks are
        # cheap, and a joblib worker or a SLURM job could not report back into _invalid_jobs.
        _invalid_jobs.clear()
        scratch = tempfile.mkdtemp(prefix="clcli-validate-")
        sys.argv = [a for a in sys.argv if not re.match(r"^[+~]*hydra/launcher=", a)]
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     "hydra.run.dir=.", f"hydra.sweep.dir={scratch}", "hydra/launcher=basic"]
        try:
            _hydra_main(_validate)()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if _invalid_jobs:
            sys.exit(2)
    elif command == "table":
        from clcli.table import main as table_main

        table_main(rest)
    elif command == "data":
        from clcli.data.prepare import main as data_main

        data_main(rest)
    else:
        print(f"clcli: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
