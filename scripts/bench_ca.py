"""Classifier-alignment sampling: clcli's float32 factors + block-run sampling vs the SLCA reference's
per-class ``MultivariateNormal`` rebuilt every epoch (spec slca.md §9 "CA", §10.3).

Every configuration runs in its own child process, so each peak RSS (``ru_maxrss``) is that
configuration's alone.

Default: 200 classes x 768 dims x 256 samples x 5 epochs, baseline vs clcli. clcli's factors exist from
the moment a class is finalized (once per class per run), so its alignment time is the sampling; the
factorisation is printed next to it, and a second ratio charges it to this one alignment as well. Before
timing, clcli's samples are checked against the reference's ``MultivariateNormal`` given the same noise
(``rsample``'s loc + scale_tril·ε, the noise rebuilt from ``clcli.noise``'s streams; relative 1e-3: the
reference factors in float32, clcli in float64). CPU noise is filled by ``torch.get_num_threads()``
threads (printed).
The last line is ``ratio: <baseline / clcli>`` (alignment time of one task).

``--scaling``: for C in ``--scaling-classes`` (100, 200, 400, 800, 1000) at ``--dim``: clcli's peak RSS,
factorisation time and sampling time per epoch next to the floor measured in the same run (one batched
float32 matmul [C, n, D] x [C, D, D] in a process holding just its operands), then the default
comparison and its ratio. Times are the best epoch (of ``--rounds`` alternating process pairs for the
table): on a shared machine the least disturbed one. ``clcli`` is imported before torch, so this process
and its children (baseline, clcli and floor alike) run with the OpenMP spin setting every clcli run
has (``GOMP_SPINCOUNT``, see ``clcli/__init__.py``).

    python scripts/bench_ca.py [--classes 200] [--dim 768] [--samples 256] [--epochs 5] [--device cpu]
    python scripts/bench_ca.py --scaling [--scaling-classes 100,200,400,800,1000] [--scaling-epochs 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # clcli from this checkout

import clcli  # noqa: E402,F401 - before torch: its OpenMP setting (GOMP_SPINCOUNT), as in every clcli run

# isort: split
import torch  # noqa: E402

from clcli import noise  # noqa: E402
from clcli.stats import GaussianStats  # noqa: E402


def peak_mb(device: torch.device) -> float:
    """Peak memory of this process: RSS (MiB) on CPU, allocated device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gaussians(C: int, D: int, rank: int = 64):
    """Class Gaussians like fitted ones: low-rank-plus-ridge float64 covariances, random means."""
    g = torch.Generator().manual_seed(0)
    for c in range(C):
        A = torch.randn(D, rank, generator=g, dtype=torch.float64) / rank**0.5
        yield c, torch.randn(D, generator=g, dtype=torch.float64), A @ A.T + 1e-4 * torch.eye(D, dtype=torch.float64)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def child_baseline(C, D, n, E, dev) -> dict:
    """The reference: float32 covariances; per epoch, per class MultivariateNormal(mean·scale, cov).sample(n)."""
    means, covs = {}, {}
    for c, mu, cov in gaussians(C, D):
        means[c], covs[c] = mu, cov.float()
    scale = torch.linspace(0.9, 1.0, C, dtype=torch.float64)
    torch.manual_seed(0)
    epochs = []
    for _ in range(E):
        sync(dev)
        t0 = time.perf_counter()
        xs = [torch.distributions.MultivariateNormal((means[c].to(dev) * scale[c]).float(), covs[c].to(dev)).sample((n,))
              for c in range(C)]
        x = torch.cat(xs)
        del xs
        sync(dev)
        epochs.append(time.perf_counter() - t0)
    err = (x[:n].double().mean(0).cpu() - means[0] * scale[0]).abs().mean().item()
    return {"time_s": sum(epochs), "epoch_s": min(epochs), "peak_mb": peak_mb(dev), "mean_err": err,
            "sd": covs[0].diagonal().sqrt().mean().item()}


TASK_CLASSES = 20  # classes finalized together (one task; Split CIFAR-100 / ImageNet-R in 10 tasks)


def child_clcli(C, D, n, E, dev) -> dict:
    """clcli: ``GaussianStats.add`` per task of ``TASK_CLASSES`` classes (float32 covariances + their
    factors, as ``finalize`` stores them), then ``E`` epochs of ``sample`` over every class, as the
    alignment does."""
    stats = GaussianStats(D, ridge=1e-4)
    factor_s = 0.0
    block: list = []
    for c, mu, cov in gaussians(C, D):
        block.append((c, mu, cov.float()))
        if len(block) == TASK_CLASSES or c == C - 1:  # finalize stores a task's classes as one block
            keys, means, covs = zip(*block)
            means, covs = torch.stack(means), torch.stack(covs)
            block.clear()
            t0 = time.perf_counter()
            stats.add(list(keys), means, covs)
            factor_s += time.perf_counter() - t0
            del means, covs
    labels = list(range(C))
    scale = torch.linspace(0.9, 1.0, C, dtype=torch.float64)
    # same noise -> the reference's samples, up to float32 rounding (checked before timing): the CPU noise of
    # a call is stream i of one seeded draw for key i (clcli.noise), fed to MultivariateNormal's rsample formula
    k = min(C, 2)
    ours, _ = stats.sample(labels[:k], n, mean_scale=scale[:k], generator=torch.Generator().manual_seed(1))
    eps = noise.fill_normal(torch.empty(k, n, D), noise.draw_seed(torch.Generator().manual_seed(1)))
    mvns = [torch.distributions.MultivariateNormal((stats.mean[c] * scale[c]).float(), stats.cov[c]) for c in range(k)]
    ref = torch.cat([m.loc + eps[c] @ m.scale_tril.T for c, m in enumerate(mvns)])
    same = ((ours - ref).abs().max() / ref.abs().max()).item()
    # the reference factors the float32 covariance in float32, clcli in float64 (then stores float32): the
    # difference is the reference's float32 factorisation error, ~cond(L)·2^-24 (1e-4 at 768-d, ridge 1e-4)
    assert same <= 1e-3, f"clcli samples differ from the reference's for the same noise: rel {same:.2e}"
    del ref, ours, eps
    torch.manual_seed(0)
    epochs = []
    x = None
    for _e in range(E):
        sync(dev)
        t0 = time.perf_counter()
        x, _ = stats.sample(labels, n, mean_scale=scale, device=dev, out=x)  # as the alignment: one buffer
        sync(dev)
        epochs.append(time.perf_counter() - t0)
    err = (x[:n].double().mean(0).cpu() - stats.mean[0] * scale[0]).abs().mean().item()
    return {"time_s": sum(epochs), "epoch_s": min(epochs), "epochs_s": epochs, "factor_s": factor_s,
            "peak_mb": peak_mb(dev), "mean_err": err, "same_draw_rel": same,
            "sd": stats.cov[0].diagonal().sqrt().mean().item()}


