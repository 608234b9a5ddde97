"""Gaussian statistics per key (class for SLCA, task for DIKI), in one pass over the data.

Features are accumulated as float64 sums Σx and Σxxᵀ per key, so a whole task is processed with a
single loader (spec slca.md §10.2) and the result equals ``torch.cov`` up to float rounding:

    μ = Σx / N,   Σ = (Σxxᵀ − N·μμᵀ) / (N − 1) + ridge·I      (unbiased, SLCA §5.2 / DIKI §4.1)

Cholesky factors are computed once per finalize and cached; sampling draws every key at once
(x = μ̃ + ε·Lᵀ, the same distribution as ``MultivariateNormal(μ̃, Σ).sample``), and log-densities
for DIKI are one triangular solve per key, batched (DIKI spec §7 item 3).

Near-singular covariances (few samples per class: CUB ~30, few-shot 16) get a documented jitter
escalation: if the Cholesky of Σ fails, ``jitter·mean(diag Σ)·I`` is added with jitter growing
×10 from 1e-10 up to 1e-1 until it succeeds; every escalation is logged and recorded.
"""
from __future__ import annotations

import logging
import math

import torch

from clcli import distributed

log = logging.getLogger(__name__)


class GaussianStats:
    """Per-key streaming sums, then means, covariances, Cholesky factors, sampling, log-density.

    ``ridge`` is added to every covariance (SLCA: 1e-4, DIKI: 1e-7). Means are kept in float64,
    covariances in ``cov_dtype`` (float32 like the SLCA reference), factors in float64.
    """

    def __init__(self, dim: int, ridge: float, cov_dtype: torch.dtype = torch.float32):
        self.dim, self.ridge, self.cov_dtype = dim, float(ridge), cov_dtype
        self._n: dict[int, int] = {}
        self._s1: dict[int, torch.Tensor] = {}
        self._s2: dict[int, torch.Tensor] = {}
        self.mean: dict[int, torch.Tensor] = {}
        self.cov: dict[int, torch.Tensor] = {}
        self._chol: dict[int, torch.Tensor] = {}
        self.jitter: dict[int, float] = {}

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def update(self, features: torch.Tensor, keys: torch.Tensor) -> None:
        """Add a batch ``features [B, D]`` whose rows belong to ``keys [B]``."""
        x = features.detach().to(torch.float64)
        keys = keys.to(x.device)
        for k in torch.unique(keys).tolist():
            xk = x[keys == k]
            if k not in self._n:
                self._n[k] = 0
                self._s1[k] = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
                self._s2[k] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
            self._n[k] += xk.shape[0]
            self._s1[k] += xk.sum(0)
            self._s2[k] += xk.T @ xk

    @torch.no_grad()
    def reduce(self) -> None:
        """Sum the pending sums (n, Σx, Σxxᵀ) over the processes of a multi-process run, each of
        which accumulated a shard of the data (``clcli.distributed``); call before ``finalize``. Keys
        a process never saw count as zeros there. A no-op in a single process."""
        if not distributed.is_active():
            return
        keys = sorted(set().union(*distributed.all_gather_object(sorted(self._n))))
        d = self.dim
        for k in keys:
            if k in self._n:
                s1, s2 = self._s1[k], self._s2[k]
                buf = torch.cat([torch.tensor([float(self._n[k])], dtype=torch.float64, device=s1.device), s1, s2.reshape(-1)])
            else:
                buf = torch.zeros(1 + d + d * d, dtype=torch.float64)
            buf = distributed.all_reduce_sum(buf)  # every rank ends with the sums on the same device
            self._n[k], self._s1[k], self._s2[k] = int(buf[0].item()), buf[1 : 1 + d], buf[1 + d :].view(d, d)

    def finalize(self) -> list[int]:
        """Turn pending sums into mean/cov (+ Cholesky); returns the keys finalized. Keys that
        already have statistics are never recomputed (SLCA: old classes keep theirs)."""
        done = []
        for k in list(self._n):
            n, s1, s2 = self._n.pop(k), self._s1.pop(k), self._s2.pop(k)
            if n < 2:
                log.warning("statistics for key %s from %d sample(s): covariance = ridge only", k, n)
            mu = s1 / n
            cov = (s2 - n * torch.outer(mu, mu)) / max(n - 1, 1)
            cov = 0.5 * (cov + cov.T) + self.ridge * torch.eye(self.dim, dtype=torch.float64, device=cov.device)
            self.mean[k] = mu.cpu()
            self.cov[k] = cov.to(self.cov_dtype).cpu()
            self._chol[k] = self._factor(k)
            done.append(k)
        return done

    def _factor(self, k: int) -> torch.Tensor:
        cov = self.cov[k].to(torch.float64)
        L, info = torch.linalg.cholesky_ex(cov)
        jitter = 1e-10
        scale = float(cov.diagonal().mean().clamp_min(1e-12))
        while info.item() != 0:
            if jitter > 1e-1:
                raise RuntimeError(f"covariance of key {k} is not positive definite even with jitter 1e-1")
            L, info = torch.linalg.cholesky_ex(cov + jitter * scale * torch.eye(self.dim, dtype=cov.dtype))
            if info.item() == 0:
                self.jitter[k] = jitter * scale
                log.warning("covariance of key %s needed jitter %.1e·mean(diag) to factorize", k, jitter)
            jitter *= 10
        return L

    # ---------------------------------------------------------------- queries
    @property
    def keys(self) -> list[int]:
        return sorted(self.mean)

    def __contains__(self, k: int) -> bool:
        return k in self.mean

    def cholesky(self, keys: list[int]) -> torch.Tensor:
        """Stacked float64 lower Cholesky factors ``[K, D, D]`` of the keys' covariances."""
        return torch.stack([self._chol[k] for k in keys])

    def sample(self, keys: list[int], n: int, mean_scale: torch.Tensor | None = None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples per key from N(μ_k·scale_k, Σ_k): features ``[K·n, D]`` grouped by key and
        the keys ``[K·n]``. ``factors`` lets callers reuse ``cholesky(keys)`` across epochs."""
        L = (factors if factors is not None else self.cholesky(keys)).to(device=device, dtype=dtype)
        mu = torch.stack([self.mean[k] for k in keys]).to(device)
        if mean_scale is not None:
            mu = mu * mean_scale.to(device=device, dtype=mu.dtype)[:, None]
        eps = torch.randn(len(keys), n, self.dim, generator=generator, device=device, dtype=dtype)
        x = mu.to(dtype)[:, None, :] + eps @ L.transpose(1, 2)
        labels = torch.tensor(keys, device=device).repeat_interleave(n)
        return x.reshape(-1, self.dim), labels

    def log_prob(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Log-density ``[B, K]`` of rows of ``x`` under each key's Gaussian (natural log, with
        −½·d·log 2π − ½·log|Σ|), from the cached factors: const − ½‖L⁻¹(x − μ)‖²."""
        L = self.cholesky(keys).to(x.device)
        mu = torch.stack([self.mean[k] for k in keys]).to(x.device)
        diff = x.to(torch.float64)[None] - mu[:, None, :]  # [K, B, D]
        z = torch.linalg.solve_triangular(L, diff.transpose(1, 2), upper=False)  # [K, D, B]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)  # [K]
        const = -0.5 * (self.dim * math.log(2 * math.pi) + logdet)
        return (const[:, None] - 0.5 * (z * z).sum(1)).T  # [B, K]

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        keys = self.keys
        return {
            "dim": self.dim, "ridge": self.ridge, "keys": keys,
            "mean": torch.stack([self.mean[k] for k in keys]) if keys else torch.zeros(0, self.dim, dtype=torch.float64),
            "cov": torch.stack([self.cov[k] for k in keys]) if keys else torch.zeros(0, self.dim, self.dim),
            "jitter": {int(k): float(v) for k, v in self.jitter.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.dim, self.ridge = int(state["dim"]), float(state["ridge"])
        self.mean = {int(k): state["mean"][i] for i, k in enumerate(state["keys"])}
        self.cov = {int(k): state["cov"][i] for i, k in enumerate(state["keys"])}
        self.jitter = {int(k): float(v) for k, v in state.get("jitter", {}).items()}
        self._chol = {k: self._factor(k) for k in self.mean}
