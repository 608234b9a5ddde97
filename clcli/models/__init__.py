"""Backbones, heads, and DIKI's residual attention.

CLIP side (the rest of the package holds the timm backbones and classifier heads):

- :mod:`clcli.models.clip`: :class:`~clcli.models.clip.ClipBackbone`, a frozen open_clip CLIP that
  owns its preprocessing and tokenizer, its config factory :func:`~clcli.models.clip.clip_backbone`
  (the ``_target_`` of ``conf/backbone/{clip_vit_b16,tiny_clip}.yaml``), plus the ``tiny-clip``
  stand-in used by the tests.
- :mod:`clcli.models.residual_attention`: :class:`~clcli.models.residual_attention.DikiClip`, DIKI's
  interference-free residual attention (Tang et al., ECCV 2024, arXiv 2407.05342) on top of it.
"""
