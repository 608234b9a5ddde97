"""Sources of the class-incremental benchmarks and the offline default
(docs/slca_protocol.md#benchmarks-and-data-layout).

- :class:`CIFAR100`: torchvision's CIFAR-100 (downloaded on first use where the network allows).
- :class:`ImageFolderSource`: ImageNet-R, CUB-200 and Cars-196 in the ``train/`` + ``val/`` folder
  layout that SLCA reads (one sub-folder per class, sorted names = class index).
- :class:`Digits`: scikit-learn's bundled handwritten digits, the offline default benchmark.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clcli.data.base import SourceInfo, SplitData
from clcli.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class CIFAR100:
    """CIFAR-100 through torchvision (official 50,000 / 10,000 split), kept in memory as uint8."""

    def __init__(self, root: str, download: bool = True):
        self.root, self.download = Path(root), download
        self.info = SourceInfo("cifar100", 100, [], ["a photo of a {c}."])
        self._cache: dict[str, SplitData] = {}

    def _present(self) -> bool:
        return (self.root / "cifar-100-python" / "train").is_file()

    def problems(self) -> list[str]:
        if self.download or self._present():
            return []
        return [
            f"data: CIFAR-100 not found at '{self.root}/cifar-100-python' and download is off. "
            f"Set data.source.download=true (torchvision downloads it), or place the extracted "
            f"'cifar-100-python/' folder (train, test, meta) under '{self.root}'."
        ]

    def load(self, split: str) -> SplitData:
        if split not in ("train", "test"):
            raise KeyError(f"CIFAR-100 has no '{split}' split")
        if split not in self._cache:
            from torchvision.datasets import CIFAR100 as TV

            try:
                ds = TV(str(self.root), train=split == "train", download=self.download and not self._present())
            except Exception as exc:
                raise DataError(
                    f"Could not obtain CIFAR-100 under '{self.root}' ({exc}). Download "
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz on a machine with "
                    f"network access and extract it into '{self.root}' (paths.data_dir)."
                ) from exc
            self.info.class_names = [c.replace("_", " ") for c in ds.classes]
            self._cache[split] = SplitData(ds.data, np.asarray(ds.targets))
        return self._cache[split]


def scan_image_folder(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Like torchvision's ImageFolder: sorted class folders -> index, sorted files inside each."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / cls, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(idx)
    return classes, paths, np.asarray(labels, dtype=np.int64)


class ImageFolderSource:
    """A dataset stored as ``<root>/<train_dir>/<class>/*.jpg`` and ``<root>/<test_dir>/<class>/*.jpg``.

    ``how_to`` is the preparation recipe shown when the folders are missing.
    """

    def __init__(self, root: str, name: str, num_classes: int, how_to: str,
                 train_dir: str = "train", test_dir: str = "val"):
        self.root, self.how_to = Path(root), how_to
        self.dirs = {"train": train_dir, "test": test_dir}
        self.info = SourceInfo(name, num_classes, [], ["a photo of a {c}."])
        self._cache: dict[str, SplitData] = {}

    def problems(self) -> list[str]:
        missing = [str(self.root / d) for d in self.dirs.values() if not (self.root / d).is_dir()]
        if not missing:
            return []
        return [
            f"data: {self.info.name} folder(s) {', '.join(repr(m) for m in missing)} do not exist. Expected "
            f"layout: '{self.root}/{self.dirs['train']}/<class>/<image>' and "
            f"'{self.root}/{self.dirs['test']}/<class>/<image>' with {self.info.num_classes} class folders "
            f"each (set paths.data_dir to the folder that holds '{self.root.name}'). {self.how_to}"
        ]

    def load(self, split: str) -> SplitData:
        if split not in self.dirs:
            raise KeyError(f"{self.info.name} has no '{split}' split")
        if split not in self._cache:
            problems = self.problems()
            if problems:
                raise DataError("\n".join(problems))
            classes, paths, labels = scan_image_folder(self.root / self.dirs[split])
            if len(classes) != self.info.num_classes:
                raise DataError(
                    f"data: '{self.root / self.dirs[split]}' has {len(classes)} class folders, "
                    f"expected {self.info.num_classes}. {self.how_to}"
                )
            self.info.class_names = [c.split(".", 1)[-1].replace("_", " ") for c in classes]
            self._cache[split] = SplitData(paths, labels)
        return self._cache[split]


def imagenet_r(root: str) -> ImageFolderSource:
    """ImageNet-R (200 classes, 24,000 / 6,000 from DualPrompt's seed-42 80/20 random split)."""
    return ImageFolderSource(
        root, "imagenet_r", 200,
        "Download imagenet-r.tar from https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, "
        "extract it, then run `clcli data prepare imagenet_r --src <extracted imagenet-r> "
        f"--dst {root}` (seed-42 random 80/20 split into train/ and val/).",
    )


def cub200(root: str) -> ImageFolderSource:
    """CUB-200-2011 (200 classes, official 5,994 / 5,794 split from train_test_split.txt)."""
    return ImageFolderSource(
        root, "cub200", 200,
        "Download CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/), extract "
        f"it, then run `clcli data prepare cub200 --src <CUB_200_2011 folder> --dst {root}` "
        "(official split from images.txt + train_test_split.txt).",
    )


def cars196(root: str) -> ImageFolderSource:
    """Stanford Cars-196 in SLCA's layout (class folders named from label_map.txt)."""
    return ImageFolderSource(
        root, "cars196", 196,
        "Prepare Stanford Cars (car_ims/ + cars_annos.mat) into train/<class_name>/ and "
        "val/<class_name>/ folders as SLCA's split_car.py does (docs/slca_protocol.md, 'Preparing Cars-196'); "
        "note the reference recipe puts the official *test* images in train/.",
    )


class Digits:
    """scikit-learn's handwritten digits (1,797 real 8×8 grey images, 10 classes), offline.

    A fixed stratified split: per class, ``test_fraction`` of the images (rounded) go to test,
    chosen by a ``RandomState(split_seed)`` permutation; the class order is the scenario's business.
    """

    def __init__(self, test_fraction: float = 0.3, split_seed: int = 0):
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.info = SourceInfo("digits", 10, [f"digit {d}" for d in range(10)], ["a photo of the number: \"{c}\"."])
        self._splits: dict[str, SplitData] | None = None

    def problems(self) -> list[str]:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return ["data: split_digits needs scikit-learn. Install the extra: pip install -e '.[offline]'"]
        return []

    def load(self, split: str) -> SplitData:
        if split not in ("train", "test"):
            raise KeyError(f"digits has no '{split}' split")
        if self._splits is None:
            from sklearn.datasets import load_digits

            d = load_digits()
            # 0..16 ink intensity -> dark ink on white paper, like the photos the backbone saw.
            images = (255 - np.round(d.images * (255.0 / 16.0))).astype(np.uint8)
            train_idx, test_idx = stratified_split(d.target, self.test_fraction, self.split_seed)
            self._splits = {
                "train": SplitData(images[train_idx], d.target[train_idx]),
                "test": SplitData(images[test_idx], d.target[test_idx]),
            }
        return self._splits[split]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation; the first round(n·fraction) go to test. Sorted indices."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * test_fraction))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(test))
