"""The run store: atomic writes, the config fingerprint, per-task checkpoints and their statistics
files, results.json's reading and guarding, the software environment. Rendering a run's results
(results.json, csv, markdown, plots) is :mod:`clcli.report`; its public names stay importable from
here.

Every file is written to a temporary sibling and renamed (``os.replace`` is atomic on POSIX), so a
process killed at any moment leaves either the previous complete file or the new complete one. The
temporary file is created with mode 0666 minus the umask, as ``open()`` would (``tempfile.mkstemp``
would leave 0600). In a multi-process run (``clcli.distributed``) only rank 0 writes; the other
ranks only read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import secrets
import subprocess
import sys
from pathlib import Path

import torch

from clcli import distributed
from clcli import stats as stats_lib
from clcli.errors import CheckpointError

# v2: statistics of finished keys (SLCA classes, DIKI tasks) live in checkpoints/task_XX.stats.pt, written
# once by the task that finalized them; task_XX.pt holds the rest of the state and a stub naming the keys.
# v1 checkpoints (everything inline) are still read.
CHECKPOINT_FORMAT = "clcli-checkpoint-v2"
READABLE_FORMATS = ("clcli-checkpoint-v1", CHECKPOINT_FORMAT)


def _create_temporary(directory: Path, name: str) -> tuple[int, str]:
    """Open a new hidden sibling ``.<name>.<random>.tmp`` for writing (``O_EXCL``: never an existing
    file) with mode 0666, which the kernel reduces by the umask (and a default ACL), as for any
    file the user creates."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for '{name}' in '{directory}'")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# Bumped when the code draws random numbers differently for the same config, so that a run dir
# started by an older version is refused on resume instead of continuing with another stream.
# 2: unshuffled loaders (evaluation, statistics, feature passes) no longer draw from the global RNG.
# 3: classifier-alignment noise on the CPU: one stream per class, seeded by one draw per epoch (clcli.noise).
RNG_PROTOCOL = 3


