"""What every dataset source provides: labelled image items per split, class names, prompts.

A *source* is one labelled image dataset on disk or in memory (CIFAR-100, a CoOp-split Food101,
scikit-learn's digits, generated images ...). It knows nothing about tasks or class orders: the
scenario builders in :mod:`clcli.data.scenario` cut sources into tasks.

Items are kept lazy (file paths) where the dataset is large, or in memory (PIL images / uint8
arrays) where it is small; :func:`clcli.data.images.load_image` turns any item into an RGB PIL image.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class SplitData:
    """One split of a source: ``items[i]`` is an image (path, PIL image or HxW[xC] uint8 array)
    whose original class id is ``labels[i]`` (0..num_classes-1, the source's own numbering)."""

    items: Sequence[Any]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SplitData:
        idx = np.asarray(indices, dtype=np.int64)
        items = self.items
        if isinstance(items, np.ndarray):
            picked: Sequence[Any] = items[idx]
        else:
            picked = [items[i] for i in idx]
        return SplitData(picked, self.labels[idx])


@dataclass
class SourceInfo:
    """Static facts about a source that can be checked without touching the data."""

    name: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    # Prompt templates with a ``{c}`` placeholder (CLIP methods; the first one is used by DIKI).
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])


@runtime_checkable
class Source(Protocol):
    """A labelled image dataset. ``problems()`` must be cheap (no decoding): it lists what is
    missing (folders, split files) with the layout expected and how to obtain it, so that
    ``clcli validate`` can report it before any weights or images are loaded."""

    info: SourceInfo

    def problems(self) -> list[str]: ...

    def load(self, split: str) -> SplitData:
        """``split`` is ``"train"``, ``"val"`` or ``"test"``; sources without a val split raise
        ``KeyError`` for it."""
        ...
