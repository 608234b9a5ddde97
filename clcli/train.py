"""The training loop: build, then for every task begin/train/end/evaluate/checkpoint, then report.

A training outcome is data: a diverged task stops the loop and the run is written with
``status: diverged`` and ``failure`` (task, stage, epoch, step, loss, why); a collapse to chance is a
``warnings`` entry and the run goes on. Exceptions are for bad input.

Under ``torchrun`` every process runs this same loop on its shard of the data (``clcli.distributed``);
only rank 0 writes files and prints."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clcli import distributed
from clcli import loggers as loggers_lib
from clcli.config import PRECISIONS, check_config
from clcli.console import get_console, show_config
from clcli.data.scenario import Scenario
from clcli.engine import Runtime, apply_perf_options, evaluate, loader_workers, resolve_device, seed_everything
from clcli.errors import ConfigError, DivergenceError
from clcli.evaluation import AccuracyMatrix
from clcli.report import headline, write_outputs
from clcli.results import RunStore, config_fingerprint, environment
from clcli.summary import print_summary

log = logging.getLogger("clcli")


@dataclass
class Built:
    """What an experiment runs on: the runtime, the backbone, the method and its scenario."""

    rt: Runtime
    backbone: object
    method: object
    scenario: Scenario
    train_seed: int


def build(cfg: DictConfig, device) -> Built:
    """Build runtime, backbone, method and scenario from ``cfg`` on ``device``, as a run does: the one
    build shared by ``clcli train`` and ``clcli eval`` (:mod:`clcli.evaluate_run`), so that a
    re-evaluation loads its checkpoints into the same objects the run saved them from."""
    rt = Runtime(device=device, num_workers=loader_workers(cfg.loader.num_workers, device),
                 channels_last=cfg.perf.channels_last,
                 eval_batch_size=cfg.eval.batch_size, amp_dtype=PRECISIONS[cfg.precision],
                 max_loss_factor=cfg.guard.max_loss_factor, chance_loss_ratio=cfg.guard.chance_loss_ratio,
                 limit_train_batches=cfg.limit_batches.train, limit_eval_batches=cfg.limit_batches.eval)
    train_seed = cfg.seed if cfg.train_seed is None else cfg.train_seed
    seed_everything(train_seed)  # model construction (fresh norms, heads) is seeded too
    backbone = instantiate(cfg.backbone)
    apply_perf_options(cfg.perf, backbone)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, optim=cfg.optim, runtime=rt)
    scenario = method.prepare_scenario(instantiate(cfg.data).build(backbone))
    return Built(rt, backbone, method, scenario, train_seed)


def run(cfg: DictConfig, run_dir: Path, choices: dict) -> dict:
    """Run one experiment into ``run_dir`` and return its results (also written to results.json).
    Under torchrun: one process of a data-parallel run, all in rank 0's ``run_dir``."""
    problems = check_config(cfg) + distributed.problems(cfg.optim.batch_size)
    if problems:
        raise ConfigError(problems)
    with distributed.session(resolve_device(cfg.device)) as device, loggers_lib.closing():
        return _run(cfg, Path(distributed.broadcast_object(str(run_dir))), choices, device)


