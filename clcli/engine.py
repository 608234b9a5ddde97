"""Shared loops and the runtime every method receives: device, loaders, progress, guards.

Methods call these instead of writing their own loops, so that progress bars, divergence checks
and loader settings are the same everywhere.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console

from clcli import console as console_lib
from clcli import distributed
from clcli.errors import DivergenceError
from clcli.loggers import Loggers, epoch_metrics
from clcli.methods.base import EvalBatch

log = logging.getLogger("clcli")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Called at the start of every task with
    ``train_seed * 1000 + task_index`` so a resumed run draws exactly what an uninterrupted one draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_workers(setting, device) -> int:
    """``auto``: no worker processes on CPU (they would compete with the model for the same cores),
    up to 8 per process on a GPU machine, where decoding and augmentation must keep the GPU fed."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    per_process = (os.cpu_count() or 2) // max(distributed.world_size(), 1)
    return max(0, min(8, per_process - 1))


def apply_perf_options(perf, backbone) -> None:
    """Opt-in speed settings. TF32 and torch.compile change float rounding (off by default);
    channels-last only changes the memory layout (CNN backbones on GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(perf.tf32)
    if perf.tf32:  # cuDNN convolutions already default to TF32 in PyTorch (as in SLCA's torch 1.12)
        torch.backends.cudnn.allow_tf32 = True
    if perf.channels_last:
        backbone.to(memory_format=torch.channels_last)
    if perf.compile and hasattr(backbone, "model"):
        backbone.model.compile()  # in place: state-dict keys (checkpoints) stay unchanged


@dataclass
class Runtime:
    """Everything about *how* to run, as opposed to *what* to run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_workers: int = 0
    channels_last: bool = False  # NHWC image batches (CNNs on GPU); a layout change, same maths
    eval_batch_size: int = 256
    amp_dtype: torch.dtype | None = None  # bf16/fp16 autocast; None = fp32
    max_loss_factor: float = 10.0  # loss above factor·max(first loss, ln C) counts as divergence
    chance_loss_ratio: float = 0.9  # final epoch loss above ratio·ln C: the task did not learn
    console: Console = field(default_factory=console_lib.get_console)  # log lines, bars, summary (clcli.console)
    progress: console_lib.Bars | None = None  # live bars (Runtime.live)
    limit_train_batches: int | None = None  # debugging (limit_batches.train): batches per training epoch
    limit_eval_batches: int | None = None  # debugging (limit_batches.eval): batches per test set
    task_index: int | None = None  # the task being run (set by the loop; stamps warnings)
    warnings: list[dict] = field(default_factory=list)  # training outcomes worth recording (collapse)
    loggers: Loggers = field(default_factory=Loggers)  # experiment trackers (clcli.loggers); none by default
    history: list[dict] = field(default_factory=list)  # one record per epoch of fit (results.json ``history``)

    def warn(self, record: dict) -> None:
        """Record a training outcome that does not stop the run (results.json ``warnings``) and log it."""
        record = {"task": self.task_index, **record}
        self.warnings.append(record)
        log.warning(record.get("message", str(record)))

    def loader(self, dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
               shard: bool = False, drop_last: bool = False):
        """A DataLoader. In a multi-process run (``clcli.distributed``) a shuffled loader is a
        training loader: ``batch_size`` is the global batch, this rank loads ``batch_size /
        world_size`` samples per step through a ``DistributedSampler`` whose seed is drawn from the
        global RNG (iterate it through :func:`fit`, which advances its epoch); ``shard=True`` gives
        this rank a block of an unshuffled dataset (statistics, evaluation; the caller sums across
        ranks). ``drop_last``: leave out each epoch's last, short batch (same sampler and order)."""
        pin = self.device.type == "cuda"
        sampler = None
        if distributed.is_active() and shuffle:
            if generator is not None:
                raise ValueError("Runtime.loader: a custom generator is not supported in multi-process runs")
            world = distributed.world_size()
            if batch_size % world:
                raise ValueError(f"Runtime.loader: the global batch {batch_size} is not divisible by the "
                                 f"{world} processes")
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=distributed.shared_seed())
            batch_size, shuffle = batch_size // world, False
        if shard:
            dataset = distributed.shard(dataset)
        if not shuffle and generator is None and sampler is None:
            # A DataLoader draws its workers' base seed from the global RNG even when it does not
            # shuffle. Evaluation and statistics passes get a private generator instead, so that
            # skipping one (a feature-cache hit) or adding one never changes the training that follows.
            generator = torch.Generator()
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=self.num_workers,
            pin_memory=pin, persistent_workers=self.num_workers > 0, generator=generator, drop_last=drop_last,
        )

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the run's device (channels-last when asked and the batch is 4-D)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def limited(self, loader, limit: int | None) -> tuple[Iterable, int | None]:
        """The first ``limit`` batches of ``loader`` (all when None) and how many that is
        (``limit_batches``: quick end-to-end checks, ``+debug=fast``)."""
        n = len(loader) if hasattr(loader, "__len__") else None
        if limit is None:
            return loader, n
        return itertools.islice(loader, limit), limit if n is None else min(n, limit)

    def track(self, iterable: Iterable, description: str, total: int | None = None):
        """Iterate with a progress bar that disappears when done (a plain iteration when no bars
        are live: not a terminal, not rank 0)."""
        if self.progress is None:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self.progress.add(description, total)
        try:
            for item in iterable:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove(task)

    def show(self, loss: float, lrs: list[float], images_per_s: float) -> None:
        """Loss, learning rates and images/s after the innermost bar (no-op without bars)."""
        if self.progress is not None:
            self.progress.info(console_lib.epoch_text(loss, lrs, images_per_s))

    def epoch_done(self, where: str, epoch: int, epochs: int, loss: float, lrs: list[float], images_per_s: float) -> None:
        """A finished epoch of :func:`fit` (``epoch`` 1-based): a ``history`` record (``epoch`` counts
        within the task, across ``fit`` calls), one log line, the epochs bar, the loggers."""
        n = sum(h["task"] == self.task_index for h in self.history) + 1
        record = {"task": self.task_index, "epoch": n, "loss": loss, "lrs": list(lrs), "images_per_s": images_per_s,
                  "where": where}
        self.history.append(record)
        text = console_lib.epoch_text(loss, lrs, images_per_s)
        log.info("%s epoch %d/%d: %s", where, epoch, epochs, text)
        self.show(loss, lrs, images_per_s)
        self.loggers.log_metrics(epoch_metrics(record), step=len(self.history))

    @contextlib.contextmanager
    def live(self):
        """Show progress bars for the duration of the block: on a terminal, rank 0 only. Log lines
        (clcli.console) print above them."""
        bars = console_lib.bars(self.console) if distributed.is_main() else None
        if bars is None:
            yield None
            return
        with bars:
            self.progress = bars
            try:
                yield bars
            finally:
                self.progress = None


