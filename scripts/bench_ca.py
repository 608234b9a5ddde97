"""Classifier-alignment sampling: clcli's batched Cholesky sampler vs the SLCA reference's per-class
``MultivariateNormal`` rebuilt every epoch (spec slca.md §9 "CA", §10.3).

Default: 200 classes x 768 dims x 256 samples x 5 epochs. Prints both times, peak memory, the sample
moments of both samplers against the target, and as its last line ``ratio: <baseline / clcli>``.

    python scripts/bench_ca.py [--classes 200] [--dim 768] [--samples 256] [--epochs 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from clcli.stats import GaussianStats


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_stats(C: int, D: int, rank: int = 64) -> GaussianStats:
    """Class Gaussians like fitted ones: low-rank-plus-ridge covariances, random means."""
    g = torch.Generator().manual_seed(0)
    s = GaussianStats(D, ridge=1e-4)
    for c in range(C):
        A = torch.randn(D, rank, generator=g, dtype=torch.float64) / rank**0.5
        s.mean[c] = torch.randn(D, generator=g, dtype=torch.float64)
        s.cov[c] = (A @ A.T + 1e-4 * torch.eye(D, dtype=torch.float64)).float()
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    C, D, n, E = args.classes, args.dim, args.samples, args.epochs
    stats = make_stats(C, D)
    labels = list(range(C))
    scale = torch.linspace(0.9, 1.0, C, dtype=torch.float64)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # baseline: the reference — per epoch, per class, MultivariateNormal(mean·scale, cov).sample(n)
    torch.manual_seed(0)
    sync()
    t0 = time.perf_counter()
    for _ in range(E):
        xs = []
        for c in labels:
            mu = (stats.mean[c].to(dev) * scale[c]).float()
            mvn = torch.distributions.MultivariateNormal(mu, stats.cov[c].to(dev))
            xs.append(mvn.sample((n,)))
        base_x = torch.cat(xs)
    sync()
    t_base = time.perf_counter() - t0
    mem_base = peak_mb(dev)

    # clcli: factors once per task (included in the time), one batched draw per epoch
    torch.manual_seed(0)
    sync()
    t0 = time.perf_counter()
    stats._chol = {}
    for c in labels:
        stats._chol[c] = stats._factor(c)
    factors = stats.cholesky(labels)
    for _ in range(E):
        ours_x, _ = stats.sample(labels, n, mean_scale=scale, device=dev, factors=factors)
    sync()
    t_ours = time.perf_counter() - t0
    mem_ours = peak_mb(dev)

    k = 0
    target_mu = (stats.mean[k] * scale[k]).float()
    for name, x in (("baseline", base_x[:n]), ("clcli", ours_x[:n])):
        err_mu = (x.double().mean(0).cpu() - target_mu.double()).abs().mean().item()
        print(f"{name:9s} class-0 sample mean |err| avg {err_mu:.4f} (target sd avg {stats.cov[k].diagonal().sqrt().mean():.4f})")
    print(f"device: {dev}; {C} classes x {D} dims x {n} samples x {E} epochs")
    print(f"baseline (per-class MultivariateNormal each epoch): {t_base:.2f} s, peak {mem_base:.0f} MB")
    print(f"clcli (Cholesky once, batched sampling):           {t_ours:.2f} s, peak {mem_ours:.0f} MB")
    print(f"ratio: {t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
