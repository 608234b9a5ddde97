"""Turning dataset items (paths, PIL images, uint8 arrays) into RGB images, with file names in errors."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from clcli.data.base import SplitData
from clcli.errors import DataError


def load_image(item: Any) -> Image.Image:
    """Return ``item`` as an RGB PIL image (grey arrays/images are replicated to 3 channels)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    try:
        with Image.open(item) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types; the user needs the file name
        raise DataError(
            f"Cannot read image file '{item}': {exc}. Remove or replace the file, "
            "or re-run the dataset preparation step from the README."
        ) from exc


class ImageDataset(torch.utils.data.Dataset):
    """A :class:`SplitData` with per-item labels remapped to global labels and a transform."""

    def __init__(self, split: SplitData, labels: np.ndarray, transform: Callable | None):
        assert len(split) == len(labels)
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = load_image(self.split.items[i])
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[i])

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """The same images and labels seen through another transform."""
        return ImageDataset(self.split, self.labels, transform)