class LossGuard:
    """Watches one training loop's losses and tells the two failures apart.

    - *Divergence* (a non-finite loss, or one above ``factor`` x max(first loss, ln C)): the run
      cannot go on; :meth:`check` raises :class:`DivergenceError` carrying where and why.
    - *Collapse* (the last epoch's mean loss still near chance, ln C): a legitimate outcome, e.g.
      Seq FT with a large learning rate. :meth:`collapse` describes it; the run goes on and records it.
    """

    def __init__(self, where: str, num_classes: int, factor: float, chance_ratio: float = 0.9):
        self.where, self.factor, self.chance_ratio = where, factor, chance_ratio
        self.floor = math.log(max(num_classes, 2))
        self.first: float | None = None

    def check(self, loss: float, epoch: int, step: int) -> None:
        if self.first is None and math.isfinite(loss):
            self.first = loss
        limit = self.factor * max(self.first or 0.0, self.floor)
        if math.isfinite(loss) and loss <= limit:
            return
        reason = "non-finite loss" if not math.isfinite(loss) else "exploding loss"
        raise DivergenceError(
            f"Training diverged in {self.where}, epoch {epoch + 1}, step {step + 1}: loss = {loss:.4g} "
            f"(first loss {self.first if self.first is not None else float('nan'):.4g}, limit {limit:.4g}). "
            "This is not forgetting but a failed optimization: lower optim.lr.representation / "
            "optim.lr.classifier, or check the data. Checkpoints of finished tasks are kept.",
            where=self.where, epoch=epoch + 1, step=step + 1, loss=loss, reason=reason,
        )

    def collapse(self, final_epoch_loss: float, epoch: int) -> dict | None:
        """A record of the collapse when the last epoch's mean loss is above ``chance_ratio`` x ln C
        (the model predicts nearly one class everywhere), else None. ``epoch`` is 1-based."""
        limit = self.chance_ratio * self.floor
        if self.chance_ratio <= 0 or final_epoch_loss <= limit:
            return None
        return {
            "kind": "collapse", "where": self.where, "epoch": epoch, "loss": final_epoch_loss,
            "chance_loss": self.floor, "limit": limit,
            "message": (f"Training collapsed in {self.where}: the last epoch's mean loss {final_epoch_loss:.4g} is at "
                        f"chance level (ln C = {self.floor:.4g}; limit {limit:.4g} = guard.chance_loss_ratio x ln C), "
                        "so the model predicts (nearly) one class there. The run goes on and records it; typical "
                        "of a representation learning rate that is too large (the SLCA paper's Seq FT)."),
        }


