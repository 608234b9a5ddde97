"""Gaussian statistics per key (class for SLCA, task for DIKI), in one pass over the data.

Features are accumulated as float64 sums Σx and Σxxᵀ per key, so a whole task is processed with a
single loader (spec slca.md §10.2) and the result equals ``torch.cov`` up to float rounding:

    μ = Σx / N,   Σ = (Σxxᵀ − N·μμᵀ) / (N − 1) + ridge·I      (unbiased, SLCA §5.2 / DIKI §4.1)

Precision: the sums are float64 (a sum of many products needs it); means are kept in float64 and
covariances in ``cov_dtype`` (float32 for SLCA, as the reference stores them; DIKI asks for float64).
The lower Cholesky factor of each stored covariance is computed once, when its key is finalized (or
loaded), in float64 (as before: the same factors, so the same samples as earlier clcli versions and
resumed runs), and kept at the covariance's precision: one copy per key, never rebuilt per task.

The keys finalized together (a task's classes) are stored as one block: their covariances and factors
are rows of two [K, D, D] tensors (``cov[k]`` and the factor of k are views into them), factored by one
batched Cholesky call per chunk of keys. Sampling (x = μ̃ + ε·Lᵀ, the same distribution as
``MultivariateNormal(μ̃, Σ).sample``) runs in float32 like the reference, a run of consecutive keys of
one block at a time: the noise, then one batched matmul on views of the block, written into the
preallocated output. The extra memory is one noise buffer of at most ``SAMPLE_CHUNK`` keys; nothing is
stacked or copied. On the CPU the noise is one independent stream per sampled key, seeded by one draw
from the RNG per call and filled by several threads (``clcli.noise``: ``randn`` alone runs on one
thread); on an accelerator it is one ``randn`` per run.
Log-densities for DIKI are one triangular solve per key, batched (DIKI spec §7 item 3).

Persistence: a state holds the blocks (no stacked copy); ``state_dict(keys=...)`` / ``select_state``
keep a subset of the keys, ``stub_state`` the header without tensors and ``merge_states`` puts a stub
and its parts back together, so that run checkpoints can store each key's statistics once, in the
checkpoint of the task that finalized it (``clcli.results.RunStore``).

Near-singular covariances (few samples per class: CUB ~30, few-shot 16) get a documented jitter
escalation: if the Cholesky of Σ fails, ``jitter·mean(diag Σ)·I`` is added with jitter growing
×10 from 1e-10 up to 1e-1 until it succeeds; every escalation is logged and recorded.
"""
from __future__ import annotations

import logging
import math

import torch

from clcli import distributed, noise

log = logging.getLogger(__name__)


STATE_KIND = "clcli-gaussian-stats"  # tags a state dict so that checkpoint code can find and split it
SAMPLE_CHUNK = 64  # keys per sampling step at most (noise buffer: 64 x n x D floats; 50 MB at 256 x 768)


TRIANGLE_BLOCKS = 4  # column blocks of ε·Lᵀ in lower_matmul


