"""Cache of frozen-backbone image features, in memory or on disk.

A frozen encoder gives an image the same feature at every stage, yet the protocol encodes every test
set again after every task. :class:`FrozenEvalFeatures` encodes each test set once and serves later
evaluations; :meth:`FeatureCache.features` keeps whole datasets on disk (DIKI's Gaussian inputs).

**Exact by construction.** ``engine.evaluate`` names each batch (:class:`~clcli.methods.base.EvalBatch`:
its task and position in the unshuffled loader, this rank's block in a multi-process run), so an
entry holds the features of batch ``j`` of task ``t``'s test set exactly as ``predict`` encoded them
(same images, function, device and autocast state: the same bits). A batch without a position or of
another size is encoded, not stored. A test set's batch 0 opens its entry under the model key below
and replaces one computed by other weights, backbone state or for another dataset object.

**Disk** (``disk``): complete test sets and :meth:`FeatureCache.features` are written atomically to
``directory/<sha256 of the key>.pt``, the key stored inside and compared on load. The key, computed
once per test set and run, covers what changes the bits: the *backbone* (class, name,
``weights_identity``, precision, train mode, ``torch.compile``, a sha256 of the state dict memoised
per tensor version), the *feature function* (:data:`FEATURE_FUNCTIONS`), the *context* (device, GPU
or CPU capability, versions of torch, open_clip, torchvision, numpy, Pillow and its codecs, autocast
dtype, TF32, channels-last, batch size), the *transform* (type, ``repr``) and the *dataset* (name,
split, labels, a sha256 of the items: paths with size and mtime, arrays and images by their bytes;
other items are not stored on disk; this rank's block).

Features are stored as float16 where that is exact (an fp16 backbone's), else float32, and served
as float32. Modes (``method.feature_cache``): ``memory`` (default), ``disk`` (memory plus disk), ``off``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clcli import distributed
from clcli.engine import extract_features
from clcli.results import atomic_torch_save

log = logging.getLogger("clcli")

FORMAT = "clcli-features-v2"
MODES = ("memory", "disk", "off")
# What a cached feature is, by name (part of every key, so the name and the function cannot disagree):
# ``features``: CLIP's L2-normalised ``encode_image`` (DIKI, zero-shot CLIP); ``forward``: the
# backbone's output, e.g. a timm ViT's CLS token after the final norm (SLCA's frozen baseline).
FEATURE_FUNCTIONS: dict[str, Callable] = {
    "features": lambda backbone, x: backbone.features(x),
    "forward": lambda backbone, x: backbone(x),
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def check_feature(feature: str) -> None:
    if feature not in FEATURE_FUNCTIONS:
        raise ValueError(f"feature cache: unknown feature {feature!r} (known: {', '.join(FEATURE_FUNCTIONS)})")


def mode_problems(mode: Any, directory: Any) -> list[str]:
    """What is wrong with ``method.feature_cache`` / ``method.feature_cache_dir`` (empty: fine)."""
    if mode not in MODES:
        return [f"method.feature_cache: expected one of {', '.join(MODES)}, got {mode!r}."]
    if mode == "disk" and not directory:
        return ["method.feature_cache=disk needs method.feature_cache_dir (a folder for the cached features)."]
    return []


def _compact(features: torch.Tensor) -> torch.Tensor:
    """A normal CPU copy of ``features``: float16 where that is exact, else float32."""
    with torch.inference_mode(False):  # usable anywhere later, also outside inference mode
        f = features.detach().to("cpu", torch.float32, copy=True)
        return f.half() if torch.equal(f.half().float(), f) else f


# ---------------------------------------------------------------------------- identities
def _sha_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _sha_array(h, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


def _item_digest(items: Any) -> str | None:
    """sha256 of a split's items (files by path, size and mtime; arrays and images by their bytes),
    or None for a missing file (the loader reports it) or an item of another type."""
    from PIL import Image

    h = hashlib.sha256(f"{type(items).__name__}{len(items)}".encode())
    for item in [items] if isinstance(items, np.ndarray) else items:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            try:
                st = os.stat(path)
            except OSError:
                return None
            h.update(f"p{len(path)}:{path}:{st.st_size}:{st.st_mtime_ns};".encode())
        elif isinstance(item, np.ndarray):
            _sha_array(h, item)
        elif isinstance(item, Image.Image):
            h.update(f"i{item.mode}{item.size}".encode() + item.tobytes())
        else:
            return None
    return h.hexdigest()


def transform_identity(transform: Callable | None) -> str:
    """Type and repr of a transform, without memory addresses (stable across processes)."""
    t = type(transform)
    return _ADDRESS.sub("", f"{t.__module__}.{t.__qualname__}: {transform!r}")


_VERSIONS: dict[str, str] = {}


def _library_versions() -> dict[str, str]:
    """Versions of what decodes, transforms and encodes the images (Pillow and its JPEG/PNG codecs,
    torchvision, open_clip, numpy): another version may give other pixels or features."""
    if not _VERSIONS:
        from PIL import features

        for mod in ("PIL", "torchvision", "open_clip", "numpy"):
            _VERSIONS[mod] = str(getattr(importlib.import_module(mod), "__version__", "unknown"))
        _VERSIONS.update({f"PIL_{codec}": str(features.version(codec)) for codec in ("jpg", "zlib")})
    return dict(_VERSIONS)


def context_identity(device: torch.device, amp_dtype: torch.dtype | None, batch_size: int,
                     channels_last: bool = False) -> dict:
    """Everything about the computation that can change a feature's bits."""
    ctx: dict[str, Any] = {
        "device": device.type, "amp_dtype": str(amp_dtype), "batch_size": int(batch_size),
        "channels_last": bool(channels_last),
        "torch": torch.__version__, "matmul_precision": torch.get_float32_matmul_precision(),
        "machine": platform.machine(),
    }
    ctx.update(_library_versions())
    if device.type == "cuda":
        ctx.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_deterministic=torch.backends.cudnn.deterministic)
    else:
        ctx["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return ctx


def compute_state(images: torch.Tensor) -> tuple[torch.device, torch.dtype | None]:
    """The device of ``images`` and the autocast dtype in force there (None: autocast off)."""
    kind = images.device.type
    return images.device, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def shard_piece(n: int) -> list[int] | None:
    """``[rank, world_size, start, stop]`` of this process's block of an ``n``-item dataset in a
    multi-process run (``clcli.distributed.shard``: what ``engine.evaluate`` iterates), else None."""
    if not distributed.is_active():
        return None
    r, w = distributed.rank(), distributed.world_size()
    return [r, w, *distributed.piece(n, r, w)]


# ---------------------------------------------------------------------------- the cache
class FeatureCache:
    """Keys, disk entries (``directory``, created on first write) and counters of frozen features
    in ``mode`` ``memory`` | ``disk`` | ``off``; :class:`FrozenEvalFeatures` holds the eval batches."""

    def __init__(self, mode: str = "memory", directory: str | os.PathLike | None = None):
        problems = mode_problems(mode, directory)
        if problems:
            raise ValueError(problems[0])
        self.mode = mode
        self.directory = Path(directory) if directory else None
        self.counts: Counter = Counter()  # computed (datasets encoded in full), disk_reads, disk_writes
        self._weights_memo: dict[int, tuple[list, list, str]] = {}

    # ------------------------------------------------------------ keys
    def weights_digest(self, module: torch.nn.Module) -> str:
        """sha256 of a module's whole state (parameters and buffers: names, dtypes, shapes, bytes),
        memoised while every tensor is the same object with the same storage and in-place version."""
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        signature = [(n, id(t), t.data_ptr(), t._version) for n, t in tensors]
        memo = self._weights_memo.get(id(module))
        if memo is None or memo[0] != signature:
            h = hashlib.sha256()
            for n, t in tensors:
                h.update(n.encode())
                _sha_tensor(h, t)
            memo = self._weights_memo[id(module)] = (signature, tensors, h.hexdigest())  # tensors: ids stay unique
        return memo[2]

    def backbone_identity(self, backbone: torch.nn.Module) -> dict:
        t = type(backbone)
        modules = list(backbone.modules())
        return {
            "class": f"{t.__module__}.{t.__qualname__}",
            # train mode changes dropout and batch-norm outputs; a compiled module runs other kernels
            "training": any(m.training for m in modules),
            "compiled": any(getattr(m, "_compiled_call_impl", None) is not None for m in modules),
            "model_name": getattr(backbone, "model_name", None),
            "weights_identity": getattr(backbone, "weights_identity", None),
            "precision": getattr(backbone, "precision", None),
            "state_sha256": self.weights_digest(backbone),
        }

    @staticmethod
    def dataset_identity(dataset) -> dict | None:
        """Length, labels, transform and item digest of an ``ImageDataset`` (None: cannot be fingerprinted)."""
        split = getattr(dataset, "split", None)
        digest = _item_digest(split.items) if hasattr(split, "items") and hasattr(dataset, "labels") else None
        if digest is None:
            return None
        h = hashlib.sha256()
        _sha_array(h, np.asarray(dataset.labels))
        _sha_array(h, np.asarray(split.labels))
        return {"length": len(dataset), "items_sha256": digest, "labels_sha256": h.hexdigest(),
                "transform": transform_identity(getattr(dataset, "transform", None))}

    def model_key(self, backbone, rt, feature: str = "features", state: tuple | None = None) -> dict:
        """The dataset-independent part of a key: what computes the features, and how. ``rt``: the
        ``engine.Runtime`` (eval batch size, layout); ``state``: the (device, autocast dtype) the
        features are computed in, by default ``rt``'s (:func:`compute_state`)."""
        check_feature(feature)
        device, amp_dtype = state if state is not None else (rt.device, rt.amp_dtype)
        return {"format": FORMAT, "feature": feature, "backbone": self.backbone_identity(backbone),
                "context": context_identity(torch.device(device), amp_dtype, rt.eval_batch_size, rt.channels_last)}

    def key(self, backbone, dataset, rt, *, name: str, split: str, feature: str = "features",
            shard: bool = False, state: tuple | None = None) -> dict | None:
        """The full key of a dataset's features, or None when the dataset cannot be fingerprinted.
        ``shard``: only this process's block of the dataset in a multi-process run (:func:`shard_piece`)."""
        data = self.dataset_identity(dataset)
        if data is None:
            return None
        piece = shard_piece(len(dataset)) if shard else None
        rows = data["length"] if piece is None else piece[3] - piece[2]
        return {**self.model_key(backbone, rt, feature, state),
                "dataset": {"name": name, "split": split, **data, "shard": piece, "rows": rows}}

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    # ------------------------------------------------------------ disk
    def load(self, key: dict | None) -> torch.Tensor | None:
        """The features stored under ``key``, or None (not in disk mode, absent, or not trustworthy)."""
        path = None if key is None or self.mode != "disk" else self.directory / f"{self.digest(key)}.pt"
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("format") != FORMAT or json.loads(blob["key"]) != json.loads(json.dumps(key, default=str)):
                log.warning("feature cache: %s holds another key; recomputing", path)
                return None
            if blob["features"].shape[0] != key["dataset"]["rows"]:
                raise ValueError("feature count does not match the dataset length")
        except Exception as exc:  # noqa: BLE001 - a broken cache file is recomputed, never trusted
            log.warning("feature cache: cannot read %s (%s: %s); recomputing", path, type(exc).__name__, exc)
            return None
        self.counts["disk_reads"] += 1
        log.info("feature cache: %s/%s features from %s", key["dataset"]["name"], key["dataset"]["split"], path)
        return blob["features"]

    def save(self, key: dict | None, features: torch.Tensor) -> None:
        """Write ``features`` under ``key``, atomically (disk mode only)."""
        if key is not None and self.mode == "disk":
            blob = {"format": FORMAT, "key": json.dumps(key, sort_keys=True, default=str), "features": features}
            atomic_torch_save(blob, self.directory / f"{self.digest(key)}.pt")
            self.counts["disk_writes"] += 1

    def features(self, backbone, dataset, rt, *, name: str, split: str, feature: str = "features",
                 description: str | None = None) -> torch.Tensor:
        """The frozen features ``[N, D]`` of a whole ``dataset`` (float16 where exact, else float32),
        read from disk or computed with :func:`clcli.engine.extract_features` in batches of
        ``rt.eval_batch_size`` under ``rt.autocast()`` (and written to disk in disk mode)."""
        key = self.key(backbone, dataset, rt, name=name, split=split, feature=feature)
        stored = self.load(key)
        if stored is not None:
            return stored
        chunks = [f for f, _ in extract_features(lambda x: FEATURE_FUNCTIONS[feature](backbone, x), dataset, rt,
                                                 description=description or f"features {name}/{split}")]
        features = _compact(torch.cat(chunks)) if chunks else torch.zeros(0, getattr(backbone, "feature_dim", 0))
        self.counts["computed"] += 1
        self.save(key, features)
        return features


@dataclass
class _TestSet:
    """The cached eval batches of one test set (this rank's block), by batch index."""

    dataset: Any  # the test dataset object the entry belongs to
    model: str  # digest of the model key the features are computed under
    rows: int
    key: dict | None = None  # disk key (disk mode)
    batches: dict[int, torch.Tensor] = field(default_factory=dict)


class FrozenEvalFeatures:
    """Frozen image features of a run's test sets for ``predict``, keyed by the task and batch index
    of the :class:`~clcli.methods.base.EvalBatch` (and the device and autocast state): a test set's
    first evaluation encodes and stores its batches, every later one is served from memory, or from
    the disk entry of an earlier run, bit for bit (module docstring). ``feature`` names the features
    (:data:`FEATURE_FUNCTIONS`)."""

    def __init__(self, cache: FeatureCache, backbone, rt, feature: str = "features"):
        check_feature(feature)
        self.cache, self.backbone, self.rt, self.feature = cache, backbone, rt, feature
        self._sets: dict[tuple, _TestSet] = {}  # by (task index, compute state)
        self.served = 0  # eval batches answered from the cache
        self.encoded = 0  # eval batches encoded (a test set's first evaluation, or the cache did not apply)

    def __call__(self, batch) -> torch.Tensor:
        """float32 features of ``batch.images``."""
        entry, j = self._entry(batch), batch.batch_index
        if entry is not None and j in entry.batches:
            self.served += 1
            return entry.batches[j].to(device=batch.images.device, dtype=torch.float32, copy=True)
        f = FEATURE_FUNCTIONS[self.feature](self.backbone, batch.images).float()
        self.encoded += 1
        if entry is not None:
            entry.batches[j] = _compact(f)
            if len(entry.batches) == -(-entry.rows // self.rt.eval_batch_size):  # the test set is complete
                self.cache.counts["computed"] += 1
                self.cache.save(entry.key, torch.cat([entry.batches[i] for i in range(len(entry.batches))]))
        return f

    def report(self) -> dict:
        """What the cache did this run (results.json): datasets (of this :class:`FeatureCache`) encoded
        in full and read from disk, eval batches served from the cache and encoded."""
        return {"mode": self.cache.mode, "feature": self.feature,
                "datasets_encoded": self.cache.counts["computed"], "disk_reads": self.cache.counts["disk_reads"],
                "batches_served": self.served, "batches_encoded": self.encoded}

    def _entry(self, batch) -> _TestSet | None:
        """The entry ``batch`` is served from or stored in; None where the cache does not apply (off,
        not a loader batch, a size other than that loader batch's)."""
        j, task, bs = batch.batch_index, batch.task, self.rt.eval_batch_size
        if self.cache.mode == "off" or j is None:
            return None
        slot = (task.index, compute_state(batch.images))
        if j == 0:
            self._open(task, slot)
        entry = self._sets.get(slot)
        if entry is None or entry.dataset is not task.test:
            return None
        return entry if batch.images.shape[0] == min(bs, entry.rows - j * bs) else None

    def _open(self, task, slot: tuple) -> None:
        """At the start of a pass over ``task``'s test set: keep its entry if computed by the same
        model (weights, backbone state, context) on the same dataset, else start one (from disk if there)."""
        model = self.cache.digest(self.cache.model_key(self.backbone, self.rt, self.feature, slot[1]))
        old = self._sets.get(slot)
        if old is not None and old.dataset is task.test and old.model == model:
            return
        piece = shard_piece(len(task.test))
        entry = _TestSet(task.test, model, len(task.test) if piece is None else piece[3] - piece[2])
        if self.cache.mode == "disk":
            entry.key = self.cache.key(self.backbone, task.test, self.rt, name=task.name, split="test",
                                       feature=self.feature, shard=True, state=slot[1])
            stored = self.cache.load(entry.key)
            if stored is not None:
                entry.batches = dict(enumerate(stored.split(self.rt.eval_batch_size)))
        self._sets[slot] = entry
