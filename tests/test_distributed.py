"""Multi-process data parallelism (clcli.distributed) on CPU with the gloo backend.

A 2-process run must give what one process gives with the same global batch. Exact bit equality
is not expected: a rank's gradient is the mean over its half of the batch and the halves are summed
across ranks (another float summation order than one mean over the whole batch), and features are
computed in other batch shapes. So the tests ask for identical correct/total counts and states equal
to float32 rounding (a few 1e-6 after a whole run), and for bit-identical states across ranks.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clcli import distributed

# The integration run: 2 tasks x 3 classes x 25 images = 75 per task, global batch 16, so the last
# batch of every epoch holds 11 images, split 6/5 between the two processes.
UNEVEN = ["data=synthetic", "backbone=tiny_vit", "device=cpu", "data.source.num_classes=6",
          "data.initial_increment=3", "data.increment=3", "data.num_tasks=2", "data.source.train_per_class=25"]


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _assert_states_close(a: dict, b: dict, atol: float, rtol: float) -> None:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        vb = fb[k]
        if isinstance(va, torch.Tensor) and va.is_floating_point():
            assert torch.allclose(va, vb, atol=atol, rtol=rtol), (k, (va - vb).abs().max().item())
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        elif isinstance(va, float):
            assert math.isclose(va, vb, rel_tol=rtol, abs_tol=atol), (k, va, vb)
        else:
            assert va == vb, k


# ------------------------------------------------------------------------------ sharding (no processes)
def test_shards_reassemble_the_single_process_order_and_rng_stays_shared():
    """The ranks' pieces of every global batch, concatenated, are the batches DataLoader(shuffle=True)
    yields from the same RNG state; pieces differ in size by at most one (empty in a short last batch);
    after each epoch the global RNG is where the single-process loader leaves it, even though the
    ranks drew their own random numbers while iterating."""
    n, batch, epochs = 25, 6, 2  # 4 full batches and one of 1 image
    data = torch.utils.data.TensorDataset(torch.arange(n))
    torch.manual_seed(7)
    reference = [[b[0].tolist() for b in torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)]
                 for _ in range(epochs)]
    state_after = torch.get_rng_state()
    for world in (1, 2, 3):
        per_rank = []
        for rank in range(world):
            torch.manual_seed(7)  # every rank starts from the same state
            loader = torch.utils.data.DataLoader(
                data, batch_sampler=distributed.ShardedBatchSampler(n, batch, rank, world),
                generator=torch.Generator(), collate_fn=distributed.collate_or_none)
            epochs_seen = []
            for _ in range(epochs):
                with distributed.epoch(loader):
                    epochs_seen.append([[] if b is None else b[0].tolist() for b in loader])
                    torch.rand(rank + 1)  # a rank's own draws (augmentations) do not leak out
            assert torch.equal(torch.get_rng_state(), state_after)
            per_rank.append(epochs_seen)
        for e in range(epochs):
            assert len({len(r[e]) for r in per_rank}) == 1  # every rank steps equally often
            for b, expected in enumerate(reference[e]):
                pieces = [r[e][b] for r in per_rank]
                assert sum(pieces, []) == expected
                assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
        if world > 1:
            assert per_rank[-1][0][-1] == []  # the 1-image last batch leaves a rank empty


def test_batch_size_must_divide_among_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "divisible by the number of processes" in distributed.problems(15)[0]
    assert distributed.problems(16) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.problems(15) == []


# ------------------------------------------------------------------------------ fit / stats in 2 processes
# fork: the workers inherit the imported modules (seconds faster than spawn); the parent never
# initializes a process group, so nothing of it is shared.
START = "fork" if sys.platform.startswith("linux") else "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_problem():
    """25 samples (global batch 6: last batch of 1 -> one rank gets nothing), a linear model plus a
    parameter no step uses (its grad stays None: SGD must skip it as in one process)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(25, 4, generator=g), torch.randint(0, 3, (25,), generator=g)
    torch.manual_seed(1)
    model, unused = torch.nn.Linear(4, 3), torch.nn.Linear(2, 2)
    return torch.utils.data.TensorDataset(x, y), model, unused


def _toy_fit(rt):
    from clcli.engine import fit

    data, model, unused = _toy_problem()
    opt = torch.optim.SGD([*model.parameters(), *unused.parameters()], lr=0.5, momentum=0.9, weight_decay=1e-3)
    loader = rt.loader(data, 6, shuffle=True)
    torch.manual_seed(2)
    history = fit(lambda x, y: torch.nn.functional.cross_entropy(model(x), y), loader, epochs=3, optimizer=opt,
                  scheduler=None, rt=rt, where="toy", num_classes=3)
    return {"model": model.state_dict(), "unused": unused.state_dict(), "history": history}


