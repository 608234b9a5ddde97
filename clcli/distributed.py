"""Multi-process data-parallel runs under ``torchrun``: one process per device, PyTorch's
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP) for training.

Launch (single node, N GPUs; CPU processes use the gloo backend)::

    torchrun --standalone --nproc_per_node=N -m clcli.cli train <overrides>

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`session` (entered by
``clcli.train.run``) then initializes the process group (nccl on CUDA, gloo on CPU) and computes on
``cuda:LOCAL_RANK``. Without those variables, or with ``WORLD_SIZE=1``, nothing here does anything
and a run is the plain single-process run, draw for draw.

What a multi-process run does:

- Training (:func:`clcli.engine.fit`): the method's loss module (``forward(x, y)`` = the batch's
  mean loss) runs through DDP (:func:`data_parallel`), which averages the gradients across ranks
  while backward runs. ``optim.batch_size`` is the global batch: each rank loads
  ``batch_size / world_size`` samples per step through a ``DistributedSampler`` (a new shuffle per
  pass, :meth:`~torch.utils.data.DistributedSampler.set_epoch`; its seed is drawn from the global
  RNG, so a resumed run draws it again). The sampler pads an epoch to a multiple of the number of
  processes by repeating samples, so every rank takes the same number of equal-sized steps. The
  divergence guard sees the loss averaged over ranks (:func:`mean_over_ranks`), so all ranks stop
  together.
- Randomness a rank draws while training (augmentations, dropout, loader workers) comes from its
  own streams (:func:`rank_streams`); afterwards every rank's global RNG is back in the shared
  state, so later draws (classifier alignment's sampled features) are identical on every rank.
- Statistics: each rank accumulates ``GaussianStats`` sums over its block of the data
  (:func:`shard`), then ``GaussianStats.reduce()`` sums (n, Σx, Σxxᵀ) across ranks before ``finalize``.
- Evaluation: each rank predicts its block of a test set; correct/total counts are summed.
- After every task :func:`check_in_sync` compares a signature of the method's state across ranks
  (identical: DDP gives every rank the same averaged gradients) and stops on divergence.
- Only rank 0 writes checkpoints, results and plots, prints the summary and shows progress bars;
  the other ranks log warnings only.

A multi-process run equals a single-process run with the same global batch *in distribution*, not
number for number: the ranks see other shuffles than one process would, the padded last batches
repeat a few samples, and the per-rank random streams draw other augmentations. Still exact (up to
float summation order): class statistics and evaluation counts over a given model (block sums
reduced across ranks), and a training step whose global batch is the same set of samples (e.g. one
full-batch step: the average of the ranks' mean gradients is the mean gradient). Per-sample
computation must not depend on the rest of the batch (BatchNorm in train mode would; the shipped
timm backbones keep BN in eval mode, ``freeze_bn_stats``).

Every rank works in rank 0's run dir. Hydra computes ``${now:...}`` run/sweep dirs in each process,
so pass ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``) explicitly: otherwise a process that
started a second later leaves a stray dir holding only its ``.hydra/`` and log.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import logging
import os
import random
import struct
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from clcli.errors import ConfigError

log = logging.getLogger("clcli")


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


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean over ranks of a scalar (the step's loss, so that the divergence guard decides the
    same on every rank); ``float(value)`` in a single process."""
    if not is_active():
        return float(value.detach())
    t = all_reduce_sum(value.detach().to(torch.float64).reshape(1))
    return float(t) / world_size()


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


# ---------------------------------------------------------------------------- training
def data_parallel(module):
    """``module`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` in a multi-process
    run; the module itself in a single process, for a DDP module, or when nothing in it requires a
    gradient. Wrap a module once for many passes (DDP broadcasts rank 0's parameters and buffers
    when it is built).

    DDP averages the gradients of the parameters with ``requires_grad`` while backward runs and
    ignores the others (DIKI's frozen CLIP). ``find_unused_parameters=False``: clcli's loss modules
    use every trainable parameter in every step (tests/test_distributed.py checks them), so DDP
    need not search the graph after each forward. Buffers are not re-broadcast before every forward:
    training changes none (the timm backbones keep BatchNorm statistics frozen, ``freeze_bn_stats``).
    BatchNorm in train mode (``backbone.freeze_bn_stats=false``) would make the ranks' statistics
    drift apart whether or not DDP re-broadcasts them (the last step's update is per rank), and
    :func:`check_in_sync`, which compares buffers too, stops the run after the task."""
    if not is_active() or isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"a multi-process run trains through DistributedDataParallel, which needs an nn.Module "
                        f"whose forward(x, y) returns the batch's mean loss; got {type(module).__name__}.")
    if not any(p.requires_grad for p in module.parameters()):
        return module
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames broadcast_buffers (which also skipped buffers at init) to forward_sync_buffers
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    device = comm_device()
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
               **no_buffer_sync)


def shared_seed() -> int:
    """One int64 drawn from the global torch RNG, which is in the same state on every rank (the
    same seeds, and :func:`rank_streams` restores it after training); stops if it is not."""
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    if is_active() and len(seeds := set(all_gather_object(seed))) > 1:
        raise RuntimeError(f"distributed: the processes' global random generators differ (drew {sorted(seeds)}); "
                           "a step drew random numbers outside clcli.distributed.rank_streams.")
    return seed


@contextlib.contextmanager
def rank_streams():
    """Run the block (a training loop) with this rank's own random streams (torch, this rank's
    GPU, numpy, python), seeded from one draw of the shared global RNG and the rank: the ranks draw
    different augmentations, dropout masks and loader-worker seeds. Afterwards the global streams
    are back where they were plus that one draw, the same on every rank. A single process draws
    nothing and changes nothing."""
    if not is_active():
        yield
        return
    own = (shared_seed() + 1_000_003 * (rank() + 1)) % 2**63
    py_state, np_state = random.getstate(), np.random.get_state()
    comm = comm_device()
    try:
        with torch.random.fork_rng(devices=[comm.index] if comm.type == "cuda" else []):
            random.seed(own)
            np.random.seed(own % 2**32)
            torch.manual_seed(own)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ---------------------------------------------------------------------------- unshuffled blocks
def piece(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous piece when ``n`` items are split into ``world_size``
    pieces whose sizes differ by at most one (the first ``n % world_size`` pieces are larger)."""
    k, m = divmod(n, world_size)
    start = rank * k + min(rank, m)
    return start, start + k + (rank < m)


def shard(dataset):
    """This rank's contiguous block of ``dataset`` (statistics, evaluation); the dataset itself in a
    single process."""
    if not is_active():
        return dataset
    start, stop = piece(len(dataset), rank(), world_size())
    return torch.utils.data.Subset(dataset, range(start, stop))
