"""Generated class-conditional images: the whole pipeline on CPU in seconds (tests, smoke runs).

Each class has a smooth random colour prototype (a coarse random grid upsampled to the image size);
a sample is its class prototype plus Gaussian pixel noise and a random shift, stored as uint8. The
generator is seeded, so a synthetic dataset is identical on every machine.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clcli.data.base import SourceInfo, SplitData

_WORDS = [
    "amber", "basil", "cedar", "dune", "ember", "fjord", "glade", "heath", "iris", "juniper",
    "kelp", "lagoon", "moss", "nectar", "opal", "pebble", "quartz", "reed", "sage", "tundra",
]


class SyntheticSource:
    """A labelled image dataset made up on the fly.

    ``num_classes`` classes, ``train_per_class``/``test_per_class`` images each (``val_per_class``
    for a val split, 0 for none), ``image_size`` pixels square, pixel noise ``noise`` (0..1 scale).
    ``seed`` fixes the prototypes and samples; ``name_prefix`` and ``templates`` give the classes
    readable names and prompts (used by CLIP methods).
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 20,
        test_per_class: int = 10,
        val_per_class: int = 0,
        image_size: int = 32,
        noise: float = 0.25,
        seed: int = 0,
        name: str = "synthetic",
        name_prefix: str = "",
        templates: list[str] | None = None,
    ):
        names = [f"{name_prefix}{_WORDS[c % len(_WORDS)]}{'' if c < len(_WORDS) else c}" for c in range(num_classes)]
        self.info = SourceInfo(name, num_classes, names, list(templates or ["a photo of a {c}."]))
        self.image_size, self.noise, self.seed = image_size, noise, seed
        self.per_class = {"train": train_per_class, "test": test_per_class, "val": val_per_class}

    def problems(self) -> list[str]:
        return []

    def _prototypes(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        coarse = torch.rand(self.info.num_classes, 3, 4, 4, generator=g)
        return F.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)

    def load(self, split: str) -> SplitData:
        n = self.per_class[split]
        if n <= 0:
            raise KeyError(f"{self.info.name} has no '{split}' split")
        split_id = {"train": 1, "test": 2, "val": 3}[split]
        g = torch.Generator().manual_seed(self.seed * 1000 + split_id)
        protos = self._prototypes()
        c = self.info.num_classes
        labels = torch.arange(c).repeat_interleave(n)
        x = protos[labels] + self.noise * torch.randn(len(labels), 3, self.image_size, self.image_size, generator=g)
        shifts = torch.randint(-2, 3, (len(labels), 2), generator=g)
        for i, (dy, dx) in enumerate(shifts.tolist()):
            x[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return SplitData(np.ascontiguousarray(images), labels.numpy())