def _run(cfg: DictConfig, run_dir: Path, choices: dict, device) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log.info("run dir: %s", run_dir)
    store = RunStore(run_dir, config_fingerprint(resolved), keep=cfg.checkpoint.keep)
    store.guard_existing(cfg.resume)
    done = store.existing_results()
    if done is not None and done.get("status", "complete") != "complete" and cfg.redo_diverged:
        log.info("redoing the %s run in %s from its last checkpoint (redo_diverged=true); its results "
                 "are kept as %s", done.get("status"), run_dir, store.set_aside_results().name)
        done = None
    distributed.barrier()  # every rank has read the run dir before rank 0 writes to it
    if done is not None:
        log.info("results in %s are %s; nothing to do%s", run_dir, done.get("status", "complete"),
                 "" if done.get("status", "complete") == "complete" else " (redo_diverged=true retrains it)")
        return done

    t0 = time.perf_counter()
    if distributed.is_main():
        show_config(resolved, get_console(), log)
    built = build(cfg, device)
    rt, backbone, method, scenario, train_seed = built.rt, built.backbone, built.method, built.scenario, built.train_seed
    if distributed.is_main():  # experiment trackers (conf/logger): rank 0 only
        rt.loggers = loggers_lib.build(cfg.get("logger"), run_dir)
        rt.loggers.log_hparams(resolved, environment(device))
    matrix = AccuracyMatrix(len(scenario))
    timings: list[dict] = []
    start = 0
    if cfg.resume and (state := store.latest_state()) is not None:
        method.load_state_dict(state["method"])
        matrix.load_state_dict(state["matrix"])
        timings, start = state["timings"], state["task"] + 1
        rt.warnings, rt.history = list(state.get("warnings", [])), list(state.get("history", []))
        log.info("resuming %s after task %d", run_dir, state["task"])
        loggers_lib.replay(rt.loggers, rt.history, [_row(matrix, scenario, t) for t in range(start)])

    status, failure = "complete", None
    with rt.live():
        for task in rt.track(scenario.tasks[start:], "tasks", total=len(scenario) - start):
            seed_everything(train_seed * 1000 + task.index)  # per task: resume draws the same numbers
            rt.task_index, t = task.index, {"task": task.index}
            stages = {"train": lambda task=task: (method.begin_task(task), method.train_task(task)),
                      "end_task": lambda task=task: method.end_task(task),
                      "eval": lambda task=task: evaluate(method, scenario, task.index, matrix, rt)}
            try:
                for stage, work in stages.items():  # timings: train_s, end_task_s, eval_s
                    tick = time.perf_counter()
                    work()
                    t[f"{stage}_s"] = time.perf_counter() - tick
            except DivergenceError as exc:  # a training outcome: record where and why, keep what is done
                status = "diverged"
                failure = {"task": task.index, "task_name": task.name, "stage": stage, **exc.details, "message": str(exc)}
                log.error("%s", exc)
                break
            timings.append(t)
            row = matrix.percent()[task.index]
            log.info("after task %d: %s", task.index, np.round(row[~np.isnan(row)], 2).tolist())
            loggers_lib.log_accuracy(rt.loggers, rt.history, task.index, _row(matrix, scenario, task.index))
            state = {"method": method.state_dict(), "matrix": matrix.state_dict(), "timings": timings,
                     "warnings": rt.warnings, "history": rt.history}
            distributed.check_in_sync(state["method"], f"after task {task.index}")
            store.save_checkpoint(task.index, state)  # rank 0 writes

    results = {
        "format": "clcli-results-v1",
        "status": status,
        "failure": failure,
        "warnings": rt.warnings,
        "fingerprint": store.fingerprint,
        "run": dict(choices),
        "seed": cfg.seed,
        "train_seed": train_seed,
        **scenario.metrics(matrix, finished=len(timings)),
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in matrix.percent()],
        "counts": matrix.state_dict(),
        "class_order": scenario.class_order,
        "tasks": [{"name": t.name, "class_ids": list(map(int, t.class_ids)),
                   "labels": [t.labels.start, t.labels.stop]} for t in scenario.tasks],
        "scenario": scenario.manifest(),
        "method_summary": method.summary(),
        "timings": {"tasks": timings, "total_s": time.perf_counter() - t0},
        "history": rt.history,  # per epoch of training: task, epoch, loss, lrs, images_per_s
        "environment": {**environment(rt.device), "backbone_weights": getattr(backbone, "weights_identity", None)},
        "paper": resolved.get("paper"),
        "config": resolved,
    }
    extra = method.extra_results() if hasattr(method, "extra_results") else {}  # e.g. the representation probe
    if extra:
        results["metrics"] = {**results["metrics"], **extra.pop("metrics", {})}
        results.update(extra)
    write_outputs(run_dir, results)  # rank 0 writes and prints
    loggers_lib.log_final(rt.loggers, rt.history, len(timings), headline(results, partial=True))
    rt.loggers.finish(status)
    if distributed.is_main():
        print_summary(results, rt.console)
    log.info("run dir: %s", run_dir)
    return results


def _row(matrix: AccuracyMatrix, scenario, task: int) -> dict:
    """Row ``task`` of the accuracy matrix as ``{task name: accuracy %}`` (NaN: not evaluated)."""
    row = matrix.percent()[task]
    return {t.name: float(row[t.index]) for t in scenario.tasks}