def fit(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader, *, epochs: int,
        optimizer: torch.optim.Optimizer, scheduler, rt: Runtime, where: str, num_classes: int,
        train_mode: Callable[[], None] | None = None, require_learning: bool = False,
        after_step: Callable[[int], None] | None = None) -> list[float]:
    """Run ``epochs`` of ``loss = model(x, y)``, backward, optimizer step; schedule per epoch or per
    step (``scheduler.per_step``); ``after_step(s)`` after the ``s``-th step's update (0-based, counted
    over the whole call). Returns the mean loss of every epoch. A non-finite or exploding
    loss raises :class:`DivergenceError`. ``require_learning``: a final epoch loss still at chance
    level is recorded as a collapse warning (``rt.warn``; the run goes on).

    ``model`` is a loss module: an ``nn.Module`` holding the trainable parts whose ``forward(x, y)``
    returns the batch's mean loss (plus batch-independent terms). A single process calls it as it is
    (any such callable will do); a multi-process run calls it through
    :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`clcli.distributed.data_parallel`;
    pass a DDP module to reuse one across calls), which averages the ranks' gradients, on a loader
    from :meth:`Runtime.loader` whose ``DistributedSampler`` gets a new shuffle every pass, with the
    ranks' own random streams (:func:`clcli.distributed.rank_streams`). The guard sees the loss
    averaged over ranks, so every rank stops at the same step.

    ``precision=fp16`` autocast scales the loss (:class:`torch.amp.GradScaler`), so that small fp16
    gradients do not flush to zero, and skips a step whose gradients overflowed; parameters that are
    themselves fp16 (DIKI's reference residuals) train as the reference does, unscaled."""
    net = distributed.data_parallel(model)  # the module itself in a single process
    sampler = getattr(loader, "sampler", None)
    world = distributed.world_size()
    guard = LossGuard(where, num_classes, rt.max_loss_factor, rt.chance_loss_ratio)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16 and all(
        p.dtype == torch.float32 for g in optimizer.param_groups for p in g["params"]))
    history, steps_done = [], 0
    with distributed.rank_streams():  # multi-process: per-rank draws; the global RNG stays shared
        for epoch in rt.track(range(epochs), f"{where} epochs"):
            if train_mode is not None:
                train_mode()
            total, count = 0.0, 0
            lrs, tick = [g["lr"] for g in optimizer.param_groups], time.perf_counter()  # reported with the epoch
            batches, n_batches = rt.limited(loader, rt.limit_train_batches)
            for i, (x, y) in enumerate(rt.track(batches, f"epoch {epoch + 1}/{epochs}", total=n_batches)):
                optimizer.zero_grad(set_to_none=True)
                x, y = rt.images(x), y.to(rt.device, non_blocking=True)
                with rt.autocast():
                    loss = net(x, y)
                scaler.scale(loss).backward()  # multi-process: DDP averages the gradients meanwhile
                value, n = distributed.mean_over_ranks(loss), len(y) * world  # equal batches on every rank
                guard.check(value, epoch, i)
                scaler.step(optimizer)  # without fp16: optimizer.step()
                scaler.update()
                if scheduler is not None and getattr(scheduler, "per_step", False):
                    scheduler.step()
                if after_step is not None:
                    after_step(steps_done)
                steps_done += 1
                total, count = total + value * n, count + n
                rt.show(total / max(count, 1), lrs, count / (time.perf_counter() - tick))
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(sampler.epoch + 1)  # the next pass (here or in a later call) reshuffles
            if scheduler is not None and not getattr(scheduler, "per_step", False):
                scheduler.step()
            history.append(total / max(count, 1))
            rt.epoch_done(where, epoch + 1, epochs, history[-1], lrs, count / (time.perf_counter() - tick))
    optimizer.zero_grad(set_to_none=True)  # free gradient memory; no stale grads leak into the next task
    if net is not model:  # a DDP built here sits in a reference cycle: free its gradient buckets now
        del net
        gc.collect()
    if require_learning and history and (collapse := guard.collapse(history[-1], len(history))) is not None:
        rt.warn(collapse)
    return history


