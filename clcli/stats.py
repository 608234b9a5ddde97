"""Gaussian statistics per key (class for SLCA, task for DIKI), in one pass over the data.

Features are accumulated as float64 sums Σx and Σxxᵀ per key, so a whole task is processed with a
single loader (spec slca.md §10.2) and the result equals ``torch.cov`` up to float rounding:

    μ = Σx / N,   Σ = (Σxxᵀ − N·μμᵀ) / (N − 1) + ridge·I      (unbiased, SLCA §5.2 / DIKI §4.1)

Precision: the sums are float64 (a sum of many products needs it); means are kept in float64 and
covariances in ``cov_dtype`` (float32 for SLCA, as the reference stores them; DIKI asks for float64).
The lower Cholesky factor of each covariance is computed once, when its key is finalized (or loaded),
at the covariance's precision, and kept: one copy per key, never rebuilt per task. A float32 factor of
the stored float32 covariance is exactly what the reference's ``MultivariateNormal`` computes.

Sampling (x = μ̃ + ε·Lᵀ, the same distribution as ``MultivariateNormal(μ̃, Σ).sample``) runs key by
key into one preallocated output, in float32 like the reference: the extra memory is one [n, D] noise
buffer, the factors are never stacked, and the product skips most of Lᵀ's zero lower triangle. The
noise of key after key is the same stream as one ``randn(K, n, D)`` (CPU, n·D a multiple of 16).
Log-densities for DIKI are one triangular solve per key, batched (DIKI spec §7 item 3).

Persistence: ``state_dict(keys=...)`` writes a subset of the keys, ``stub_state`` the header without
tensors and ``merge_states`` puts a stub and its parts back together, so that run checkpoints can store
each key's statistics once, in the checkpoint of the task that finalized it (``clcli.results.RunStore``).

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


STATE_KIND = "clcli-gaussian-stats"  # tags a state dict so that checkpoint code can find and split it
TRI_BLOCKS = 4  # column blocks of the sampling product ε·Lᵀ: skips 3/8 of its multiply-adds (zeros of Lᵀ)


class GaussianStats:
    """Per-key streaming sums, then means, covariances, Cholesky factors, sampling, log-density.

    ``ridge`` is added to every covariance (SLCA: 1e-4, DIKI: 1e-7). Means are kept in float64,
    covariances and their lower Cholesky factors in ``cov_dtype`` (float32 like the SLCA reference).
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
            self.set(k, mu, cov)
            done.append(k)
        return done

    def set(self, k: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Store key ``k``'s mean (kept float64) and covariance (cast to ``cov_dtype``; ridge already
        added) on the CPU, and factor it once. ``finalize`` goes through here; so do benchmarks."""
        self.mean[k] = mean.to(device="cpu", dtype=torch.float64)
        self.cov[k] = cov.to(device="cpu", dtype=self.cov_dtype)
        self._chol[k] = self._factor(k)

    def _factor(self, k: int) -> torch.Tensor:
        """Lower Cholesky factor of the stored covariance, at its precision (float32: the
        reference's ``MultivariateNormal`` factorisation)."""
        cov = self.cov[k]
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
        """Stacked lower Cholesky factors ``[K, D, D]`` (``cov_dtype``) of the keys: a copy, for a few
        keys (DIKI's tasks); sampling never stacks them."""
        return torch.stack([self._chol[k] for k in keys])

    @torch.no_grad()
    def sample(self, keys: list[int], n: int, mean_scale: torch.Tensor | None = None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples per key from N(μ_k·scale_k, Σ_k): features ``[K·n, D]`` grouped by key and
        the keys ``[K·n]``. Key by key into the output: memory is the output plus one [n, D] noise
        buffer and one factor on ``device`` at a time."""
        device = torch.device(device)
        d = self.dim
        mu = torch.stack([self.mean[k] for k in keys]) if keys else torch.zeros(0, d, dtype=torch.float64)
        if mean_scale is not None:
            mu = mu * mean_scale.to(dtype=mu.dtype)[:, None]
        mu = mu.to(device=device, dtype=dtype)
        x = torch.empty(len(keys) * n, d, device=device, dtype=dtype)
        eps = torch.empty(n, d, device=device, dtype=dtype)
        edges = [d * j // TRI_BLOCKS for j in range(TRI_BLOCKS + 1)]
        for i, k in enumerate(keys):
            torch.randn(n, d, generator=generator, out=eps)
            L = self._chol[k].to(device=device, dtype=dtype)
            xk = x[i * n : (i + 1) * n]
            for a, b in zip(edges[:-1], edges[1:]):  # x[:, a:b] = ε[:, :b]·L[a:b, :b]ᵀ (L[a:b, b:] = 0)
                if b > a:
                    torch.mm(eps[:, :b], L[a:b, :b].T, out=xk[:, a:b])
            xk += mu[i]
        labels = torch.tensor(keys, dtype=torch.long, device=device).repeat_interleave(n)
        return x, labels

    def log_prob(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Log-density ``[B, K]`` of rows of ``x`` under each key's Gaussian (natural log, with
        −½·d·log 2π − ½·log|Σ|), from the cached factors: const − ½‖L⁻¹(x − μ)‖², solved in float64
        (float32 factors enter exactly; their rounding is the only float32 error)."""
        L = self.cholesky(keys).to(device=x.device, dtype=torch.float64)
        mu = torch.stack([self.mean[k] for k in keys]).to(x.device)
        diff = x.to(torch.float64)[None] - mu[:, None, :]  # [K, B, D]
        z = torch.linalg.solve_triangular(L, diff.transpose(1, 2), upper=False)  # [K, D, B]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)  # [K]
        const = -0.5 * (self.dim * math.log(2 * math.pi) + logdet)
        return (const[:, None] - 0.5 * (z * z).sum(1)).T  # [B, K]

    # ---------------------------------------------------------------- persistence
    def state_dict(self, keys: list[int] | None = None) -> dict:
        """Means, covariances and jitter of ``keys`` (default: every finalized key), stacked in key
        order. Factors are not stored: they are recomputed, identically, on load."""
        keys = self.keys if keys is None else sorted(int(k) for k in keys)
        return {
            "kind": STATE_KIND, "dim": self.dim, "ridge": self.ridge, "keys": keys,
            "mean": torch.stack([self.mean[k] for k in keys]) if keys else torch.zeros(0, self.dim, dtype=torch.float64),
            "cov": torch.stack([self.cov[k] for k in keys]) if keys else torch.zeros(0, self.dim, self.dim, dtype=self.cov_dtype),
            "jitter": {int(k): float(v) for k, v in self.jitter.items() if k in keys},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a full state (``state_dict()``, or ``merge_states`` of a stub and its parts)."""
        if state.get("stored_apart"):
            raise ValueError("these statistics were stored apart from the checkpoint (a stub): load the "
                             "checkpoint through clcli.results.RunStore.latest_state(), which merges them back")
        self.dim, self.ridge = int(state["dim"]), float(state["ridge"])
        self.mean = {int(k): state["mean"][i] for i, k in enumerate(state["keys"])}
        self.cov = {int(k): state["cov"][i].to(self.cov_dtype) for i, k in enumerate(state["keys"])}
        self.jitter = {int(k): float(v) for k, v in state.get("jitter", {}).items()}
        self._chol = {k: self._factor(k) for k in self.mean}


def is_state(obj) -> bool:
    """True for a ``GaussianStats.state_dict()`` (full, partial or stub)."""
    return isinstance(obj, dict) and obj.get("kind") == STATE_KIND


def stub_state(state: dict) -> dict:
    """The header of a state (dim, ridge, every key) without its tensors: what a checkpoint keeps
    when the statistics themselves are stored apart."""
    return {"kind": STATE_KIND, "dim": state["dim"], "ridge": state["ridge"], "keys": list(state["keys"]),
            "stored_apart": True}


def merge_states(stub: dict, parts) -> dict:
    """A full state from a ``stub`` and partial states (an iterable, consumed one at a time so that
    only one part is in memory next to the result) that together hold every key of the stub; a later
    part wins for a key held twice. Raises ``KeyError`` naming the keys no part holds."""
    keys = [int(k) for k in stub["keys"]]
    row = {k: i for i, k in enumerate(keys)}
    d = int(stub["dim"])
    mean = torch.empty(len(keys), d, dtype=torch.float64)
    cov = None
    jitter: dict[int, float] = {}
    found: set[int] = set()
    for part in parts:
        if cov is None:
            cov = torch.empty(len(keys), d, d, dtype=part["cov"].dtype)
        for i, k in enumerate(part["keys"]):
            if int(k) in row:
                mean[row[int(k)]] = part["mean"][i]
                cov[row[int(k)]] = part["cov"][i]
                found.add(int(k))
        jitter.update({int(k): float(v) for k, v in part.get("jitter", {}).items() if int(k) in row})
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(missing)
    if cov is None:
        cov = torch.zeros(0, d, d)
    return {"kind": STATE_KIND, "dim": d, "ridge": stub["ridge"], "keys": keys, "mean": mean, "cov": cov, "jitter": jitter}