def lower_matmul(e: torch.Tensor, L: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = e @ L.mT`` for lower-triangular ``L [m, D, D]`` (zeros above the diagonal, as
    ``torch.linalg.cholesky`` returns) and ``e [m, n, D]``, skipping the upper triangle's zero blocks:
    output columns ``c0:c1`` need only ``e[..., :c1]`` (row ``c`` of ``L`` is zero past ``c``), so
    ``TRIANGLE_BLOCKS`` = 4 column blocks do 5/8 of a dense product's work (one process, 2 CPU cores,
    200 classes, n = 256, D = 768: sampling 0.32-0.36 s per epoch instead of 0.44 s). torch has no
    batched triangular matmul (BLAS trmm) to call instead."""
    d = L.shape[-1]
    bounds = [d * i // TRIANGLE_BLOCKS for i in range(TRIANGLE_BLOCKS + 1)]
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        torch.bmm(e[..., :c1], L[:, c0:c1, :c1].transpose(1, 2), out=out[..., c0:c1])
    return out


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
        self._chol: dict[int, torch.Tensor] = {}  # lower factors, views into the blocks below
        self._blocks: list[dict] = []  # keys finalized together: their keys, means, covariances, factors
        self._where: dict[int, tuple[int, int]] = {}  # key -> (block, row)
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
        """Turn pending sums into mean/cov (+ Cholesky) as one block; returns the keys finalized.
        Keys that already have statistics are never recomputed (SLCA: old classes keep theirs)."""
        for k in [k for k in self._n if k in self]:  # pending sums of an old key are dropped, not merged
            log.warning("key %s already has statistics; %d new sample(s) ignored", k, self._n[k])
            del self._n[k], self._s1[k], self._s2[k]
        keys = sorted(self._n)  # in key order: a block's rows are then consecutive labels (long sampling runs)
        if not keys:
            return []
        means = torch.empty(len(keys), self.dim, dtype=torch.float64)
        covs = torch.empty(len(keys), self.dim, self.dim, dtype=self.cov_dtype)
        for i, k in enumerate(keys):
            n, s1, s2 = self._n.pop(k), self._s1.pop(k), self._s2.pop(k)
            if n < 2:
                log.warning("statistics for key %s from %d sample(s): covariance = ridge only", k, n)
            mu = s1 / n
            cov = (s2 - n * torch.outer(mu, mu)) / max(n - 1, 1)
            cov = 0.5 * (cov + cov.T) + self.ridge * torch.eye(self.dim, dtype=torch.float64, device=cov.device)
            means[i], covs[i] = mu.cpu(), cov.cpu()  # cast to cov_dtype on store
        self.add(keys, means, covs)
        return keys

    def add(self, keys: list[int], means: torch.Tensor, covs: torch.Tensor) -> None:
        """Store finalized statistics of ``keys`` as one block: means ``[K, D]`` (kept float64) and
        covariances ``[K, D, D]`` (ridge included; kept in ``cov_dtype`` on the CPU, without a copy
        when they already are), factored by batched float64 Cholesky calls and stored at
        ``cov_dtype``. ``finalize`` and loading go through here; so do benchmarks."""
        covs, means = _own(covs.to(device="cpu", dtype=self.cov_dtype)), _own(means.to(device="cpu", dtype=torch.float64))
        factors = torch.empty_like(covs)
        for a in range(0, len(keys), SAMPLE_CHUNK):  # float64 Cholesky, a bounded chunk at a time
            L, info = torch.linalg.cholesky_ex(covs[a : a + SAMPLE_CHUNK].to(torch.float64))
            factors[a : a + SAMPLE_CHUNK] = L
            for i in torch.nonzero(info).flatten().tolist():
                factors[a + i] = self._factor_with_jitter(int(keys[a + i]), covs[a + i])
        keys = [int(k) for k in keys]
        b = len(self._blocks)
        self._blocks.append({"keys": keys, "mean": means, "cov": covs, "chol": factors})
        for i, k in enumerate(keys):
            self.mean[k], self.cov[k], self._chol[k], self._where[k] = means[i], covs[i], factors[i], (b, i)

    def _factor_with_jitter(self, k: int, cov: torch.Tensor) -> torch.Tensor:
        """Cholesky of ``cov + jitter·mean(diag)·I`` in float64, jitter ×10 from 1e-10 until it
        succeeds (recorded)."""
        cov = cov.to(torch.float64)
        jitter = 1e-10
        scale = float(cov.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(self.dim, dtype=cov.dtype)
        while jitter <= 1e-1:
            L, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            if info.item() == 0:
                self.jitter[k] = jitter * scale
                log.warning("covariance of key %s needed jitter %.1e·mean(diag) to factorize", k, jitter)
                return L
            jitter *= 10
        raise RuntimeError(f"covariance of key {k} is not positive definite even with jitter 1e-1")

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

    def _runs(self, keys: list[int]):
        """(start, block, first row, length): ``keys[start:start+length]`` are consecutive rows of one
        block, at most ``SAMPLE_CHUNK`` of them."""
        start = 0
        while start < len(keys):
            b, r = self._where[keys[start]]
            m = 1
            while (m < SAMPLE_CHUNK and start + m < len(keys)
                   and self._where[keys[start + m]] == (b, r + m)):
                m += 1
            yield start, b, r, m
            start += m

    @torch.no_grad()
    def sample(self, keys: list[int], n: int, mean_scale: torch.Tensor | None = None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples per key from N(μ_k·scale_k, Σ_k): features ``[K·n, D]`` grouped by key and
        the keys ``[K·n]``. Memory: the output plus a noise buffer of at most ``SAMPLE_CHUNK`` keys (and
        on a GPU that many factors at a time). ``out``: the previous call's features, overwritten
        (an epoch loop then reuses one buffer instead of mapping fresh memory every epoch).
        Noise on the CPU: one draw from ``generator`` (global RNG if None) seeds the call, the i-th
        key's noise is stream i of that seed (``clcli.noise``: several threads, the same draws for
        any thread count); on other devices one ``randn`` per run from ``generator``."""
        device = torch.device(device)
        d = self.dim
        mu = torch.stack([self.mean[k] for k in keys]) if keys else torch.zeros(0, d, dtype=torch.float64)
        if mean_scale is not None:
            mu = mu * mean_scale.to(dtype=mu.dtype)[:, None]
        mu = mu.to(device=device, dtype=dtype)
        shape = (len(keys) * n, d)
        reuse = out is not None and out.shape == shape and out.dtype == dtype and out.device == device and out.is_contiguous()
        x = (out if reuse else torch.empty(shape, device=device, dtype=dtype)).view(len(keys), n, d)
        eps = torch.empty(min(len(keys), SAMPLE_CHUNK), n, d, device=device, dtype=dtype)
        seed = noise.draw_seed(generator) if device.type == "cpu" else None
        for start, b, r, m in self._runs(keys):
            e = eps[:m]
            if seed is None:  # on an accelerator randn is parallel already: one call per run
                torch.randn(e.shape, generator=generator, out=e)
            else:  # CPU: one stream per key, filled by several threads (clcli.noise)
                noise.fill_normal(e, seed, first=start)
            L = self._blocks[b]["chol"][r : r + m].to(device=device, dtype=dtype)
            xs = x[start : start + m]
            lower_matmul(e, L, out=xs)  # ε·Lᵀ, then + μ̃ (the reference's order: loc + L·ε)
            xs += mu[start : start + m, None, :]
        labels = torch.tensor(keys, dtype=torch.long, device=device).repeat_interleave(n)
        return x.view(-1, d), labels

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
        """Means, covariances and jitter of ``keys`` (default: every finalized key), as the blocks they
        were finalized in: a block wholly included is the stored tensor itself (no copy). Factors are
        not stored: they are recomputed, identically, on load."""
        wanted = set(self.mean) if keys is None else {int(k) for k in keys} & set(self.mean)
        blocks = [{"keys": blk["keys"], "mean": blk["mean"], "cov": blk["cov"]} for blk in self._blocks]
        for b, blk in enumerate(blocks):  # a key finalized again lives in its newest block only
            blk["rows"] = [i for i, k in enumerate(blk["keys"]) if self._where.get(k) == (b, i)]
        return _select({"kind": STATE_KIND, "dim": self.dim, "ridge": self.ridge, "blocks": blocks,
                        "jitter": {int(k): float(v) for k, v in self.jitter.items()}}, wanted)

    def load_state_dict(self, state: dict) -> None:
        """Load a full state (``state_dict()``, ``merge_states`` of a stub and its parts, or the
        previous format's stacked ``mean``/``cov``); the factors are recomputed, block by block."""
        if state.get("stored_apart"):
            raise ValueError("these statistics were stored apart from the checkpoint (a stub): load the "
                             "checkpoint through clcli.results.RunStore.latest_state(), which merges them back")
        self.dim, self.ridge = int(state["dim"]), float(state["ridge"])
        self.mean, self.cov, self._chol, self._blocks, self._where = {}, {}, {}, [], {}
        self.jitter = {int(k): float(v) for k, v in state.get("jitter", {}).items()}
        blocks = state["blocks"] if "blocks" in state else [state]
        for blk in blocks:
            if len(blk["keys"]):
                self.add(blk["keys"], blk["mean"], blk["cov"])


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns its whole storage, else a compact copy (``torch.save`` of a view writes
    the storage it views)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _select(state: dict, keys: set[int]) -> dict:
    """``state`` (blocks with optional ``rows`` already restricted) reduced to ``keys``: whole blocks
    are kept as they are, partly wanted blocks are cut to the wanted rows (a copy of those rows)."""
    blocks = []
    for blk in state["blocks"]:
        rows = [i for i in blk.get("rows", range(len(blk["keys"]))) if int(blk["keys"][i]) in keys]
        if not rows:
            continue
        if len(rows) == len(blk["keys"]):
            blocks.append({"keys": [int(k) for k in blk["keys"]], "mean": blk["mean"], "cov": blk["cov"]})
        else:
            blocks.append({"keys": [int(blk["keys"][i]) for i in rows], "mean": blk["mean"][rows], "cov": blk["cov"][rows]})
    held = sorted(k for blk in blocks for k in blk["keys"])
    return {"kind": STATE_KIND, "dim": state["dim"], "ridge": state["ridge"], "keys": held, "blocks": blocks,
            "jitter": {int(k): float(v) for k, v in state.get("jitter", {}).items() if int(k) in keys}}


