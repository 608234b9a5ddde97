"""Preprocessing recipes. A recipe is named in the data config (``data.transform``).

- ``slca_cifar`` / ``slca_imagenet_r`` / ``slca_fgvc``: the SLCA protocol's pipelines, with the
  normalization the protocol fixes (CIFAR or ImageNet statistics, for both ViT pre-trainings;
  docs/slca_protocol.md#preprocessing-recipes). They ignore the backbone's own normalization on purpose.
- ``backbone``: resize + centre crop at the backbone's input size with its own mean/std; training
  adds a random resized crop (scale 0.6–1) and horizontal flip.
- ``upscale``: small images (digits, synthetic) resized to the backbone's input size, no crop, no
  flip (a flipped digit is another symbol), the backbone's mean/std.
- ``prompt_jhlee`` / ``prompt_coda`` / ``prompt_coda_cifar``: the prompt methods' reference pipelines,
  images in [0, 1] without normalization (docs/prompt_baselines.md#input-pipeline).
"""
from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC
CIFAR_STATS = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

RECIPES = ("slca_cifar", "slca_imagenet_r", "slca_fgvc", "backbone", "upscale", "prompt_jhlee", "prompt_coda",
           "prompt_coda_cifar")


def _interp(name: str) -> T.InterpolationMode:
    return {"bicubic": BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(name, BICUBIC)


def build_transforms(recipe: str, backbone) -> tuple[Callable, Callable]:
    """``(train_transform, test_transform)`` for a recipe and a backbone (which provides
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``)."""
    size = backbone.input_size
    if recipe.startswith("slca_"):
        # The SLCA recipes are defined at 224 (resize 256 -> crop 224); scale them for tiny models.
        resize, crop = round(size * 256 / 224), size
        stats = CIFAR_STATS if recipe == "slca_cifar" else IMAGENET_STATS
        tail = [T.ToTensor(), T.Normalize(*stats)]
        test = T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(crop), *tail])
        if recipe == "slca_cifar":
            train = [T.RandomResizedCrop(crop, interpolation=BICUBIC), T.RandomHorizontalFlip(),
                     T.ColorJitter(brightness=63 / 255)]
        elif recipe == "slca_imagenet_r":
            train = [T.RandomResizedCrop(crop, interpolation=BICUBIC), T.RandomHorizontalFlip()]
        else:  # CUB-200 / Cars-196: square resize (aspect NOT kept), random crop, flip
            big = round(size * 300 / 224)
            train = [T.Resize((big, big), interpolation=BICUBIC), T.RandomCrop((crop, crop)), T.RandomHorizontalFlip()]
        return T.Compose([*train, *tail]), test
    if recipe.startswith("prompt_"):  # defined at 224 like the SLCA recipes; ToTensor only ([0, 1])
        resize, crop = round(size * 256 / 224), size
        if recipe == "prompt_jhlee":
            train = T.RandomResizedCrop(crop, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3),
                                        interpolation=T.InterpolationMode.BILINEAR)
        else:
            train = T.RandomResizedCrop(crop)
        test = ([T.Resize((crop, crop))] if recipe == "prompt_coda_cifar"  # CIFAR is square: a plain resize
                else [T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(crop)])
        return T.Compose([train, T.RandomHorizontalFlip(), T.ToTensor()]), T.Compose([*test, T.ToTensor()])
    interp = _interp(backbone.interpolation)
    tail = [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    if recipe == "backbone":
        test = T.Compose([T.Resize(round(size / backbone.crop_pct), interpolation=interp), T.CenterCrop(size), *tail])
        train = T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interp), T.RandomHorizontalFlip(), *tail])
        return train, test
    if recipe == "upscale":
        t = T.Compose([T.Resize((size, size), interpolation=interp), *tail])
        return t, t
    raise ValueError(f"data.transform: unknown recipe '{recipe}' (known: {', '.join(RECIPES)})")
