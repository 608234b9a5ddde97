"""Multi-process data-parallel runs under ``torchrun``: one process per device, results equal to one
process with the same global batch.

Launch (single node, N GPUs; CPU processes use the gloo backend)::

    torchrun --standalone --nproc_per_node=N -m clcli.cli train <overrides>

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`session` (entered by
``clcli.train.run``) then initializes the process group (nccl on CUDA, gloo on CPU) and computes on
``cuda:LOCAL_RANK``. Without those variables, or with ``WORLD_SIZE=1``, nothing here does anything
and a run is the plain single-process run.

How a multi-process run stays equal to a single-process one (methods need no changes):

- Training (:func:`clcli.engine.fit`): every epoch all ranks draw, from their (identical) global
  RNG, the same two numbers a single-process ``DataLoader(shuffle=True)`` draws, so the epoch's
  global order is the one ``RandomSampler`` would produce. Each global batch of ``optim.batch_size``
  indices is cut into ``world_size`` contiguous pieces (:class:`ShardedBatchSampler`); every rank
  back-propagates the mean loss of its piece, and :func:`average_gradients` sums the gradients
  weighted by ``n_rank / n_global``: the gradient of the global batch's mean loss, also for a short
  last batch (a rank whose piece is empty contributes nothing). The step's contract: ``step(x, y)``
  returns a per-sample mean (plus terms that do not depend on the batch).
- Randomness a rank draws while iterating its shard (augmentations, dropout) comes from a per-rank
  stream forked for the epoch; afterwards every rank's global RNG is back in the shared state, so
  later draws (classifier alignment's sampled features) are identical on every rank.
- Statistics: each rank accumulates ``GaussianStats`` sums over its block of the data, then
  ``GaussianStats.reduce()`` sums (n, Σx, Σxxᵀ) across ranks before ``finalize``.
- Evaluation: each rank predicts its block of a test set; correct/total counts are summed.
- After every task :func:`check_in_sync` compares a signature of the method's state across ranks
  (it must be identical: every rank applies the same averaged gradients) and stops on divergence.
- Only rank 0 writes checkpoints, results and plots, prints the summary and shows progress bars;
  the other ranks log warnings only.

Results differ from a single process only by float summation order (gradients summed across ranks
instead of within one batch): equal predictions in practice, parameters equal to ~1e-6 and class
statistics (features of the trained backbone) to ~1e-5 after a tiny run. This also needs
per-sample computation that does not depend on the rest of the batch (BatchNorm in train mode
does; the shipped timm backbones keep BN in eval mode, ``freeze_bn_stats``) and no per-sample
randomness: with random augmentations or dropout every rank draws its own numbers, so such runs
match a single process in distribution, not number for number.

Every rank works in rank 0's run dir. Hydra computes ``${now:...}`` run/sweep dirs in each process,
so pass ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``) explicitly: otherwise a process that
started a second later leaves a stray dir holding only its ``.hydra/`` and log.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import random
import struct
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from clcli.errors import ConfigError

log = logging.getLogger("clcli")

BUCKET_NUMEL = 1 << 25  # gradients are all-reduced in flat buckets of at most this many elements


# ---------------------------------------------------------------------------- who am I
def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_active() -> bool:
    """True inside a multi-process run (a process group is initialized)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def problems(batch_size: int) -> list[str]:
    """Configuration problems of a multi-process launch, found before anything starts."""
    w = env_world_size()
    try:
        batch_size = int(batch_size)
    except (TypeError, ValueError):  # check_config reports it
        return []
    if w > 1 and batch_size % w:
        return [f"optim.batch_size={batch_size} is the global batch and must be divisible by the number of "
                f"processes (WORLD_SIZE={w}): each process trains on batch_size / WORLD_SIZE samples per step."]
    return []