def config_fingerprint(resolved: dict) -> str:
    """Hash of the parts of a config that change results (not device, workers, resume, paths, caches, loggers,
    nor the experiment's ``paper`` metadata: editing a note must not orphan its run dirs), and of
    :data:`RNG_PROTOCOL`. ``eval`` stays in: DIKI's batch-wise task vote depends on the
    evaluation batch size."""
    ignore = {"resume", "redo_diverged", "device", "loader", "checkpoint", "paths", "paper", "logger"}
    relevant = {k: v for k, v in resolved.items() if k not in ignore}
    relevant["__rng_protocol__"] = RNG_PROTOCOL
    if isinstance(relevant.get("method"), dict):  # where features are cached never changes them
        relevant["method"] = {k: v for k, v in relevant["method"].items() if not k.startswith("feature_cache")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStore:
    """The files of one run directory.

    After task t, ``checkpoints/task_XX.pt`` holds the state to resume from (method state, accuracy
    counts, timings) with every ``GaussianStats`` state in it replaced by a stub, and
    ``checkpoints/task_XX.stats.pt`` the statistics of the keys first seen in that state: each
    finished key is written once, so the run dir grows with the classes, not with classes x tasks.
    Statistics files are always kept; ``keep='last'`` keeps only the newest ``task_XX.pt`` (what a
    resume needs), ``keep='all'`` every one (a backbone per task). ``latest_state()`` merges the
    statistics back from the files of tasks up to the newest checkpoint.
    """

    def __init__(self, run_dir: str | Path, fingerprint: str, keep: str = "all"):
        self.dir = Path(run_dir)
        self.fingerprint, self.keep = fingerprint, keep
        self.ckpt_dir = self.dir / "checkpoints"
        self._stored: dict[str, set[int]] = {}  # per stats entry: keys already in a stats file

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def checkpoints(self) -> list[Path]:
        """The resumable checkpoints ``task_XX.pt``, oldest first (not the statistics files)."""
        return sorted(p for p in self.ckpt_dir.glob("task_*.pt") if not p.name.endswith(".stats.pt"))

    def stats_path(self, task_index: int) -> Path:
        return self.ckpt_dir / f"task_{task_index:02d}.stats.pt"

    def existing_results(self) -> dict | None:
        if not self.results_path.is_file():
            return None
        try:
            return json.loads(self.results_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"'{self.results_path}' is not valid JSON ({exc}).") from exc

    def guard_existing(self, resume: bool) -> None:
        """Refuse to overwrite another config's results, or to start over a finished/started run
        without ``resume=true``."""
        res = self.existing_results()
        started = res is not None or bool(self.checkpoints())
        if not started:
            return
        theirs = res.get("fingerprint") if res else self._checkpoint_fingerprint(self.checkpoints()[-1])
        if theirs != self.fingerprint:
            raise CheckpointError(
                f"Run dir '{self.dir}' already holds results of a different configuration "
                f"(fingerprint {theirs} vs {self.fingerprint}). Nothing was changed. Choose another "
                "directory (hydra.run.dir=...) or remove the old one."
            )
        if not resume:
            raise CheckpointError(
                f"Run dir '{self.dir}' already holds {'finished results' if res else 'checkpoints'} of this "
                "configuration. Re-run with resume=true to continue it, or choose another hydra.run.dir."
            )

    def set_aside_results(self) -> Path:
        """Rename results.json to the first free ``results.<status>[-N].json`` (kept, never
        overwritten) before a diverged run is redone; returns the new path (rank 0 renames)."""
        status = (self.existing_results() or {}).get("status", "complete")
        n, path = 0, self.dir / f"results.{status}.json"
        while path.exists():
            n += 1
            path = self.dir / f"results.{status}-{n}.json"
        if distributed.is_main():
            os.replace(self.results_path, path)
        return path

    def _checkpoint_fingerprint(self, path: Path) -> str | None:
        return self.load_checkpoint(path).get("fingerprint")

    def save_checkpoint(self, task_index: int, state: dict) -> Path:
        """Write the statistics first seen in ``state`` to ``task_XX.stats.pt``, then the rest to
        ``task_XX.pt`` (in that order: a checkpoint never names statistics that are not on disk)."""
        path = self.ckpt_dir / f"task_{task_index:02d}.pt"
        slim, new = _split_stats(state, self._stored)
        if distributed.is_main():
            header = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "task": task_index}
            if any(part["keys"] for part in new.values()):
                atomic_torch_save({**header, "stats": new}, self.stats_path(task_index))
            atomic_torch_save({**header, **slim}, path)
            if self.keep == "last":
                for old in self.checkpoints():
                    if old != path:
                        old.unlink()
        for name, part in new.items():
            self._stored.setdefault(name, set()).update(int(k) for k in part["keys"])
        return path

    def load_checkpoint(self, path: Path) -> dict:
        """Load with ``weights_only=True`` (no code runs from the file); refuse foreign files and
        formats this version cannot read."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"Checkpoint '{path}' cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                "It is corrupted or not a clcli checkpoint; delete it to restart from the previous task."
            ) from exc
        fmt = state.get("format") if isinstance(state, dict) else None
        if isinstance(fmt, str) and fmt.startswith("clcli-checkpoint-") and fmt not in READABLE_FORMATS:
            raise CheckpointError(
                f"'{path}' is a clcli checkpoint in format {fmt}, which this version cannot read (it reads "
                f"{', '.join(READABLE_FORMATS)}). Resume it with the clcli version that wrote it, or start the "
                "run again in a new directory (hydra.run.dir=...)."
            )
        if fmt not in READABLE_FORMATS:
            raise CheckpointError(f"'{path}' is not a clcli checkpoint (missing format tag {CHECKPOINT_FORMAT}).")
        return state

    def latest_state(self) -> dict | None:
        """The newest checkpoint with its statistics merged back in (from the ``task_XX.stats.pt``
        files of tasks up to its own; later ones are left over from an interrupted task and ignored).
        A v1 checkpoint holds its statistics itself."""
        ckpts = self.checkpoints()
        return self.state_at(ckpts[-1]) if ckpts else None

    def state_at(self, path: Path) -> dict:
        """The checkpoint ``path`` of this run with its statistics merged back in (see ``latest_state``)."""
        state = self.load_checkpoint(path)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"Checkpoint '{path}' belongs to a different configuration; refusing to resume from it.")
        stubs = {name: st for name, st in _find_stats(state).items() if st.get("stored_apart")}
        self._stored = {}
        if not stubs:
            return state
        task = int(state["task"])
        files = [self.stats_path(t) for t in range(task + 1) if self.stats_path(t).is_file()]
        merged = {}
        for name, stub in stubs.items():
            try:
                merged[name] = stats_lib.merge_states(stub, self._stats_parts(files, name))
            except KeyError as exc:
                raise CheckpointError(
                    f"Checkpoint '{path}' needs the statistics of keys {exc.args[0]} ({name}), which no "
                    f"statistics file task_00..task_{task:02d}.stats.pt in '{self.ckpt_dir}' holds (deleted?). The run "
                    "cannot resume from it: restore the files, or start the run again in a new directory."
                ) from exc
            self._stored[name] = set(int(k) for k in stub["keys"])
        return _walk_stats(state, lambda name, st: merged.get(name, st))

    def _stats_parts(self, files: list[Path], name: str):
        """The ``name`` entries of the statistics files, loaded one at a time."""
        for f in files:
            part = self.load_checkpoint(f)
            if part.get("fingerprint") != self.fingerprint:
                raise CheckpointError(f"Statistics file '{f}' belongs to a different configuration; refusing to resume.")
            if name in part.get("stats", {}):
                yield part["stats"][name]
            del part


def _walk_stats(state, fn, prefix: str = ""):
    """A copy of the nested dict ``state`` in which every ``GaussianStats`` state (found by its kind
    tag, named by its key path, e.g. ``method/stats``) is replaced by ``fn(name, it)``."""
    if stats_lib.is_state(state):
        return fn(prefix, state)
    if isinstance(state, dict):
        return {k: _walk_stats(v, fn, f"{prefix}/{k}" if prefix else str(k)) for k, v in state.items()}
    return state


def _find_stats(state) -> dict[str, dict]:
    """Every ``GaussianStats`` state in the nested dict ``state``, by key path."""
    found: dict[str, dict] = {}
    _walk_stats(state, lambda name, st: found.setdefault(name, st))
    return found


def _split_stats(state: dict, stored: dict[str, set[int]]) -> tuple[dict, dict[str, dict]]:
    """``state`` with its statistics replaced by stubs, and per statistics entry the partial state of
    the keys not in ``stored`` yet (whole blocks: the stored tensors, no copy)."""
    new: dict[str, dict] = {}

    def split(name, st):
        new[name] = stats_lib.select_state(st, [k for k in st["keys"] if int(k) not in stored.get(name, ())])
        return stats_lib.stub_state(st)

    return _walk_stats(state, split), new


def environment(device: torch.device) -> dict:
    """Versions, git sha and device: enough to tell two runs' software apart."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(), "device": str(device),
           "world_size": distributed.world_size()}
    for mod in ("timm", "open_clip", "torchvision", "hydra", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None  # not installed
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        env["git_sha"] = sha.stdout.strip() or None
    except Exception:
        env["git_sha"] = None
    return env


# Rendering moved to clcli.report; these names stay importable from clcli.results (callers, merges).
_REPORT_NAMES = ("write_outputs", "headline", "outcome_lines", "summary_markdown", "write_plots")


def __getattr__(name: str):
    """``from clcli.results import write_outputs`` (and the other rendering names) still works:
    resolved lazily from :mod:`clcli.report`, which imports this module (no import cycle)."""
    if name in _REPORT_NAMES:
        from clcli import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
