"""Does a backbone *config* build a timm VisionTransformer? Answered from timm's model registry,
before any weights or modules are built, so that ``clcli validate`` refuses a method that needs a
ViT (the prompt methods, SLCA++'s LoRA on ``qkv``) on a CNN such as the offline default
EfficientNet-Lite0 (docs/prompt_baselines.md#backbone-and-query).

The registry maps every model name to the timm module that defines it; the modules below build
``timm.models.vision_transformer.VisionTransformer`` (or a subclass) for every name they register.
Finer requirements (a class token, token pooling, the prefixed blocks) depend on ``model_kwargs``
and are checked on the built model (:func:`clcli.models.prompting.vit_problems`).
"""
from __future__ import annotations

VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")
VIT_BACKBONES = "backbone=vit_b16_in21k, vit_b16_mocov3, offline_vit or tiny_vit"


def timm_module(model_name: str) -> str | None:
    """The timm module that registers ``model_name`` (a pretrained tag such as ``.augreg_in21k`` is
    allowed), e.g. ``efficientnet``; None for a name timm does not know."""
    import timm.models

    if not timm.models.is_model(model_name):
        return None
    return timm.models.model_entrypoint(model_name).__module__.rpartition(".")[2]


def vit_config_problems(method: str, what: str, backbone_class=None, backbone_cfg=None) -> list[str]:
    """``[problem]`` when the backbone is not a timm ViT: its class (``backbone_class``, the class the
    ``backbone`` config builds) is not :class:`~clcli.models.timm_backbone.TimmBackbone`, or its
    ``backbone_cfg.model_name`` is a registered timm model outside :data:`VIT_MODULES`. ``method``
    and ``what`` (why it needs a ViT) go into the message. An unknown model name is left to the
    backbone (building it fails with timm's own error)."""
    from clcli.models.timm_backbone import TimmBackbone

    if backbone_class is not None and not (isinstance(backbone_class, type) and issubclass(backbone_class, TimmBackbone)):
        return [f"backbone: method={method} {what} a timm ViT ({VIT_BACKBONES}); got "
                f"{getattr(backbone_class, '__name__', backbone_class)}. Choose one with {VIT_BACKBONES}."]
    name = (backbone_cfg or {}).get("model_name")
    module = timm_module(name) if isinstance(name, str) else None
    if module is None or module in VIT_MODULES:
        return []
    return [f"backbone.model_name: method={method} {what} a timm VisionTransformer, but '{name}' is an "
            f"'{module}' model, not a ViT. Choose a ViT backbone: {VIT_BACKBONES} (tiny_vit for a quick CPU run)."]
