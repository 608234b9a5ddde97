"""Backbones (open_clip CLIP wrapper) and DIKI's residual attention.

- :mod:`clcli.models.clip`: :class:`~clcli.models.clip.ClipBackbone`, a frozen open_clip CLIP that
  owns its preprocessing and tokenizer, plus the ``tiny-clip`` stand-in used by the tests.
- :mod:`clcli.models.residual_attention`: :class:`~clcli.models.residual_attention.DikiClip`, DIKI's
  interference-free residual attention (Tang et al., ECCV 2024, arXiv 2407.05342) on top of it.
"""