def is_state(obj) -> bool:
    """True for a ``GaussianStats.state_dict()`` (full, partial or stub)."""
    return isinstance(obj, dict) and obj.get("kind") == STATE_KIND


def select_state(state: dict, keys) -> dict:
    """The part of a full state holding only ``keys`` (whole blocks without a copy)."""
    return _select(state, {int(k) for k in keys})


def stub_state(state: dict) -> dict:
    """The header of a state (dim, ridge, every key) without its tensors: what a checkpoint keeps
    when the statistics themselves are stored apart."""
    return {"kind": STATE_KIND, "dim": state["dim"], "ridge": state["ridge"], "keys": list(state["keys"]),
            "stored_apart": True}


def merge_states(stub: dict, parts) -> dict:
    """A full state from a ``stub`` and partial states (an iterable) that together hold every key of
    the stub; a later part wins for a key held twice. The parts' tensors are used as they are (no
    copy). Raises ``KeyError`` naming the keys no part holds."""
    wanted = {int(k) for k in stub["keys"]}
    blocks: list[dict] = []
    owner: dict[int, tuple[int, int]] = {}
    jitter: dict[int, float] = {}
    for part in parts:
        for blk in part["blocks"]:
            b = len(blocks)
            blocks.append(blk)
            for i, k in enumerate(blk["keys"]):
                if int(k) in wanted:
                    owner[int(k)] = (b, i)
        jitter.update({int(k): float(v) for k, v in part.get("jitter", {}).items()})
    missing = sorted(wanted - set(owner))
    if missing:
        raise KeyError(missing)
    for b, blk in enumerate(blocks):
        blk["rows"] = [i for i, k in enumerate(blk["keys"]) if owner.get(int(k)) == (b, i)]
    return _select({"dim": stub["dim"], "ridge": stub["ridge"], "blocks": blocks, "jitter": jitter}, wanted)