def child_floor(C, D, n, E, dev) -> dict:
    """The floor: one batched float32 matmul of the sampling's shape, best of ``E``, in a process
    holding only its operands and output."""
    eps = torch.randn(C, n, D, device=dev)
    Lt = torch.randn(C, D, D, device=dev)
    out = torch.empty(C, n, D, device=dev)
    times = []
    for _ in range(E):
        sync(dev)
        t0 = time.perf_counter()
        torch.bmm(eps, Lt, out=out)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"epoch_s": min(times), "peak_mb": peak_mb(dev)}


CHILDREN = {"baseline": child_baseline, "clcli": child_clcli, "floor": child_floor}


def spawn(kind: str, C: int, D: int, n: int, E: int, device: str) -> dict:
    """Run one configuration in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--child", kind, "--classes", str(C), "--dim", str(D), "--samples", str(n),
           "--epochs", str(E), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child (C={C}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(C, D, n, E, device) -> float:
    """The usual comparison at one size; prints it and returns baseline / clcli, from each one's best
    epoch (the machine may be shared: the best epoch is the least disturbed one)."""
    base = spawn("baseline", C, D, n, E, device)
    ours = spawn("clcli", C, D, n, E, device)
    for name, r in (("baseline", base), ("clcli", ours)):
        print(f"{name:9s} class-0 sample mean |err| avg {r['mean_err']:.4f} (target sd avg {r['sd']:.4f})")
    print(f"clcli vs reference, same noise: max |diff| / max |x| = {ours['same_draw_rel']:.1e} "
          "(the reference's float32 Cholesky vs clcli's float64 one, stored float32; bound 1e-3)")
    print(f"device: {device} ({torch.get_num_threads()} threads); {C} classes x {D} dims x {n} samples x {E} epochs")
    print(f"baseline (per-class MultivariateNormal each epoch): {base['time_s']:.2f} s ({E} x best {base['epoch_s']:.3f} s), "
          f"peak RSS {base['peak_mb']:.0f} MB")
    print(f"clcli (float32 factors kept, block-run sampling):  {ours['time_s']:.2f} s ({E} x best {ours['epoch_s']:.3f} s), "
          f"peak RSS {ours['peak_mb']:.0f} MB; + {ours['factor_s']:.2f} s factorising the {C} classes once, at finalize")
    with_factor = E * base["epoch_s"] / (E * ours["epoch_s"] + ours["factor_s"])
    print(f"ratio with that factorisation charged to this one alignment: {with_factor:.2f}")
    return base["epoch_s"] / ours["epoch_s"]


def scaling(classes: list[int], D: int, n: int, E: int, device: str, rounds: int) -> None:
    print(f"scaling: d = {D}, {n} samples per class, {torch.get_num_threads()} threads; times: best of {E} epochs x "
          f"{rounds} rounds (clcli and floor alternate, a fresh process each); peak RSS of the process")
    print(f"{'C':>5} | {'factor s':>8} | {'sample s/ep':>11} | {'floor s':>7} | {'sample/floor':>12} | "
          f"{'peak RSS MB':>11} | {'floor RSS MB':>12} | {'cov+factor MB':>13}")
    for C in classes:
        runs = [(spawn("clcli", C, D, n, E, device), spawn("floor", C, D, n, E, device)) for _ in range(rounds)]
        ours = min((r[0] for r in runs), key=lambda r: r["epoch_s"])
        floor = min((r[1] for r in runs), key=lambda r: r["epoch_s"])
        held = 2 * C * D * D * 4 / 2**20
        print(f"{C:>5} | {ours['factor_s']:>8.2f} | {ours['epoch_s']:>11.3f} | {floor['epoch_s']:>7.3f} | "
              f"{ours['epoch_s'] / floor['epoch_s']:>12.2f} | {ours['peak_mb']:>11.0f} | {floor['peak_mb']:>12.0f} | "
              f"{held:>13.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scaling", action="store_true", help="the scaling table, then the default comparison")
    ap.add_argument("--scaling-classes", default="100,200,400,800,1000")
    ap.add_argument("--scaling-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="scaling: clcli/floor process pairs per size")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = CHILDREN[args.child](args.classes, args.dim, args.samples, args.epochs, torch.device(args.device))
        print(json.dumps(res))
        return
    if args.scaling:
        scaling([int(c) for c in args.scaling_classes.split(",")], args.dim, args.samples, args.scaling_epochs, args.device,
                args.rounds)
    ratio = compare(args.classes, args.dim, args.samples, args.epochs, args.device)
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
