"""``clcli export-stats RUN_DIR --output F [--task K] [--force]``: the Gaussian statistics stored in a
run's checkpoints as ``.safetensors`` or ``.npz``, for use outside clcli.

What is stored (:mod:`clcli.stats`; docs/slca_protocol.md#class-statistics,
docs/diki_mtil_protocol.md#task-gaussians): per key (SLCA: class label, DIKI: task) the float64 mean
and the covariance ``unbiased sample covariance + ridge·I`` (SLCA float32, DIKI float64). Sample counts
are not kept once a key is finalized, so none are exported. The statistics after task K are those of
every key finalized up to K: read from ``task_KK.pt`` through :class:`clcli.results.RunStore` (which
merges its statistics files back in), or, where ``checkpoint.keep: last`` pruned that file, merged from
the statistics files ``task_00..task_KK.stats.pt``, where each key is written once, by its task.

Arrays, in key order (``C`` keys, dimension ``d``): ``class_means [C,d]``, ``class_covariances
[C,d,d]``, ``labels [C]``, ``class_ids [C]`` (the dataset's class ids), ``class_tasks [C]`` and
``class_jitter [C]`` (diagonal jitter the factorisation needed, 0 for none); DIKI: ``task_means [T,d]``,
``task_covariances [T,d,d]``, ``tasks [T]``, ``task_jitter [T]``. Metadata (safetensors header, or the
JSON string ``metadata`` in an npz): run dir, task, feature dim, ridge, method, fingerprint.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch

from clcli import stats as stats_lib
from clcli.errors import CheckpointError, ConfigError
from clcli.finished_run import FinishedRun, open_run
from clcli.results import atomic_write_bytes

FORMAT = "clcli-stats-v1"
SUFFIXES = (".npz", ".safetensors")
# What a method's statistics are kept per (the names of the exported arrays follow it).
KEY_KINDS = {"clcli.methods.slca.SLCA": "class", "clcli.methods.diki.DIKI": "task"}
V1_KEYS = {"dim", "ridge", "keys", "mean", "cov"}  # statistics inline in a clcli-checkpoint-v1, stacked


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clcli export-stats",
                                     description="Write the Gaussian statistics stored in a run's checkpoints.")
    parser.add_argument("run_dir", type=Path, help="the run dir of a `clcli train` run")
    parser.add_argument("--output", type=Path, required=True, help="file to write: F.npz or F.safetensors")
    parser.add_argument("--task", type=int, default=None,
                        help="the statistics as they were after task K (default: after the newest stored task)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def _stats_in(state, prefix: str = ""):
    """``(name, state)`` of every GaussianStats state in a nested checkpoint dict, named by key path
    as the statistics files name them (e.g. ``method/stats``)."""
    if stats_lib.is_state(state) or (isinstance(state, dict) and V1_KEYS <= state.keys()):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _stats_in(v, f"{prefix}/{k}" if prefix else str(k))


def statistics_after(run: FinishedRun, task: int) -> dict[str, dict]:
    """Every statistics entry of the run as it was after ``task`` (full states, by name)."""
    path = run.checkpoints().get(task)
    if path is not None:
        return dict(_stats_in(run.store.state_at(path)))
    parts: dict[str, list[dict]] = {}
    for t in range(task + 1):
        if run.store.stats_path(t).is_file():
            for name, part in run.read(run.store.stats_path(t), t).get("stats", {}).items():
                parts.setdefault(name, []).append(part)
    merged = {}
    for name, found in parts.items():
        keys = sorted({int(k) for part in found for k in part["keys"]})
        stub = {"kind": stats_lib.STATE_KIND, "dim": found[0]["dim"], "ridge": found[0]["ridge"], "keys": keys}
        merged[name] = stats_lib.merge_states(stub, found)  # a later file wins for a key written twice
    return merged


def arrays(state: dict, kind: str, class_order: list[int] | None, task_of_label: list[int] | None) -> dict[str, np.ndarray]:
    """The arrays of one full statistics state, in key order."""
    rows = {}
    for blk in state["blocks"] if "blocks" in state else [state]:  # v1: one stacked block
        for i, k in enumerate(blk["keys"]):
            rows[int(k)] = (blk["mean"][i], blk["cov"][i])
    keys = sorted(rows)
    d = int(state["dim"])
    if keys:
        means = torch.stack([rows[k][0] for k in keys]).to(torch.float64).numpy()
        covs = torch.stack([rows[k][1] for k in keys]).numpy()
    else:
        means, covs = np.zeros((0, d)), np.zeros((0, d, d))
    jitter = np.array([float(state.get("jitter", {}).get(k, 0.0)) for k in keys], dtype=np.float64)
    ids = np.array(keys, dtype=np.int64)
    if kind == "class":
        out = {"class_means": means, "class_covariances": covs, "labels": ids, "class_jitter": jitter}
        if class_order and all(k < len(class_order) for k in keys):
            out["class_ids"] = np.array([class_order[k] for k in keys], dtype=np.int64)
        if task_of_label and all(k < len(task_of_label) for k in keys):
            out["class_tasks"] = np.array([task_of_label[k] for k in keys], dtype=np.int64)
        return out
    if kind == "task":
        return {"task_means": means, "task_covariances": covs, "tasks": ids, "task_jitter": jitter}
    return {"key_means": means, "key_covariances": covs, "keys": ids, "key_jitter": jitter}


def export_stats(run_dir: Path, output: Path, task: int | None = None, force: bool = False) -> dict:
    """Write the statistics of ``run_dir`` after ``task`` (default: the newest) to ``output``;
    returns the metadata written."""
    if output.suffix not in SUFFIXES:
        raise ConfigError([f"--output {output}: expected a file ending in .npz or .safetensors (the format "
                           "follows the suffix)."])
    if output.exists() and not force:
        raise ConfigError([f"--output {output}: the file exists; clcli export-stats does not overwrite it. "
                           "Choose another name, or add --force to replace it."])
    if output.is_dir():
        raise ConfigError([f"--output {output}: is a folder; give a file name ending in .npz or .safetensors."])
    run = open_run(run_dir)
    newest = run.newest_task()
    k = newest if task is None else task
    names = [t["name"] for t in (run.results or {}).get("tasks", [])]
    if k < 0 or k > newest:
        raise ConfigError([f"--task {k}: the run stored tasks 0..{newest}" + (
            f" of {len(names)}" if names else "") + "; give one of them."])
    run.verify([k] if k in run.checkpoints() else [], stats_upto=k)
    entries = {name: st for name, st in statistics_after(run, k).items() if st["keys"]}
    method = str((run.config.get("method") or {}).get("_target_"))
    if not entries:
        raise CheckpointError(
            f"Run dir '{run.dir}' (method={run.choices.get('method')}) stores no Gaussian statistics up to task {k}: "
            "only methods that fit them keep any (SLCA with classifier alignment, e.g. method=slca; DIKI). "
            "Nothing was written.")
    kind = KEY_KINDS.get(method, "key")
    class_order = (run.results or {}).get("class_order")
    task_of_label = [i for i, t in enumerate((run.results or {}).get("tasks", []))
                     for _ in range(t["labels"][0], t["labels"][1])]
    tensors: dict[str, np.ndarray] = {}
    for name, st in entries.items():
        prefix = "" if len(entries) == 1 else name.replace("/", ".") + "."
        tensors.update({prefix + key: np.ascontiguousarray(a) for key, a in
                        arrays(st, kind, class_order, task_of_label).items()})
    first = next(iter(entries.values()))
    meta = {
        "format": FORMAT,
        "run_dir": str(run.dir.resolve()),
        "task": str(k),
        "task_name": names[k] if k < len(names) else "",
        "feature_dim": str(int(first["dim"])),
        "ridge": repr(float(first["ridge"])),
        "method": method,
        "key_kind": kind,
        "entries": ",".join(entries),
        "fingerprint": run.fingerprint,
        "covariance": "unbiased sample covariance + ridge * I (the ridge is included)",
        "counts": "not stored: a key's sample count is dropped once its statistics are finalized",
    }
    atomic_write_bytes(output, _encode(output.suffix, tensors, meta))
    return meta


def _encode(suffix: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    if suffix == ".safetensors":
        from safetensors.numpy import save

        return save(tensors, metadata=meta)
    buf = io.BytesIO()
    np.savez(buf, metadata=np.array(json.dumps(meta)), **tensors)
    return buf.getvalue()


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    meta = export_stats(args.run_dir, args.output, args.task, args.force)
    print(f"wrote the {meta['key_kind']} statistics after task {meta['task']} ({meta['task_name']}) of "
          f"{meta['run_dir']} to {args.output}")
    return meta