class CyclingLoader:
    """Exactly ``steps`` batches from ``loader``, iterating it again (a new shuffle) whenever it runs
    out: an iteration budget through :func:`clcli.engine.fit` (one "epoch" of ``steps`` batches).
    In a multi-process run every pass advances the loader's ``DistributedSampler`` epoch, so each pass
    reshuffles as a single-process ``shuffle=True`` loader does."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done = 0
        while done < self.steps:
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return
            sampler = getattr(self.loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(sampler.epoch + 1)



def fit_iterations(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader, *, iterations: int,
                   optimizer: torch.optim.Optimizer, scheduler, rt: Runtime, where: str, num_classes: int,
                   after_step: Callable[[int], None] | None = None, require_learning: bool = False,
                   train_mode: Callable[[], None] | None = None) -> list[float]:
    """Iteration-based training (``optim.iterations``, docs/diki_mtil_protocol.md#iteration-based-tasks;
    Continual-FT, ZSCL and MoE-Adapters):
    optimizer steps ``s = 0..iterations`` (inclusive, as ZSCL's loop: ``iterations + 1`` steps) as one
    :func:`fit` epoch over the loader cycled (:class:`CyclingLoader`: a new, re-shuffled pass whenever
    the previous one is used up). The schedule is stepped after every optimizer step; ``after_step(s)``
    runs after step ``s``'s update (ZSCL's weight average); ``train_mode`` as in :func:`fit`. Returns
    ``[mean loss over all steps]``."""
    if len(loader) == 0:
        raise ValueError(f"{where}: the training loader is empty")
    if scheduler is not None:
        scheduler.per_step = True
    return fit(model, CyclingLoader(loader, iterations + 1), epochs=1, optimizer=optimizer, scheduler=scheduler,
               rt=rt, where=where, num_classes=num_classes, after_step=after_step, require_learning=require_learning,
               train_mode=train_mode)


@torch.inference_mode()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], dataset, rt: Runtime,
                     batch_size: int | None = None, description: str = "features", shard: bool = False):
    """Yield ``(features, labels)`` batches of ``fn(images)`` over ``dataset`` in order. ``shard``:
    in a multi-process run only this rank's block of ``dataset`` (the caller reduces, e.g.
    ``GaussianStats.reduce``)."""
    loader = rt.loader(dataset, batch_size or rt.eval_batch_size, shuffle=False, shard=shard)
    for x, y in rt.track(loader, description):
        with rt.autocast():
            f = fn(rt.images(x))
        yield f.float(), y.to(rt.device)


@torch.inference_mode()
def evaluate(method, scenario, after: int, matrix, rt: Runtime) -> None:
    """Score ``method.predict`` on every task the scenario evaluates after task ``after`` and record
    correct/total counts in row ``after`` of ``matrix``. Every batch goes out as an
    :class:`~clcli.methods.base.EvalBatch` naming its test set and position in the unshuffled loader
    (what a feature cache keys on). Multi-process: each rank predicts a block of every test set
    (``batch_index`` counts this rank's batches) and the counts are summed."""
    for task in scenario.eval_tasks(after):
        candidates = scenario.candidates(after, task)
        loader = rt.loader(task.test, rt.eval_batch_size, shuffle=False, shard=True)
        correct = total = 0
        batches, n_batches = rt.limited(loader, rt.limit_eval_batches)
        for j, (x, y) in enumerate(rt.track(batches, f"eval {task.name}", total=n_batches)):
            with rt.autocast():
                logits = method.predict(EvalBatch(rt.images(x), task, candidates, batch_index=j, after=after))
            pred = logits.argmax(1).cpu() + candidates.start
            correct += int((pred == y).sum())
            total += len(y)
        correct, total = distributed.all_reduce_ints(correct, total)
        matrix.record(after, task.index, correct, total)
