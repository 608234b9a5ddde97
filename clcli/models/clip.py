"""Frozen open_clip CLIP backbone: weights, preprocessing, tokenizer, plain encoders.

Used by DIKI (Tang et al., "Mind the Interference: Retaining Pre-trained Knowledge in Parameter
Efficient Continual Learning of Vision-Language Models", ECCV 2024, arXiv 2407.05342), whose
backbone is OpenAI CLIP ViT-B/16 with QuickGELU, kept fully frozen (docs/diki_mtil_protocol.md#backbone).

What this module guarantees:

- **Fail fast, before any download or build** (docs/diki_mtil_protocol.md#backbone): ``('ViT-B-16', 'openai')``
  without QuickGELU is refused (open_clip >= 3 only *warns* and builds ``nn.GELU`` MLPs, which is
  silently wrong for OpenAI weights); an unknown pretrained tag, a missing ``checkpoint_path`` file or
  an unreachable hub raise :class:`clcli.errors.BackboneError` naming the config key and the fix.
- **One preprocessing for every split** (docs/diki_mtil_protocol.md#preprocessing): ``transform(train)``
  returns open_clip's *val* transform (resize shortest side bicubic, center crop, RGB, ToTensor,
  Normalize) for train too, because DIKI trains without augmentation.
- **Frozen**: every CLIP parameter has ``requires_grad=False`` and the wrapped model stays in eval
  mode whatever ``train()`` is called with.
- ``tiny-clip`` (:func:`register_tiny_clip`) is a 32-px, 3-block, width-64 CLIP with the real
  tokenizer and QuickGELU, randomly initialised: the stand-in for tests and CI.

The embedding and pooling halves of both towers are exposed (:meth:`ClipBackbone.vision_embed`,
:meth:`~ClipBackbone.vision_pool`, :meth:`~ClipBackbone.text_embed`, :meth:`~ClipBackbone.text_pool`)
so that :mod:`clcli.models.residual_attention` can run its own block loop in between and otherwise
reproduce open_clip 3.3's forward exactly.
"""
from __future__ import annotations

import atexit
import difflib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clcli.errors import BackboneError

log = logging.getLogger(__name__)

__all__ = [
    "BackboneError",
    "ClipBackbone",
    "TINY_CLIP_CONFIG",
    "TINY_CLIP_NAME",
    "clip_backbone",
    "eot_positions",
    "register_tiny_clip",
    "truncate_to_eot",
]

TINY_CLIP_NAME = "tiny-clip"
# A CLIP small enough to build in well under a second on CPU, with the same structure as ViT-B/16
# (class token, ln_pre, tok pooling, causal text tower with argmax/EOT pooling, QuickGELU) so that
# the DIKI code paths are exercised exactly as on the real model. Vision heads = width / head_width.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}

_tiny_config_dir: str | None = None


def register_tiny_clip() -> str:
    """Register the ``tiny-clip`` architecture with open_clip (idempotent); returns its name.

    open_clip 3.3's public registry API is ``add_model_config(path)``, which scans a JSON file whose
    *stem* becomes the model name, so the config is written to a per-process temporary directory
    (removed at exit; the registry keeps its in-memory copy). The model has no pretrained tag: build it
    with random initialisation (``ClipBackbone('tiny-clip')``). Its tokenizer is open_clip's
    ``SimpleTokenizer`` (context length 77), which ships with the package and works offline.
    """
    global _tiny_config_dir
    if TINY_CLIP_NAME in open_clip.list_models():
        return TINY_CLIP_NAME
    if _tiny_config_dir is None:
        _tiny_config_dir = tempfile.mkdtemp(prefix="clcli-open_clip-configs-")
        atexit.register(shutil.rmtree, _tiny_config_dir, True)
    path = Path(_tiny_config_dir) / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token in each row of ``tokens`` [N, L].

    With open_clip's CLIP tokenizer the EOT id (49407) is the largest id in the vocabulary, so its
    position is ``argmax`` of the ids; this is also how open_clip pools text features
    (``text_pool_type='argmax'``).
    """
    return tokens.argmax(dim=-1)


def truncate_to_eot(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing padding columns common to all prompts: keep ``max(EOT index) + 1`` tokens.

    Exact up to float rounding for a causal text tower with EOT pooling
    (docs/diki_mtil_protocol.md#text-side-and-logits): the pooled feature of a prompt depends only on
    tokens up to its EOT, and DIKI's residual branch acts on each token independently. The MTIL
    prompts end by position ~25, so this saves ~3x text compute.
    """
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"expected token ids of shape [N, L], got {tuple(tokens.shape)}")
    return tokens[:, : int(eot_positions(tokens).max()) + 1]


