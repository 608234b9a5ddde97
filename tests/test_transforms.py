"""Preprocessing recipes: each protocol's normalisation, checked on a constant image."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from clcli.data.transforms import CIFAR_STATS, IMAGENET_STATS, build_transforms

BACKBONE = SimpleNamespace(input_size=32, interpolation="bicubic", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), crop_pct=0.9)
GREY = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))


@pytest.mark.parametrize("recipe, stats", [("slca_cifar", CIFAR_STATS), ("slca_imagenet_r", IMAGENET_STATS),
                                           ("slca_fgvc", IMAGENET_STATS),
                                           ("backbone", (BACKBONE.mean, BACKBONE.std)),
                                           ("upscale", (BACKBONE.mean, BACKBONE.std))])
def test_each_recipe_normalises_with_its_statistics(recipe, stats):
    _, test = build_transforms(recipe, BACKBONE)
    x = test(GREY)
    assert tuple(x.shape) == (3, 32, 32)
    mean, std = stats
    expected = [(128 / 255 - m) / s for m, s in zip(mean, std)]  # a constant image stays constant
    assert x.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)


def test_cifar_statistics_are_cifar_not_imagenet():
    # the SLCA CIFAR recipe fixes CIFAR-100's statistics, whatever the backbone was pre-trained with
    assert CIFAR_STATS == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)) and CIFAR_STATS != IMAGENET_STATS
