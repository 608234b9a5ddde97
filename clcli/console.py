"""The terminal: one rich console for log lines, progress bars, the config tree and the summary.

On a terminal, log records go through rich's ``RichHandler`` on the same ``Console`` as the live
progress bars (:class:`clcli.engine.Runtime`), so rich prints them above the bars and never redraws
over them. When the output is not a terminal (a pipe, a SLURM log) there are no bars and every
record is one plain line without control characters. Third-party INFO records (open_clip logs on
the root logger; timm, PIL, matplotlib, the trackers) reach the run's log file only
(:class:`ConsoleFilter`). Hydra sets this up: ``conf/hydra/job_logging/clcli.yaml``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from omegaconf import OmegaConf
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.tree import Tree

PLAIN_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default line format
_console: Console | None = None


def get_console() -> Console:
    """The process's console (stdout): log lines, bars, config tree and summary share it."""
    global _console
    if _console is None:
        _console = Console()
    return _console


class ConsoleFilter(logging.Filter):
    """Lets through records of the ``show`` loggers (and their children) at any level, other
    loggers' records from ``level`` up, and never a record logged with ``extra={"console": False}``
    (e.g. the config, which the console shows as a tree)."""

    def __init__(self, show: Sequence[str] = ("clcli", "hydra"), level: str | int = "WARNING"):
        super().__init__()
        self.show = tuple(show)
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        own = any(record.name == n or record.name.startswith(n + ".") for n in self.show)
        return own or record.levelno >= self.level


class ConsoleHandler(logging.Handler):
    """Log records on :func:`get_console`: rich's handler on a terminal, plain lines otherwise.
    Decided per record, so output that is redirected later (pytest's capture) stays plain."""

    def __init__(self, level: int | str = logging.NOTSET):
        super().__init__(level)
        self.console = get_console()
        self.rich = RichHandler(console=self.console, show_path=False, markup=False, rich_tracebacks=False,
                                log_time_format="[%X]")
        self.setFormatter(logging.Formatter(PLAIN_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.console.is_terminal:
            self.rich.handle(record)
            return
        try:
            file = self.console.file
            file.write(self.format(record) + "\n")
            file.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class Bars:
    """Live progress bars (rich ``Progress``), innermost last, redrawn by the thread that updates
    them, at most ``fps`` times a second. Rich's auto-refresh thread is off on purpose: a redraw
    from that thread while a log line is being printed above the bars can move the cursor by the
    wrong number of lines, erasing a log line or leaving a stale bar behind."""

    def __init__(self, console: Console, fps: float = 10.0):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        self.progress = Progress(*columns, console=console, transient=True, auto_refresh=False)
        self.stack: list = []  # task ids of the bars shown, innermost last
        self.period, self.last = 1.0 / fps, 0.0

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stack.clear()
        self.progress.stop()

    def add(self, description: str, total: int | None):
        task = self.progress.add_task(description, total=total, info="")
        self.stack.append(task)
        self.refresh(force=True)
        return task

    def advance(self, task) -> None:
        self.progress.advance(task)
        self.refresh()

    def remove(self, task) -> None:
        self.stack.remove(task)
        self.progress.remove_task(task)
        self.refresh(force=True)

    def info(self, text: str) -> None:
        """Text after the innermost bar (fit: loss, learning rates, images/s)."""
        if self.stack:
            self.progress.update(self.stack[-1], info=text)
            self.refresh()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.period:
            self.progress.refresh()
            self.last = now


def bars(console: Console) -> Bars | None:
    """Bars on a terminal, else None: redrawn bars would only fill a log file with control characters."""
    if not console.is_terminal or console.is_dumb_terminal:
        return None
    return Bars(console)


def epoch_text(loss: float, lrs: Sequence[float], images_per_s: float) -> str:
    """``loss 0.4321  lr 0.0001, 0.05  812 img/s``: the epoch bar's field and the epoch log line."""
    lr = ", ".join(f"{v:.3g}" for v in lrs)
    return f"loss {loss:.4f}  lr {lr}  {images_per_s:.0f} img/s"


def show_config(cfg, console: Console, log: logging.Logger,
                first: Sequence[str] = ("data", "backbone", "method", "optim", "logger")) -> None:
    """Print ``cfg`` once as a tree (one branch per top-level key, YAML inside) and write it, as
    YAML, to the log file only (the console already shows the tree)."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    tree = Tree("config", guide_style="dim")
    for key in [k for k in first if k in container] + [k for k in container if k not in first]:
        value = container[key]
        if isinstance(value, (dict, list)):
            text = OmegaConf.to_yaml(OmegaConf.create(value)).rstrip() if value else str(value)
            tree.add(f"[bold]{escape(str(key))}[/bold]").add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            tree.add(escape(OmegaConf.to_yaml({key: value}).strip()))  # `train_seed: null`
    console.print(tree)
    log.info("config:\n%s", OmegaConf.to_yaml(OmegaConf.create(container)).rstrip(), extra={"console": False})