def _known_models_hint(model_name: str) -> str:
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
    return f" Close matches: {close}." if close else ""


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP with its preprocessing and tokenizer (docs/diki_mtil_protocol.md#backbone).

    Args:
        model_name: open_clip architecture (config ``backbone.model_name``), e.g.
            ``'ViT-B-16-quickgelu'`` for DIKI, or ``'tiny-clip'`` for tests (registered on demand).
        pretrained: open_clip pretrained *tag* (``backbone.pretrained``), e.g. ``'openai'``; open_clip
            fetches it from the Hugging Face hub (or its cache; set ``HF_HUB_OFFLINE=1`` offline).
        checkpoint_path: a local weights file (``backbone.checkpoint_path``) in any format open_clip's
            ``load_checkpoint`` reads; mutually exclusive with ``pretrained``. The preprocessing is
            then open_clip's default (OpenAI mean/std, bicubic, 'shortest'), right for OpenAI CLIP.
            Whether the file was trained with QuickGELU cannot be checked: name the architecture
            accordingly (``...-quickgelu``) or set ``force_quick_gelu``.
        precision: open_clip precision (``'fp32'``, ``'fp16'``, ``'bf16'``, ...). DIKI's reference is
            pure fp16 (docs/diki_mtil_protocol.md#training); images are cast to the weight dtype in
            :meth:`encode_image`.
        force_quick_gelu: build QuickGELU MLPs whatever the architecture's config says.
        cache_dir: open_clip download cache (``None``: the Hugging Face default, ``HF_HOME``).

    With neither ``pretrained`` nor ``checkpoint_path`` the model is randomly initialised (tests).

    Raises:
        BackboneError: bad combination of options, unknown architecture or tag, QuickGELU mismatch
            with the tag's weights, missing file, or weights that cannot be fetched or loaded.
    """

    @staticmethod
    def config_problems(checkpoint_path=None, pretrained=None, model_name=None, cache_dir=None, **_) -> list[str]:
        """Problems of the backbone's keys found without building it (``clcli validate``): a missing
        weights file, and a pretrained tag whose weights are not in the local cache."""
        from clcli.models.timm_backbone import checkpoint_problems

        problems = checkpoint_problems(checkpoint_path)
        if pretrained and not checkpoint_path and model_name:
            problems += clip_weights_problems(model_name, pretrained, cache_dir)
        return problems

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        precision: str = "fp32",
        force_quick_gelu: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if model_name == TINY_CLIP_NAME:
            register_tiny_clip()
        quick_gelu = _check_request(model_name, pretrained, checkpoint_path, force_quick_gelu)
        source = checkpoint_path or pretrained
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=source,
                precision=precision,
                force_quick_gelu=force_quick_gelu,
                cache_dir=cache_dir,
                require_pretrained=source is not None,
            )
        except Exception as e:  # noqa: BLE001 - every failure here is reported as a config problem
            raise _load_error(model_name, pretrained, checkpoint_path, e) from e

        # Frozen backbone: DIKI trains only its residual pools (docs/diki_mtil_protocol.md#residual-attention).
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.precision = precision
        self.quick_gelu = quick_gelu
        self.context_length = int(getattr(model, "context_length", 77))
        self._tokenizer = open_clip.get_tokenizer(model_name)
        # open_clip's *val* transform for every split: DIKI uses no augmentation
        # (docs/diki_mtil_protocol.md#preprocessing).
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self._transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)

    # ------------------------------------------------------------------ properties
    @property
    def feature_dim(self) -> int:
        """Dimension of the joint image/text embedding (512 for ViT-B/16)."""
        return int(self.model.visual.output_dim)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (fp16 under ``precision='fp16'``); inputs are cast to it."""
        return self.model.visual.conv1.weight.dtype

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint: 100 for OpenAI CLIP, 1/0.07 at random init
        (docs/diki_mtil_protocol.md#text-side-and-logits)."""
        return float(self.model.logit_scale.detach().float().exp())

    def train(self, mode: bool = True) -> ClipBackbone:
        """Module mode flag only: the frozen CLIP itself always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ preprocessing
    def transform(self, train: bool) -> Callable:
        """Image preprocessing for a split: the same deterministic *val* transform for train and test
        (DIKI uses no augmentation, docs/diki_mtil_protocol.md#preprocessing; equals CLIP's standard 224
        transform for ViT-B/16)."""
        return self._transform

    transforms = transform  # alias of transform

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (LongTensor) from open_clip's tokenizer for this model."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts)).long()

    def truncate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """:func:`truncate_to_eot` after checking that this text tower makes it exact (causal mask,
        argmax pooling); returns ``tokens`` unchanged otherwise."""
        m = self.model
        if getattr(m, "text_pool_type", None) != "argmax" or getattr(m, "attn_mask", None) is None:
            return tokens
        return truncate_to_eot(tokens)

    # ------------------------------------------------------------------ plain encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen CLIP image features [N, feature_dim] (open_clip's ``encode_image``), L2-normalised
        by default; these are the features DIKI's Gaussians are fitted on
        (docs/diki_mtil_protocol.md#task-gaussians)."""
        return self.model.encode_image(images.to(self.dtype), normalize=normalize)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone protocol: L2-normalised frozen image features."""
        return self.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen CLIP text features [N, feature_dim]; ``tokens`` may be truncated (L <= 77), in which
        case the positional embedding and causal mask are sliced to L (open_clip itself needs L = 77)."""
        x, mask = self.text_embed(tokens)
        x = self.model.transformer(x, attn_mask=mask)
        x = self.text_pool(x, tokens)
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ tower halves (for DIKI)
    def vision_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class-token + position embedding and ``ln_pre``: tokens [N, 1 + grid², width]."""
        return self.model.visual._embeds(images.to(self.dtype))

    def vision_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` + class-token pooling + ``proj``: [N, L, width] -> [N, feature_dim]."""
        visual = self.model.visual
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def text_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token + position embedding in the weights' dtype, and the causal mask, both sliced to the
        token length L: returns (x [N, L, width], additive mask [L, L] or None)."""
        m = self.model
        n_ctx = tokens.shape[1]
        if n_ctx > m.positional_embedding.shape[0]:
            raise ValueError(f"{n_ctx} tokens exceed the context length {m.positional_embedding.shape[0]}")
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n_ctx].to(cast_dtype)
        mask = m.attn_mask[:n_ctx, :n_ctx] if m.attn_mask is not None else None
        return x, mask

    def text_pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_final`` + EOT pooling + ``text_projection``: [N, L, width] -> [N, feature_dim]."""
        from open_clip.transformer import text_global_pool

        m = self.model
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return x

    def extra_repr(self) -> str:
        src = f"checkpoint_path={self.checkpoint_path!r}" if self.checkpoint_path else f"pretrained={self.pretrained!r}"
        return f"model_name={self.model_name!r}, {src}, precision={self.precision!r}, quick_gelu={self.quick_gelu}"


def _check_request(
    model_name: str, pretrained: str | None, checkpoint_path: str | None, force_quick_gelu: bool
) -> bool | None:
    """Everything that can be checked without downloading or building; returns the final QuickGELU
    setting (None when unknown, for ``hf-hub:``/``local-dir:`` names)."""
    if pretrained and checkpoint_path:
        raise BackboneError(
            f"backbone.pretrained={pretrained!r} and backbone.checkpoint_path={checkpoint_path!r} are both "
            "set: they are two ways to load the same weights. Keep one and set the other to null."
        )
    if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
        raise BackboneError(
            f"backbone.checkpoint_path={checkpoint_path!r} does not exist or is not a file. Expected a "
            f"local open_clip weights file for backbone.model_name={model_name!r} (.pt/.pth/.bin/"
            ".safetensors). Fix the path, or set backbone.checkpoint_path=null and use "
            "backbone.pretrained=<tag> with network access or a pre-filled Hugging Face cache."
        )
    if ":" in model_name:  # 'hf-hub:' / 'local-dir:' schemas: config and weights come from there
        return None
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise BackboneError(
            f"backbone.model_name={model_name!r} is not an open_clip architecture "
            f"(open_clip {open_clip.__version__}).{_known_models_hint(model_name)} "
            "See open_clip.list_models()."
        )
    quick_gelu = bool(model_cfg.get("quick_gelu", False)) or force_quick_gelu
    if pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            hint = (
                " It is a file path: set backbone.checkpoint_path to it (and backbone.pretrained=null)."
                if os.path.isfile(pretrained)
                else ""
            )
            raise BackboneError(
                f"backbone.pretrained={pretrained!r} is not a known pretrained tag for "
                f"backbone.model_name={model_name!r}; known tags: {tags or 'none'}.{hint}"
            )
        tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        if tag_quick_gelu != quick_gelu:
            # open_clip >= 3 only warns here and builds the wrong activation (docs/diki_mtil_protocol.md#backbone).
            if tag_quick_gelu:
                alt = f"{model_name}-quickgelu"
                fix = (f"use backbone.model_name={alt!r} or " if alt in open_clip.list_models() else "") + (
                    "set backbone.force_quick_gelu=true"
                )
            else:
                fix = "use the architecture without '-quickgelu' and backbone.force_quick_gelu=false"
            raise BackboneError(
                f"backbone.model_name={model_name!r} with backbone.pretrained={pretrained!r} would build "
                f"{'QuickGELU' if quick_gelu else 'GELU'} MLPs, but these weights were trained with "
                f"{'QuickGELU' if tag_quick_gelu else 'GELU'}: the features would be silently wrong "
                f"(open_clip only warns). Fix: {fix}."
            )
    return quick_gelu


def clip_weights_problems(model_name: str, pretrained: str, cache_dir: str | None = None) -> list[str]:
    """Whether the weights of open_clip's tag ``pretrained`` are available offline, where
    ``open_clip.create_model`` looks (``open_clip.pretrained.download_pretrained``): the tag's
    ``file``, else its hub repo ``hf_hub`` (``org/name/[file]``, default file
    ``open_clip_pytorch_model.bin``) in the Hugging Face cache (``cache_dir`` when set), else its
    ``url`` in ``cache_dir`` or ``~/.cache/clip``. An unknown tag is the constructor's error."""
    from clcli.models.timm_backbone import hub_weight_files, hub_weights_problem

    if ":" in model_name:  # 'hf-hub:' / 'local-dir:' schemas: not a tag of open_clip's table
        return []
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    what = f"backbone.pretrained={pretrained!r} (open_clip {model_name!r})"
    hint = "backbone.checkpoint_path=<weights file> and backbone.pretrained=null"
    if not cfg:
        return []
    if cfg.get("file"):
        return [] if os.path.isfile(cfg["file"]) else [f"{what}: the tag's file '{cfg['file']}' does not exist; "
                                                       f"set {hint}."]
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        repo, filename = os.path.split(cfg["hf_hub"])
        return hub_weights_problem(what, repo, hub_weight_files(filename or "open_clip_pytorch_model.bin", (".bin", ".pth")),
                                   cache_dir, hint)
    if cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if target.is_file():
            return []
        return [f"{what}: the weights '{target}' are not cached and the run would download them from {cfg['url']}, which "
                f"fails without network access. Fix: download that URL into '{target.parent}' where the network is "
                f"reachable and copy it here, or set {hint}."]
    return []


def _load_error(model_name: str, pretrained: str | None, checkpoint_path: str | None, err: Exception) -> BackboneError:
    """A user-facing error for a failed ``open_clip.create_model`` (download or state-dict load)."""
    if checkpoint_path:
        return BackboneError(
            f"Could not load backbone.checkpoint_path={checkpoint_path!r} into backbone.model_name="
            f"{model_name!r}: {type(err).__name__}: {err}. Expected an open_clip/OpenAI CLIP weights file "
            "for exactly this architecture (check the model name, e.g. ViT-B-16-quickgelu for OpenAI "
            "ViT-B/16)."
        )
    if pretrained:
        return BackboneError(
            f"Could not fetch or load the weights for backbone.pretrained={pretrained!r} "
            f"(backbone.model_name={model_name!r}): {type(err).__name__}: {err}. The model hub is "
            "probably unreachable from this machine. Fix: on a machine with network run "
            f"`python -c \"import open_clip; open_clip.create_model({model_name!r}, pretrained={pretrained!r})\"` "
            "and copy its Hugging Face cache (HF_HOME) here with HF_HUB_OFFLINE=1, or download the "
            "weights file and set backbone.checkpoint_path=<file> and backbone.pretrained=null."
        )
    return BackboneError(f"Could not build backbone.model_name={model_name!r}: {type(err).__name__}: {err}")


def clip_backbone(**kwargs) -> ClipBackbone:
    """Build a :class:`~clcli.models.clip.ClipBackbone` from a backbone config (its keys are
    ``ClipBackbone``'s arguments: the return annotation tells ``check_config`` so) and record its
    ``weights_identity`` (architecture, tag or file, open_clip version) for results.json's provenance."""
    bb = ClipBackbone(**kwargs)
    identity = {"model_name": bb.model_name, "open_clip": open_clip.__version__, "precision": bb.precision,
                "quick_gelu": bb.quick_gelu}
    if bb.checkpoint_path:
        from clcli.models.timm_backbone import file_sha256

        identity.update(file=str(bb.checkpoint_path), sha256=file_sha256(bb.checkpoint_path))
    else:
        identity["pretrained_tag"] = bb.pretrained  # None = random initialisation (tiny_clip)
    bb.weights_identity = identity
    return bb