# ---------------------------------------------------------------------------- init / teardown
@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Yield the device this process computes on. Under torchrun (``WORLD_SIZE`` > 1) the first
    session initializes the process group (nccl for CUDA, gloo for CPU; CUDA runs use
    ``cuda:LOCAL_RANK``), which then lives until the process exits: the jobs of a sweep share it
    (destroying and re-creating the default group between jobs races on the launcher's store keys).
    ``device=cuda`` (or ``cuda:N``) becomes ``cuda:LOCAL_RANK``. Inside the block non-main ranks log
    warnings only. Without torchrun this only yields ``device``."""
    if env_world_size() <= 1 and not is_active():
        yield device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError([f"LOCAL_RANK={local_rank}, but this node has {torch.cuda.device_count()} GPU(s): start "
                               "at most that many processes per node (torchrun --nproc_per_node), or use device=cpu."])
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(teardown)
        if dist.get_rank() == 0:
            log.info("distributed: %d processes (%s), rank 0 on %s", dist.get_world_size(), backend, device)
    level = log.level
    if dist.get_rank() != 0:
        log.setLevel(logging.WARNING)
    try:
        yield device
    finally:
        log.setLevel(level)


def teardown() -> None:
    """Destroy the process group (if any); registered to run at exit by :func:`session`."""
    if is_active():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where collectives run: this rank's GPU (nccl) or the CPU (gloo, or no process group)."""
    if is_active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- collectives
def barrier() -> None:
    if is_active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, returned on the communication device (``t`` itself in a single
    process)."""
    if not is_active():
        return t
    t = t.to(comm_device()).contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_ints(*values: int) -> tuple[int, ...]:
    """Sums over ranks of a few integers (evaluation counts)."""
    if not is_active():
        return tuple(int(v) for v in values)
    t = all_reduce_sum(torch.tensor(values, dtype=torch.int64))
    return tuple(int(v) for v in t.tolist())


def average_gradients(optimizer: torch.optim.Optimizer, loss: torch.Tensor | None, n: int) -> tuple[float, int]:
    """After ``backward`` of this rank's mean loss over its ``n`` samples: replace every gradient of
    ``optimizer``'s parameters by the global batch's gradient Σ_r (n_r / N)·g_r, and return the
    global mean loss and N. A parameter without a gradient on any rank keeps ``grad=None`` (as in a
    single process); one missing on some ranks only counts as zeros there. Single process: returns
    ``(loss, n)`` and touches nothing."""
    value = float(loss.detach()) if loss is not None else 0.0
    if not is_active():
        return value, n
    params = [p for group in optimizer.param_groups for p in group["params"]]
    meta = torch.tensor([float(n), value * n] + [float(p.grad is not None) for p in params], dtype=torch.float64)
    meta = all_reduce_sum(meta).cpu()
    total = int(meta[0])
    scale = n / total
    live = [p for p, has in zip(params, meta[2:].tolist()) if has > 0]
    for dtype in dict.fromkeys(p.dtype for p in live):
        same = [p for p in live if p.dtype == dtype]
        start = 0
        while start < len(same):
            bucket, numel = [], 0
            while start < len(same) and (not bucket or numel + same[start].numel() <= BUCKET_NUMEL):
                bucket.append(same[start])
                numel += same[start].numel()
                start += 1
            _reduce_bucket(bucket, scale)
    return float(meta[1]) / total, total


def _reduce_bucket(params: list[torch.nn.Parameter], scale: float) -> None:
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat.mul_(scale)
    flat = all_reduce_sum(flat)
    offset = 0
    for p in params:
        g = flat[offset : offset + p.numel()].view_as(p).to(p.device)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def check_in_sync(state, where: str) -> None:
    """Stop if the ranks' method states differ (they must be identical: same averaged gradients,
    same reduced statistics, same alignment draws). Compares a signature (float64 sum and absolute
    sum of every tensor, the repr of everything else)."""
    if not is_active():
        return
    h = hashlib.sha256()
    _signature(state, h)
    digests = all_gather_object(h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"distributed: the processes' method states differ {where} (signatures {digests}). "
                           "A step drew different random numbers or saw different data on different ranks.")


def _signature(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to(torch.float64)
        h.update(struct.pack("<dd", float(t.sum()), float(t.abs().sum())) + repr(tuple(obj.shape)).encode())
    elif isinstance(obj, dict):
        for k in obj:
            h.update(repr(k).encode())
            _signature(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _signature(v, h)
    else:
        h.update(repr(obj).encode())


# ---------------------------------------------------------------------------- data
def collate_or_none(batch: list):
    """``default_collate``, or None for this rank's empty piece of a short last batch."""
    return default_collate(batch) if batch else None


def draw_seed() -> int:
    """One int64 from the global torch RNG, drawn exactly as ``DataLoader`` and ``RandomSampler``
    draw theirs."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class ShardedBatchSampler:
    """This rank's pieces of the global batches of one shuffled order.

    The epoch's order is ``randperm(n)`` from a generator seeded with :meth:`set_epoch`'s seed (what
    ``RandomSampler`` does with the seed it draws); global batch b is ``order[b·B:(b+1)·B]`` and rank
    r gets the r-th of ``world_size`` contiguous, nearly equal pieces of it (possibly empty in a
    short last batch). Every rank iterates ``ceil(n / B)`` batches, so per-step collectives line up.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the number of processes {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed: int | None = None

    def set_epoch(self, seed: int) -> None:
        """The seed of this epoch's global order (drawn and shared by :func:`epoch`)."""
        self.seed = seed

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.seed is None:
            raise RuntimeError("ShardedBatchSampler: call set_epoch() before iterating (engine.fit does it).")
        g = torch.Generator()
        g.manual_seed(self.seed)
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield batch[slice(*piece(len(batch), self.rank, self.world_size))]


def piece(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous piece when ``n`` items are split into ``world_size``
    pieces whose sizes differ by at most one (the first ``n % world_size`` pieces are larger)."""
    k, m = divmod(n, world_size)
    start = rank * k + min(rank, m)
    return start, start + k + (rank < m)


def train_loader(dataset, batch_size: int, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The training loader of a multi-process run: ``batch_size`` is the global batch; iterate it
    inside :func:`epoch` (``engine.fit`` does). Yields ``None`` for an empty piece."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank(), world_size())
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, generator=torch.Generator(), collate_fn=collate_or_none,
    )


def shard(dataset):
    """This rank's contiguous block of ``dataset`` (statistics, evaluation); the dataset itself in a
    single process."""
    if not is_active():
        return dataset
    start, stop = piece(len(dataset), rank(), world_size())
    return torch.utils.data.Subset(dataset, range(start, stop))


@contextlib.contextmanager
def epoch(loader):
    """Wrap one pass over a loader. For a :func:`train_loader`: draw from the global RNG the two
    numbers a single-process ``DataLoader(shuffle=True)`` draws per epoch (its workers' base seed,
    then ``RandomSampler``'s seed), take rank 0's, fix the epoch's global order, and run the pass with
    per-rank random streams (augmentations, dropout, worker seeds); afterwards the global RNG is
    back in the shared state on every rank. Any other loader: nothing happens."""
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, ShardedBatchSampler):
        yield
        return
    base, seed = draw_seed(), draw_seed()
    base, seed = broadcast_object((base, seed))
    sampler.set_epoch(seed)
    own = (base + 1_000_003 * (rank() + 1)) % (2**63)
    loader.generator.manual_seed(own)
    py_state, np_state = random.getstate(), np.random.get_state()
    comm = comm_device()
    devices = [comm.index] if comm.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(own)
            np.random.seed(own % 2**32)
            torch.manual_seed(own)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
