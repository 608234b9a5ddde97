"""Cache of frozen-backbone image features, in memory or on disk (DIKI spec ``diki_mtil.md`` §7 item 4).

A frozen encoder gives every image the same feature at every stage of a continual run, yet DIKI
re-encodes each test set in all T evaluation sweeps (T x T frozen passes for T datasets). The cache
stores the features of a whole dataset once, in dataset order, and serves them afterwards.

**No stale entry is possible**: an entry's key (:meth:`FeatureCache.key`) covers everything that
changes the features bit for bit:

- *backbone*: class, ``model_name``, ``weights_identity`` (tag or file sha256), precision, train
  or eval mode, whether a module is ``torch.compile``-d (``perf.compile``: other kernels), and a
  sha256 of the whole state dict (names, dtypes, shapes, bytes). The digest is memoised per tensor
  object, ``data_ptr`` and in-place ``_version``, so a weight changed in place or replaced re-hashes;
- *feature function* (:data:`FEATURE_FUNCTIONS`: ``"features"`` = CLIP's L2-normalised
  ``encode_image``, ``"forward"`` = the backbone's output);
- *compute context*: device type (GPU name, CPU kernel capability), the versions of torch, open_clip,
  torchvision, numpy, Pillow and its codecs, autocast dtype, TF32 / matmul-precision flags, the
  channels-last layout of the image batches (``perf.channels_last``: other convolution kernels), and
  the **batch size**: features are computed in
  the loader batches of ``batch_size`` (``engine.extract_features``), and a batch of other size or
  composition may round differently, so entries are only ever served for exactly those batches;
- *transform*: type and ``repr`` (memory addresses removed, so keys are stable across processes);
- *dataset*: name, split, length, the global labels and a sha256 of the items (paths with file
  size and mtime, in-memory arrays and images by their bytes); unknown item types are not cached.

Entries built with ``hashes=True`` also keep two 64-bit hashes of every transformed input image
(:func:`image_hashes`, a random linear hash of the raw bits, exact integer arithmetic): an eval
batch is served only when it is *exactly* one of the dataset's loader batches — same size, same
images in the same order — so a wrong or reordered batch can never receive another batch's
features; it is computed instead (:meth:`CachedFeatures.lookup` returns ``None``).

Modes (``method.feature_cache``): ``memory`` (default; entries live on CPU for the process),
``disk`` (also written to ``directory/<sha256 of the key>.pt``, atomically, the key stored inside
and compared on load) and ``off``. Features are stored as float16 when that round-trips exactly
(an fp16 backbone's features), else float32, and are served as float32.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

log = logging.getLogger("clcli")

FORMAT = "clcli-features-v1"
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


# ---------------------------------------------------------------------------- image hashes
_HASH_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _hash_weights(numel: int, device: torch.device) -> torch.Tensor:
    """Two fixed pseudo-random int64 weight rows ``[2, numel]`` (seeded: the same in every process)."""
    key = (numel, str(device))
    if key not in _HASH_WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED_F00D)
        hi = torch.randint(0, 2**31, (2, numel), generator=g, dtype=torch.int64)
        lo = torch.randint(0, 2**32, (2, numel), generator=g, dtype=torch.int64)
        _HASH_WEIGHTS[key] = ((hi << 32) | lo | 1).to(device)  # odd 63-bit weights
    return _HASH_WEIGHTS[key]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def image_hashes(images: torch.Tensor) -> torch.Tensor:
    """Per-sample hashes ``[B, 2]`` (int64, on CPU) of the exact bits of ``images [B, ...]``.

    h_k(x) = Σ_i w_ki · bits_i (mod 2⁶⁴) with fixed random odd weights: integer arithmetic, so the
    result is exact and independent of the reduction order; two different inputs collide with
    probability at most ~2⁻³² per hash for any fixed pair, two independent hashes per sample."""
    x = images.detach().contiguous()
    b = x.shape[0]
    bits = x.view(_BITS[x.element_size()]).reshape(b, -1).to(torch.int64)
    w = _hash_weights(bits.shape[1], bits.device)
    return torch.stack([(bits * w[k]).sum(1) for k in range(2)], dim=1).cpu()


def image_spec(images: torch.Tensor) -> list:
    """What a sample looks like (dtype, shape): a batch of another kind never matches an entry."""
    return [str(images.dtype), list(images.shape[1:])]


# ---------------------------------------------------------------------------- entries
@dataclass
class CachedFeatures:
    """Features ``[N, D]`` of a dataset in loader order, computed in batches of ``batch_size``;
    with ``hashes`` [N, 2] of the input images when built for eval lookups."""

    features: torch.Tensor
    batch_size: int
    hashes: torch.Tensor | None = None
    spec: list | None = None
    served: int = 0  # batches served by lookup()
    missed: int = 0  # lookups that matched no batch
    _index: dict | None = field(default=None, repr=False)
    _next: int = field(default=0, repr=False)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def _rows(self, j: int) -> slice:
        return slice(j * self.batch_size, min((j + 1) * self.batch_size, len(self)))

    def batches(self, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """float32 feature batches, exactly as ``engine.extract_features`` yields them."""
        for j in range(self.num_batches):
            yield self.features[self._rows(j)].to(device=device, dtype=torch.float32, copy=True)

    def lookup(self, images: torch.Tensor) -> torch.Tensor | None:
        """The float32 features of ``images`` (on their device) if ``images`` is exactly one of the
        dataset's loader batches (same size, same image bits in the same order), else ``None``."""
        f = self.match(images)
        if f is None:
            self.missed += 1
        return f

    def match(self, images: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor | None:
        """:meth:`lookup` without counting a miss; ``h``: ``image_hashes(images)`` if already known
        (one hash serves a search over several entries)."""
        if self.hashes is None or self.spec != image_spec(images):
            return None
        h = image_hashes(images) if h is None else h
        if self._index is None:
            self._index = {}
            for j in range(self.num_batches):
                self._index.setdefault(tuple(self.hashes[j * self.batch_size].tolist()), []).append(j)
        order = [self._next] if self._next < self.num_batches else []  # in-order evaluation: try next first
        order += self._index.get(tuple(h[0].tolist()), [])
        for j in order:
            rows = self._rows(j)
            if rows.stop - rows.start == h.shape[0] and torch.equal(self.hashes[rows], h):
                self._next = (j + 1) % self.num_batches
                self.served += 1
                return self.features[rows].to(device=images.device, dtype=torch.float32, copy=True)
        return None


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
    """sha256 of a split's items, or None for an item type that cannot be fingerprinted."""
    h = hashlib.sha256()
    if isinstance(items, np.ndarray):
        h.update(b"array")
        _sha_array(h, items)
        return h.hexdigest()
    from PIL import Image

    h.update(f"seq{len(items)}".encode())
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            try:
                st = os.stat(path)
            except OSError:
                return None  # missing file: the loader reports it; nothing to cache
            h.update(f"p{len(path)}:{path}:{st.st_size}:{st.st_mtime_ns};".encode())
        elif isinstance(item, np.ndarray):
            h.update(b"a")
            _sha_array(h, item)
        elif isinstance(item, Image.Image):
            h.update(f"i{item.mode}{item.size}".encode())
            h.update(item.tobytes())
        else:
            return None
    return h.hexdigest()


def transform_identity(transform: Callable | None) -> str:
    """Type and repr of a transform, without memory addresses (stable across processes)."""
    if transform is None:
        return "None"
    t = type(transform)
    return _ADDRESS.sub("", f"{t.__module__}.{t.__qualname__}: {transform!r}")


_VERSIONS: dict[str, str] = {}


def _library_versions() -> dict[str, str]:
    """Versions of what decodes, transforms and encodes the images (Pillow and its JPEG/PNG codecs,
    torchvision, open_clip, numpy): another version may give other pixels or features."""
    if not _VERSIONS:
        import importlib

        for mod in ("PIL", "torchvision", "open_clip", "numpy"):
            try:
                _VERSIONS[mod] = str(importlib.import_module(mod).__version__)
            except (ImportError, AttributeError):  # pragma: no cover
                _VERSIONS[mod] = "absent"
        try:
            from PIL import features

            for codec in ("jpg", "zlib"):
                _VERSIONS[f"PIL_{codec}"] = str(features.version(codec))
        except Exception:  # noqa: BLE001 - older Pillow has no codec query
            _VERSIONS["PIL_codecs"] = "unknown"  # the Pillow version then stands for its codecs
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


def autocast_matches(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether the current autocast state on ``device`` is the one ``amp_dtype`` describes (None =
    autocast off), i.e. the state cached features were computed under."""
    enabled = torch.is_autocast_enabled(device.type)
    if amp_dtype is None:
        return not enabled
    return enabled and torch.get_autocast_dtype(device.type) == amp_dtype


def shard_piece(n: int) -> list[int] | None:
    """``[rank, world_size, start, stop]`` of this process's block of an ``n``-item dataset in a
    multi-process run (``clcli.distributed.shard``: what ``engine.evaluate`` iterates), else None."""
    try:
        from clcli import distributed
    except ImportError:  # pragma: no cover - single-process code base
        return None
    if not distributed.is_active():
        return None
    r, w = distributed.rank(), distributed.world_size()
    return [r, w, *distributed.piece(n, r, w)]


def same_device(a: torch.device, b: torch.device) -> bool:
    def norm(d: torch.device):
        if d.type == "cuda" and d.index is None:
            return ("cuda", torch.cuda.current_device())
        return (d.type, d.index or 0)

    return norm(torch.device(a)) == norm(torch.device(b))


# ---------------------------------------------------------------------------- the cache
class FeatureCache:
    """Frozen image features per (backbone, feature, context, transform, dataset) key.

    Args:
        mode: ``memory`` | ``disk`` | ``off`` (see the module docstring).
        directory: folder of the disk entries (``disk`` only; created on first write).
    """

    def __init__(self, mode: str = "memory", directory: str | os.PathLike | None = None):
        if mode not in MODES:
            raise ValueError(f"feature cache mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "disk" and not directory:
            raise ValueError("feature cache mode 'disk' needs a directory")
        self.mode = mode
        self.directory = Path(directory) if directory else None
        self.counts: Counter = Counter()  # computed, memory_hits, disk_reads, disk_writes
        self._memory: dict[str, CachedFeatures] = {}
        self._weights_memo: dict[int, tuple[list, str]] = {}
        self._data_memo: "weakref.WeakKeyDictionary[Any, tuple[tuple, dict | None]]" = weakref.WeakKeyDictionary()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # ------------------------------------------------------------ keys
    def weights_digest(self, module: torch.nn.Module) -> str:
        """sha256 of a module's whole state (parameters and buffers: names, dtypes, shapes, bytes),
        memoised while every tensor is the same object with the same storage and in-place version."""
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        signature = [(n, t, t.data_ptr(), t._version) for n, t in tensors]
        memo = self._weights_memo.get(id(module))
        if memo is not None and len(memo[0]) == len(signature) and all(
            a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(memo[0], signature)
        ):
            return memo[1]
        h = hashlib.sha256()
        for n, t in tensors:
            h.update(n.encode())
            _sha_tensor(h, t)
        digest = h.hexdigest()
        self._weights_memo[id(module)] = (signature, digest)  # holds the tensors: ids stay unique
        return digest

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

    def dataset_identity(self, dataset) -> dict | None:
        """Length, labels and item digest of an ``ImageDataset`` (None: cannot be fingerprinted).
        Memoised per dataset object while its split, items, labels and transform are the same
        objects (datasets are immutable once built; eval lookups also check every image's bits)."""
        split = getattr(dataset, "split", None)
        if split is None or not hasattr(split, "items") or not hasattr(dataset, "labels"):
            return None
        signature = (id(split), id(split.items), id(split.labels), id(dataset.labels),
                     id(getattr(dataset, "transform", None)), len(dataset))
        try:
            memo = self._data_memo.get(dataset)
        except TypeError:  # not weak-referenceable
            memo = None
        if memo is not None and memo[0] == signature:
            return memo[1]
        digest = _item_digest(split.items)
        ident = None
        if digest is not None:
            h = hashlib.sha256()
            _sha_array(h, np.asarray(dataset.labels))
            _sha_array(h, np.asarray(split.labels))
            ident = {"length": len(dataset), "items_sha256": digest, "labels_sha256": h.hexdigest(),
                     "transform": transform_identity(getattr(dataset, "transform", None))}
        try:
            self._data_memo[dataset] = (signature, ident)
        except TypeError:  # an unhashable dataset is simply not memoized: the identity is recomputed
            return ident
        return ident

    def model_key(self, backbone, *, device: torch.device, amp_dtype: torch.dtype | None, batch_size: int,
                  feature: str = "features", channels_last: bool = False) -> dict:
        """The dataset-independent part of a key: what computes the features, and how."""
        check_feature(feature)
        return {"format": FORMAT, "feature": feature, "backbone": self.backbone_identity(backbone),
                "context": context_identity(torch.device(device), amp_dtype, batch_size, channels_last)}

    def key(self, backbone, dataset, *, name: str, split: str, device: torch.device,
            amp_dtype: torch.dtype | None, batch_size: int, feature: str = "features",
            shard: bool = False, channels_last: bool = False, model: dict | None = None) -> dict | None:
        """The full key of a dataset's features, or None when the dataset cannot be fingerprinted.
        ``shard``: only this process's block of the dataset in a multi-process run (:func:`shard_piece`).
        ``model``: :meth:`model_key` of the same arguments, when already computed (one serves the
        keys of several datasets)."""
        data = self.dataset_identity(dataset)
        if data is None:
            return None
        if model is None:
            model = self.model_key(backbone, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                   feature=feature, channels_last=channels_last)
        piece = shard_piece(len(dataset)) if shard else None
        rows = data["length"] if piece is None else piece[3] - piece[2]
        return {**model, "dataset": {"name": name, "split": split, **data, "shard": piece, "rows": rows}}

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: dict) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.digest(key)}.pt"

    # ------------------------------------------------------------ get / put
    def get(self, key: dict | None, keep_in_memory: bool = True) -> CachedFeatures | None:
        if key is None or not self.enabled:
            return None
        d = self.digest(key)
        if d in self._memory:
            self.counts["memory_hits"] += 1
            return self._memory[d]
        if self.mode != "disk":
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            stored = json.loads(blob["key"])
            if blob.get("format") != FORMAT or stored != json.loads(json.dumps(key, sort_keys=True, default=str)):
                log.warning("feature cache: %s holds another key; recomputing", path)
                return None
            entry = CachedFeatures(blob["features"], int(blob["batch_size"]), blob.get("hashes"),
                                   json.loads(blob["spec"]) if blob.get("spec") else None)
            if entry.hashes is not None and entry.hashes.shape != (len(entry), 2):
                raise ValueError("hashes do not match the features")
            if len(entry) != key["dataset"]["rows"]:
                raise ValueError("feature count does not match the dataset length")
        except Exception as exc:  # noqa: BLE001 - a broken cache file is recomputed, never trusted
            log.warning("feature cache: cannot read %s (%s: %s); recomputing", path, type(exc).__name__, exc)
            return None
        self.counts["disk_reads"] += 1
        log.info("feature cache: %s/%s features from %s", key["dataset"]["name"], key["dataset"]["split"], path)
        if keep_in_memory:
            self._memory[d] = entry
        return entry

    def put(self, key: dict | None, entry: CachedFeatures, keep_in_memory: bool = True) -> None:
        if key is None or not self.enabled:
            return
        if keep_in_memory:
            self._memory[self.digest(key)] = entry
        if self.mode == "disk":
            path = self.path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = {"format": FORMAT, "key": json.dumps(key, sort_keys=True, default=str),
                    "features": entry.features, "batch_size": entry.batch_size, "hashes": entry.hashes,
                    "spec": json.dumps(entry.spec) if entry.spec is not None else None}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
            os.close(fd)
            try:
                torch.save(blob, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.counts["disk_writes"] += 1

    def entries(self) -> list[CachedFeatures]:
        """The in-memory entries (their ``served``/``missed`` counters tell how lookups went)."""
        return list(self._memory.values())

    def clear(self) -> None:
        """Forget the in-memory entries (disk entries stay)."""
        self._memory.clear()

    # ------------------------------------------------------------ get or compute
    def features(self, backbone, dataset, rt, *, name: str, split: str, hashes: bool = True,
                 keep_in_memory: bool = True, description: str | None = None,
                 key: dict | None = None, shard: bool = False, feature: str = "features") -> CachedFeatures:
        """The frozen features of ``dataset`` (``feature``, a name of :data:`FEATURE_FUNCTIONS`;
        default CLIP's L2-normalised ``backbone.features``), from the cache or computed with
        :func:`clcli.engine.extract_features` (batches of ``rt.eval_batch_size``, under
        ``rt.autocast()``) and stored. ``hashes``: also record every input image's hashes
        (needed for :meth:`CachedFeatures.lookup`); an entry without them is recomputed if asked.
        ``shard``: this process's block only in a multi-process run (as ``engine.evaluate`` reads it);
        pass the same ``shard`` to :meth:`key` when giving ``key``."""
        from clcli.engine import extract_features

        if key is None:
            key = self.key(backbone, dataset, name=name, split=split, device=rt.device,
                           amp_dtype=rt.amp_dtype, batch_size=rt.eval_batch_size, shard=shard, feature=feature,
                           channels_last=rt.channels_last)
        elif key["feature"] != feature:
            raise ValueError(f"feature cache: key of feature {key['feature']!r} given for feature {feature!r}")
        encode = FEATURE_FUNCTIONS[feature]
        entry = self.get(key, keep_in_memory)
        if entry is not None and (entry.hashes is not None or not hashes):
            return entry
        recorded: list[torch.Tensor] = []
        spec: list = []

        def fn(x: torch.Tensor) -> torch.Tensor:
            if hashes:
                recorded.append(image_hashes(x))
                spec[:] = [image_spec(x)]
            return encode(backbone, x)

        sharded = {"shard": True} if shard and shard_piece(len(dataset)) is not None else {}
        chunks = [f.cpu() for f, _ in extract_features(fn, dataset, rt, description=description or f"features {name}/{split}",
                                                       **sharded)]
        with torch.inference_mode(False):  # normal tensors: usable anywhere later
            feats = torch.cat(chunks).clone() if chunks else torch.zeros(0, getattr(backbone, "feature_dim", 0))
            if feats.dtype == torch.float32 and torch.equal(feats.half().float(), feats):
                feats = feats.half()  # exact: an fp16 backbone's features
            h = torch.cat(recorded).clone() if recorded else None
        entry = CachedFeatures(feats, int(rt.eval_batch_size), h, spec[0] if spec else None)
        self.counts["computed"] += 1
        if key is not None and self.enabled:
            log.info("feature cache: computed %d %s/%s features", len(entry), name, split)
        self.put(key, entry, keep_in_memory)
        return entry


class FrozenEvalFeatures:
    """Frozen image features of a scenario's test sets for ``predict``: each test set is encoded once
    per run (memory) or read back from disk, then served batch by batch (DIKI spec §7 item 4; SLCA's
    frozen-backbone baseline).

    A batch gets cached features only when it is exactly one of the test set's loader batches
    (``engine.evaluate``: unshuffled, ``eval.batch_size``, same device and autocast; checked by image
    hashes), so the result is bit-identical to encoding it; anything else is encoded as usual.
    ``feature`` names the features (:data:`FEATURE_FUNCTIONS`: ``features`` = CLIP's L2-normalised
    image features, ``forward`` = the backbone's output); ``tasks`` is set from the scenario
    (``prepare_scenario``). Two ways to ask:

    - ``frozen(images, dataset)``: the batch comes from task ``dataset``'s test set (MTIL, where the
      candidates name the dataset);
    - ``frozen.among(images, candidates)``: from the test set of any task whose labels lie within
      ``candidates`` (class-incremental evaluation over all seen classes, where the task under
      evaluation is not named; the image hashes find it).
    """

    def __init__(self, cache: FeatureCache, backbone, rt, feature: str = "features"):
        check_feature(feature)
        self.cache, self.backbone, self.rt, self.feature = cache, backbone, rt, feature
        self.tasks: list = []
        self.served = 0  # eval batches answered from an entry
        self.encoded = 0  # eval batches encoded: no entry applied, or none matched the batch

    def __call__(self, images: torch.Tensor, dataset: int) -> torch.Tensor:
        """float32 features of an eval batch of task ``dataset``'s test set."""
        entry = self._entry(images, dataset)
        if entry is not None:
            f = entry.lookup(images)
            if f is not None:
                self.served += 1
                return f
        return self._encode(images)

    def among(self, images: torch.Tensor, candidates: range) -> torch.Tensor:
        """float32 features of an eval batch of the test set of a task whose labels lie within
        ``candidates``. Missing entries of those test sets are filled when a batch of first-batch size
        (``min(eval.batch_size, test set size)``) arrives, i.e. on the first batch of an evaluation."""
        model = self._model_key(images)  # once per batch: the same for every candidate test set
        entries = [] if model is None else [self._entry(images, t.index, model) for t in self.tasks
                                            if candidates.start <= t.labels.start and t.labels.stop <= candidates.stop]
        entries = [e for e in entries if e is not None]
        if entries:
            h = image_hashes(images)
            for entry in entries:
                f = entry.match(images, h)
                if f is not None:
                    self.served += 1
                    return f
            entries[0].missed += 1  # one miss per batch, booked on the first candidate entry
        return self._encode(images)

    def report(self) -> dict:
        """What the cache did this run (for results.json): datasets encoded and read from disk (this
        cache's, test sets and any others it holds), and eval batches served from entries or
        encoded (no entry applied — cache off, another device or autocast state, a dataset that
        cannot be fingerprinted — or none matched the batch)."""
        return {"mode": self.cache.mode, "feature": self.feature,
                "datasets_encoded": self.cache.counts["computed"], "disk_reads": self.cache.counts["disk_reads"],
                "batches_served": self.served, "batches_encoded": self.encoded}

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return FEATURE_FUNCTIONS[self.feature](self.backbone, images).float()

    def _model_key(self, images: torch.Tensor) -> dict | None:
        """:meth:`FeatureCache.model_key` of the run's eval context, or None where the cache cannot
        apply (cache off, or ``images`` on another device or under another autocast state than the
        one the entries are computed in: ``engine.evaluate``'s)."""
        rt = self.rt
        if not self.cache.enabled or not same_device(images.device, rt.device) \
                or not autocast_matches(images.device, rt.amp_dtype):
            return None
        return self.cache.model_key(self.backbone, device=rt.device, amp_dtype=rt.amp_dtype,
                                    batch_size=rt.eval_batch_size, feature=self.feature, channels_last=rt.channels_last)

    def _entry(self, images: torch.Tensor, dataset: int, model: dict | None = None) -> CachedFeatures | None:
        """The cache entry of ``dataset``'s test set, filled on the first batch of a full-size pass;
        None where the cache cannot apply. ``model``: ``self._model_key(images)`` if already known."""
        if not 0 <= dataset < len(self.tasks):
            return None
        model = self._model_key(images) if model is None else model
        if model is None:
            return None
        rt, task = self.rt, self.tasks[dataset]
        # shard: in a multi-process run engine.evaluate reads this process's block of the test set
        key = self.cache.key(self.backbone, task.test, name=task.name, split="test", device=rt.device,
                             amp_dtype=rt.amp_dtype, batch_size=rt.eval_batch_size, shard=True, model=model)
        if key is None:
            return None
        entry = self.cache.get(key)
        if entry is None and images.shape[0] == min(rt.eval_batch_size, key["dataset"]["rows"]):  # a first batch?
            entry = self.cache.features(self.backbone, task.test, rt, name=task.name, split="test", key=key,
                                        shard=True, feature=self.feature, description=f"frozen features {task.name}")
        return entry
