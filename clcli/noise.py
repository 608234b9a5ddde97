"""Standard normal noise for classifier-alignment sampling, filled by several threads on the CPU.

torch's CPU ``randn`` runs on one thread (a serial Mersenne Twister behind a lock), which made it ~40%
of the alignment's sampling time next to the multi-threaded matmul (README, "Statistics, alignment and
run directories at scale"). Here the noise of a ``GaussianStats.sample`` call is split into *streams*,
one per sampled key: row ``j`` of the call's noise is ``torch.randn`` from a CPU generator seeded
``(seed + j) mod 2³²``, where ``seed`` is one draw from the caller's generator (the global RNG by
default) per call (:func:`draw_seed`). Rows are shared out among ``torch.get_num_threads()`` threads
(torch releases the GIL inside ``randn``), each with its own generator.

The draws are the same for any number of threads and any split of the rows into runs (a row's noise
depends only on ``seed`` and its index), so a run and its resume give the same samples on any
machine. Each row is an ordinary Mersenne Twister stream (mt19937 seeds are 32-bit: rows of two calls
coincide only if their seeds are fewer than K apart, chance ≈ 2K/2³² per pair of calls, ~1e-4 over a
10-task SLCA run). Alignment sampling is described in docs/slca_protocol.md ("Classifier alignment").
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, rebuilt when the thread count changes."""
    global _pool
    if _pool is None or _pool[0] != workers:
        if _pool is not None:
            _pool[1].shutdown(wait=True)
        _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="clcli-noise"))
    return _pool[1]


def _forget_pool() -> None:
    """A forked child has no pool threads: drop the parent's pool object (a new one is made on use)."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """The base seed of one sampling call: a single draw from ``generator`` (the global RNG if None)."""
    return int(torch.randint(0, 2**32, (1,), generator=generator).item())


def _fill_rows(buf: torch.Tensor, seed: int, first: int, lo: int, hi: int) -> None:
    """Rows ``lo:hi`` of ``buf``, each from its own stream, with a generator private to this call."""
    g = torch.Generator()
    for j in range(lo, hi):
        g.manual_seed((seed + first + j) % 2**32)
        torch.randn(buf.shape[1:], generator=g, dtype=buf.dtype, out=buf[j])


def fill_normal(buf: torch.Tensor, seed: int, first: int = 0) -> torch.Tensor:
    """Fill the CPU tensor ``buf [m, ...]`` (contiguous) in place: ``buf[j]`` gets stream
    ``first + j`` of ``seed``. Rows are split among ``torch.get_num_threads()`` threads (the calling
    one and pool threads); with one thread (or one row) the calling thread does all of it."""
    if buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError("fill_normal needs a contiguous CPU tensor")
    m = buf.shape[0]
    workers = max(1, min(torch.get_num_threads(), m))
    if workers == 1:
        _fill_rows(buf, seed, first, 0, m)
        return buf
    bounds = [m * t // workers for t in range(workers + 1)]
    pool = _executor(torch.get_num_threads() - 1)  # sized by the setting, not by m: no rebuild per run
    jobs = [pool.submit(_fill_rows, buf, seed, first, bounds[t], bounds[t + 1]) for t in range(1, workers)]
    try:
        _fill_rows(buf, seed, first, bounds[0], bounds[1])
    finally:  # never return while pool threads still write into buf
        for job in jobs:
            job.result()
    return buf