def _toy_stats():
    """Statistics of 3 classes over 40 feature rows; a rank's block misses some classes."""
    from clcli.stats import GaussianStats

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0] * 18 + [1] * 4 + [2] * 18)
    stats = GaussianStats(5, ridge=1e-4)
    idx = list(range(*distributed.piece(40, distributed.rank(), distributed.world_size())))  # this rank's block
    stats.update(feats[idx], labels[idx])
    stats.reduce()
    stats.finalize()
    return stats.state_dict()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from clcli.engine import Runtime

    with distributed.session(torch.device("cpu")) as device:
        rt = Runtime(device=device)
        result = {"fit": _toy_fit(rt), "stats": _toy_stats()}
        distributed.check_in_sync(result, "after the toy fit")  # identical on both ranks
        diverged = {"w": torch.ones(3) * (1 + rank)}
        try:
            distributed.check_in_sync(diverged, "test")
            result["divergence_detected"] = False
        except RuntimeError:
            result["divergence_detected"] = True
        torch.save(result, Path(out) / f"rank{rank}.pt")


def test_fit_and_stats_in_two_processes_equal_one_process(tmp_path):
    from clcli.engine import Runtime

    single = {"fit": _toy_fit(Runtime()), "stats": _toy_stats()}
    ctx = torch.multiprocessing.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                                start_method=START, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process toy fit hung")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r.pop("divergence_detected") for r in ranks)
    _assert_states_close(ranks[0], ranks[1], atol=0, rtol=0)  # bit-identical across ranks
    _assert_states_close(ranks[0], single, atol=1e-6, rtol=1e-5)
    assert torch.equal(ranks[0]["fit"]["unused"]["weight"], single["fit"]["unused"]["weight"])  # never stepped


# ------------------------------------------------------------------------------ the CLI under torchrun
def test_torchrun_run_equals_single_process_run(tmp_path):
    """`torchrun --nproc_per_node=2 -m clcli.cli train -m method=slca,frozen` (gloo on CPU) against the
    same runs in one process: identical accuracy counts, checkpoints equal to float32 rounding, files
    written once (rank 0), and the sweep's second job runs in the same process group."""
    from conftest import run_tiny

    from clcli.results import RunStore

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    sweep = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clcli.cli",
           "train", "-m", *UNEVEN, "method=slca,frozen", "checkpoint.keep=all", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=${hydra:runtime.choices.method}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:  # the single-process references run meanwhile
        singles = {m: run_tiny(tmp_path, UNEVEN + [f"method={m}", "checkpoint.keep=all"], f"single_{m}")
                   for m in ("slca", "frozen")}
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # a hang: stop torchrun and its workers (their own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    # one end-of-run summary per job ("... forgetting F   (T s)"): rank 0 prints, rank 1 does not
    assert len(re.findall(r"forgetting -?[0-9.]+ +\([0-9]+ s\)", out)) == 2
    assert out.count(": 2 job(s)") == 1  # one end-of-sweep report (rank 0)
    for method, single in singles.items():
        run_dir = sweep / method
        res = json.loads((run_dir / "results.json").read_text())
        assert res["environment"]["world_size"] == 2 and single["environment"]["world_size"] == 1
        assert res["counts"] == single["counts"], method
        assert res["metrics"] == single["metrics"]
        if method == "frozen":  # rank 0's block of each test set (one eval batch) encoded once, then served
            cache = res["method_summary"]["feature_cache"]
            assert (cache["datasets_encoded"], cache["batches_encoded"], cache["batches_served"]) == (2, 2, 1)
        ckpts = RunStore(run_dir, "").checkpoints()
        assert [p.name for p in ckpts] == ["task_00.pt", "task_01.pt"]
        for ckpt in ckpts:  # with the statistics merged back from the task_XX.stats.pt files
            fp = torch.load(ckpt, weights_only=True)["fingerprint"]
            ours = RunStore(run_dir, fp).state_at(ckpt)["method"]
            ref_dir = tmp_path / f"single_{method}"
            ref = RunStore(ref_dir, fp).state_at(ref_dir / "checkpoints" / ckpt.name)["method"]
            # parameters to ~1e-6; class means (|x| ~ 2.5) of features through the trained backbone to ~1e-5
            _assert_states_close(ours, ref, atol=2e-5, rtol=1e-5)
    assert not [p for p in sweep.rglob("*.tmp")]
