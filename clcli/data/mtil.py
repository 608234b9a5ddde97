"""The eleven MTIL datasets as :class:`~clcli.data.base.Source` objects, the MTIL orders and few-shot.

MTIL (Multi-domain Task-Incremental Learning, introduced by ZSCL) trains a CLIP model on eleven image
datasets one after the other. This module follows the protocol of **DIKI** ("Mind the Interference:
Retaining Pre-trained Knowledge in Parameter Efficient Continual Learning of Vision-Language Models",
ECCV 2024, arXiv 2407.05342) as written down in ``specs/diki_mtil.md`` section 1:

* **Splits (spec §1.2).** DIKI uses the **CoOp** splits (Zhou et al., "Learning to Prompt for
  Vision-Language Models"): a ``split_zhou_<Name>.json`` file per dataset with keys ``"train"``,
  ``"val"`` and ``"test"``, each a list of ``[relative_image_path, label_int, classname]``. Exceptions:
  FGVC-Aircraft uses the official ``images_variant_{train,val,test}.txt`` lists, and CIFAR100 / MNIST
  use the official test set plus an 80/20 per-class split of the official training set.
* **Validation split of CIFAR100 / MNIST (spec §5.3, §8 item 6).** The reference re-shuffles these with
  the global ``random`` state on every construction, so its val set overlaps its train set. Here the
  split is drawn once, from a dedicated ``random.Random(split_seed)`` (:func:`per_class_train_val_split`),
  and is identical however often and in whatever order the source is loaded — a documented deviation.
* **Class names (spec §1.3)** follow CoOp's conventions (Caltech renames, EuroSAT long names, Cars with
  the year in front, SUN397 path parts reversed, lower-cased pet breeds, ...). Label ids are the sorted
  labels of the train split (CoOp's ``get_lab2cname``). Names are stored *prompt-ready*: DIKI replaces
  ``_`` by a space after filling the template (``DIKI.py:101``); we do it once, here, so
  ``template.format(c=name)`` is the exact prompt.
* **Templates (spec §1.3).** DIKI uses only each dataset's *first* template (single template, no
  ensemble); ``SourceInfo.templates[0]`` is that template, with a ``{c}`` placeholder.
* **Orders (spec §1.1).** :data:`MTIL_ORDER_I`, :data:`MTIL_ORDER_II` (order I permuted by
  :data:`MTIL_ORDER_II_PERMUTATION`), :data:`MTIL_FEWSHOT_DATASETS` (MTIL-FS, 8 datasets).
* **Few-shot (spec §1.5).** :func:`few_shot` draws ``shots`` items per label with a dedicated seeded RNG
  (the reference uses the global ``random`` and, for CIFAR100 / MNIST, re-draws per construction).

Nothing here downloads anything except the torchvision CIFAR100 / MNIST sources when ``download=True``.
``problems()`` only stats paths; ``load()`` reads split files (never decodes images: items are absolute
path strings, or uint8 arrays for CIFAR100 / MNIST). ``load()`` reports a missing, unreadable or
malformed dataset as :class:`MissingDatasetError` (a :class:`clcli.errors.DataError`, which the CLI
prints as a clean message, that is also a ``FileNotFoundError`` for callers written against the old
behaviour).

Canonical config names (:data:`MTIL_SOURCES`): ``aircraft, caltech101, cifar100, dtd, eurosat, flowers,
food, mnist, oxford_pet, cars, sun397``. :func:`make_mtil_source` builds one from a data directory using
:data:`MTIL_DEFAULT_DIRS` (CoOp's folder names).
"""
from __future__ import annotations

import abc
import json
import logging
import os
import random
import re
from typing import Any, Sequence

import numpy as np

from clcli.data.base import SourceInfo, SplitData
from clcli.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


def prompt_name(name: str) -> str:
    """The class name as it appears in DIKI's prompt: ``_`` → space (``DIKI.py:101``), trimmed."""
    return " ".join(str(name).replace("_", " ").split())


# ----------------------------------------------------------------------------------------------
# Shared helpers: CoOp split files, per-class train/val split, few-shot
# ----------------------------------------------------------------------------------------------


def per_class_train_val_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float = 0.2, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into (train, val), stratified by label (spec §1.2, §5.3).

    For every label (ascending), its indices are shuffled with one dedicated ``random.Random(seed)``
    (never the global ``random`` state) and the first ``round(val_fraction * n)`` go to val, the rest to
    train — the per-class 80/20 rule DIKI borrows from CoOp's ``OxfordPets.split_trainval``. Classes
    with at least two items keep at least one item on each side (the reference asserts instead).
    Returns two sorted int64 index arrays; same labels + seed ⇒ same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab).tolist()
        rng.shuffle(idx)
        n = len(idx)
        n_val = int(round(val_fraction * n))
        if n >= 2 and val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def few_shot(split: SplitData, shots: int, seed: int) -> SplitData:
    """``shots`` items per label, drawn with a dedicated ``random.Random(seed)`` (spec §1.5).

    Labels are visited in ascending order and each draws ``rng.sample(indices_of_label, shots)``; a
    label with ``shots`` items or fewer keeps all of them. The result keeps the original item order.
    Deterministic for a given split and seed and independent of the global ``random`` state (the
    reference uses the global ``random.sample`` — spec §8 item 6).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    labels = np.asarray(split.labels)
    picked: list[int] = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab).tolist()
        picked.extend(idx if len(idx) <= shots else rng.sample(idx, shots))
    return split.subset(sorted(picked))


def fewshot_val_shots(shots: int) -> int:
    """Shots of the few-shot *validation* split: ``min(shots, 4)`` (spec §1.5)."""
    return min(shots, 4)


def read_coop_split(path: str) -> dict[str, list[tuple[str, int, str]]]:
    """Read a CoOp ``split_zhou_<Name>.json``: ``{"train"|"val"|"test": [[relpath, label, classname]]}``."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with keys train/val/test")
    out: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        if split not in raw:
            raise ValueError(f"{path}: missing key {split!r} (CoOp split files have train/val/test)")
        rows = []
        for k, entry in enumerate(raw[split]):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise ValueError(f"{path}: {split}[{k}] = {entry!r} is not [relative_path, label, classname]")
            rel, lab = str(entry[0]), int(entry[1])
            cname = str(entry[2]) if len(entry) > 2 else ""
            rows.append((rel, lab, cname))
        out[split] = rows
    return out


def _index_labels(
    rows: dict[str, list[tuple[str, int, str]]], where: str
) -> tuple[dict[int, int], dict[int, str]]:
    """CoOp's ``get_lab2cname``: new id = rank of the label among the sorted train labels; name = the
    first name seen for that label in train. Returns (old→new id, old id→name)."""
    names: dict[int, str] = {}
    for _, lab, cname in rows["train"]:
        names.setdefault(lab, cname)
    mapping = {lab: i for i, lab in enumerate(sorted(names))}
    for split in ("val", "test"):
        unknown = sorted({lab for _, lab, _ in rows[split]} - set(mapping))
        if unknown:
            raise ValueError(f"{where}: {split} labels {unknown[:5]} do not occur in the train split")
    return mapping, names


class MissingDatasetError(DataError, FileNotFoundError):
    """A dataset of the MTIL sequence is missing or unreadable. A :class:`~clcli.errors.DataError`, so
    ``clcli`` prints the message (what is missing, the expected layout, how to get it) without a
    traceback; also a ``FileNotFoundError``, the type ``load()`` raised before."""


def _problem(name: str, what: str, path: str, layout: str, get_it: str) -> str:
    return f"{name}: {what} {path} is missing. Expected layout: {layout}. Get it: {get_it}"


class _SplitFileSource(abc.ABC):
    """Shared plumbing of the sources whose splits come from files under ``root`` (the CoOp split
    sources and FGVC-Aircraft): lazily built on first :meth:`load` / :attr:`info`, missing or unreadable
    files reported as :class:`MissingDatasetError`.

    Subclasses set ``name``, ``display_name``, ``template`` (DIKI's first template),
    ``expected_classes`` (DIKI's class count), ``layout`` and ``get_it`` (for :meth:`problems`), and
    implement :meth:`problems` and :meth:`_build` (which fills ``self._info`` and ``self._data``).
    """

    name = ""
    display_name = ""
    template = "a photo of a {c}."
    expected_classes = 0
    layout = ""
    get_it = ""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self._info = SourceInfo(self.name, self.expected_classes, [], [self.template])
        self._data: dict[str, SplitData] | None = None

    @property
    def info(self) -> SourceInfo:
        """Static facts; ``class_names`` / ``num_classes`` come from the split files once they exist
        (read on first access; before that ``num_classes`` is DIKI's count and the names are empty)."""
        if self._data is None and not self.problems():
            self._build_or_raise()
        return self._info

    @abc.abstractmethod
    def problems(self) -> list[str]:
        """What is missing on disk (cheap stat calls), per dataset layout."""

    def load(self, split: str) -> SplitData:
        if split not in SPLITS:
            raise KeyError(f"{self.name}: unknown split {split!r} (train, val or test)")
        if self._data is None:
            probs = self.problems()
            if probs:
                raise MissingDatasetError("\n".join(probs))
            self._build_or_raise()
        assert self._data is not None
        return self._data[split]

    def _build_or_raise(self) -> None:
        try:
            self._build()
        except (OSError, ValueError) as exc:  # unreadable or malformed split/list files
            raise MissingDatasetError(f"{self.name}: cannot read the split files under {self.root}: {exc}") from exc

    @abc.abstractmethod
    def _build(self) -> None:
        """Read the split files into ``self._data`` and ``self._info``."""


# ----------------------------------------------------------------------------------------------
# CoOp-split datasets
# ----------------------------------------------------------------------------------------------


class CoOpSplitSource(_SplitFileSource):
    """A dataset read from a folder of images plus CoOp's ``split_zhou_<Name>.json`` (spec §1.2).

    Subclasses set: ``name`` (config name), ``display_name``, ``image_dir`` (folder under ``root`` that
    the json's relative paths start from; ``""`` = ``root`` itself), ``required_dirs`` (folders under
    ``root`` that must exist), ``split_file``, ``template`` (DIKI's first template),
    ``expected_classes`` (DIKI's class count), ``layout`` and ``get_it`` (for :meth:`problems`), and
    may override :meth:`class_name` (spec §1.3 conventions) and :meth:`keep` (entries to ignore).
    """

    image_dir = ""
    required_dirs: tuple[str, ...] = ()
    split_file = ""

    # -- naming conventions (spec §1.3) --------------------------------------------------------
    def class_name(self, classname: str, relpath: str) -> str:
        """Prompt-ready class name of one split entry (default: the json's name, ``_`` → space)."""
        return prompt_name(classname)

    def keep(self, relpath: str, classname: str) -> bool:
        """Whether a split entry belongs to the dataset (default: all)."""
        return True

    # -- Source protocol (info, load: see _SplitFileSource) ----------------------------------------
    @property
    def split_path(self) -> str:
        return os.path.join(self.root, self.split_file)

    def problems(self) -> list[str]:
        if not os.path.isdir(self.root):
            return [_problem(self.name, "dataset folder", self.root, self.layout, self.get_it)]
        out = []
        for d in self.required_dirs:
            p = os.path.join(self.root, d)
            if not os.path.isdir(p):
                out.append(_problem(self.name, "image folder", p, self.layout, self.get_it))
        if not os.path.isfile(self.split_path):
            out.append(
                _problem(self.name, "CoOp split file", self.split_path, self.layout,
                         f"download {self.split_file} from the links in CoOp's DATASETS.md "
                         f"({COOP_DATASETS_MD}) and put it in {self.root}")
            )
        return out

    # -- internals -------------------------------------------------------------------------------
    def _build(self) -> None:
        raw = read_coop_split(self.split_path)
        rows = {
            s: [(rel, lab, self.class_name(c, rel)) for rel, lab, c in raw[s] if self.keep(rel, c)]
            for s in SPLITS
        }
        mapping, names = _index_labels(rows, self.split_path)
        base = os.path.join(self.root, self.image_dir) if self.image_dir else self.root
        data = {}
        for s in SPLITS:
            items = [os.path.normpath(os.path.join(base, rel)) for rel, _, _ in rows[s]]
            labels = np.array([mapping[lab] for _, lab, _ in rows[s]], dtype=np.int64)
            data[s] = SplitData(items, labels)
        class_names = [names[lab] for lab in sorted(mapping)]
        if self.expected_classes and len(class_names) != self.expected_classes:
            log.warning("%s: %d classes in %s, DIKI's protocol has %d", self.name, len(class_names),
                        self.split_path, self.expected_classes)
        self._info = SourceInfo(self.name, len(class_names), class_names, [self.template])
        self._data = data


CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


class Caltech101Source(CoOpSplitSource):
    """Caltech101 with CoOp's split: **100 classes** (spec §1.2–1.3; ZSCL has 101).

    Layout (``root`` = e.g. ``<data_dir>/caltech-101``)::

        root/101_ObjectCategories/<category>/image_0001.jpg
        root/split_zhou_Caltech101.json      # paths relative to 101_ObjectCategories/

    ``BACKGROUND_Google`` and ``Faces_easy`` are ignored; ``airplanes→airplane``, ``Faces→face``,
    ``Leopards→leopard``, ``Motorbikes→motorbike`` (CoOp's json already carries these names; the
    renames are applied again so raw folder names work too). Template: ``a photo of a {c}.``
    """

    name = "caltech101"
    display_name = "Caltech101"
    image_dir = "101_ObjectCategories"
    required_dirs = ("101_ObjectCategories",)
    split_file = "split_zhou_Caltech101.json"
    template = "a photo of a {c}."
    expected_classes = 100
    layout = ("<root>/101_ObjectCategories/<category>/*.jpg and <root>/split_zhou_Caltech101.json "
              "(CoOp format, paths relative to 101_ObjectCategories/)")
    get_it = ("101_ObjectCategories from the official Caltech101 page (https://data.caltech.edu/records/"
              "mzrjq-6wc02) or torchvision.datasets.Caltech101(<dir>, download=True), which creates "
              f"<dir>/caltech101/101_ObjectCategories; split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")

    def keep(self, relpath: str, classname: str) -> bool:
        folder = relpath.replace("\\", "/").split("/")[0]
        return folder not in CALTECH_IGNORED and classname not in CALTECH_IGNORED

    def class_name(self, classname: str, relpath: str) -> str:
        return prompt_name(CALTECH_RENAMES.get(classname, classname))


class DTDSource(CoOpSplitSource):
    """Describable Textures (DTD), 47 classes, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/dtd``)::

        root/images/<texture>/<texture>_0001.jpg
        root/split_zhou_DescribableTextures.json   # paths relative to images/

    Template: ``a photo of a {c} texture.``
    """

    name = "dtd"
    display_name = "DTD"
    image_dir = "images"
    required_dirs = ("images",)
    split_file = "split_zhou_DescribableTextures.json"
    template = "a photo of a {c} texture."
    expected_classes = 47
    layout = ("<root>/images/<texture>/*.jpg and <root>/split_zhou_DescribableTextures.json "
              "(CoOp format, paths relative to images/)")
    get_it = ("dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ (its dtd/ folder is the "
              "root), or torchvision.datasets.DTD(<dir>, download=True), which creates <dir>/dtd/dtd/images; "
              f"split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")


EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


class EuroSATSource(CoOpSplitSource):
    """EuroSAT (RGB), 10 classes with CoOp's names (spec §1.3), CoOp split.

    Layout (``root`` = e.g. ``<data_dir>/eurosat``)::

        root/2750/<Class>/<Class>_1.jpg     # AnnualCrop, Forest, ..., SeaLake
        root/split_zhou_EuroSAT.json       # paths relative to 2750/

    Names: Annual Crop Land, Forest, Herbaceous Vegetation Land, Highway or Road, Industrial Buildings,
    Pasture Land, Permanent Crop Land, Residential Buildings, River, Sea or Lake (raw folder names are
    mapped to these). Template: ``a centered satellite photo of {c}.``
    """

    name = "eurosat"
    display_name = "EuroSAT"
    image_dir = "2750"
    required_dirs = ("2750",)
    split_file = "split_zhou_EuroSAT.json"
    template = "a centered satellite photo of {c}."
    expected_classes = 10
    layout = ("<root>/2750/<Class>/*.jpg and <root>/split_zhou_EuroSAT.json "
              "(CoOp format, paths relative to 2750/)")
    get_it = ("EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT, or "
              "torchvision.datasets.EuroSAT(<dir>, download=True), which creates <dir>/eurosat/2750; "
              f"split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._info.class_names = list(EUROSAT_NAMES.values())

    def class_name(self, classname: str, relpath: str) -> str:
        return prompt_name(EUROSAT_NAMES.get(classname, classname))


class FlowersSource(CoOpSplitSource):
    """Oxford Flowers102, 102 classes, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/oxford_flowers``)::

        root/jpg/image_00001.jpg
        root/split_zhou_OxfordFlowers.json   # paths relative to jpg/
        root/cat_to_name.json, root/imagelabels.mat   # used by CoOp to build the split; optional here

    Class names are those of the split file, which CoOp took from ``cat_to_name.json`` (spec §1.3).
    Template: ``a photo of a {c}, a type of flower.``
    """

    name = "flowers"
    display_name = "Flowers102"
    image_dir = "jpg"
    required_dirs = ("jpg",)
    split_file = "split_zhou_OxfordFlowers.json"
    template = "a photo of a {c}, a type of flower."
    expected_classes = 102
    layout = ("<root>/jpg/image_*.jpg and <root>/split_zhou_OxfordFlowers.json "
              "(CoOp format, paths relative to jpg/; names from cat_to_name.json)")
    get_it = ("102flowers.tgz from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, or "
              "torchvision.datasets.Flowers102(<dir>, download=True), which creates <dir>/flowers-102/jpg; "
              f"split file and cat_to_name.json via CoOp's DATASETS.md ({COOP_DATASETS_MD})")


class FoodSource(CoOpSplitSource):
    """Food-101, 101 classes, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/food-101``)::

        root/images/<dish>/<id>.jpg
        root/split_zhou_Food101.json   # paths relative to images/

    Template: ``a photo of a {c}, a type of food.``
    """

    name = "food"
    display_name = "Food101"
    image_dir = "images"
    required_dirs = ("images",)
    split_file = "split_zhou_Food101.json"
    template = "a photo of a {c}, a type of food."
    expected_classes = 101
    layout = ("<root>/images/<dish>/*.jpg and <root>/split_zhou_Food101.json "
              "(CoOp format, paths relative to images/)")
    get_it = ("food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, or "
              "torchvision.datasets.Food101(<dir>, download=True), which creates <dir>/food-101/images; "
              f"split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")


class OxfordPetSource(CoOpSplitSource):
    """Oxford-IIIT Pet, 37 breeds, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/oxford_pets``)::

        root/images/Abyssinian_1.jpg
        root/split_zhou_OxfordPets.json   # paths relative to images/
        root/annotations/                 # used by CoOp to build the split; optional here

    Class name = the lower-cased breed (the file name without its ``_<n>`` suffix, spec §1.3): the json's
    name, lower-cased, or the file name's breed when the json has none. Template:
    ``a photo of a {c}, a type of pet.``
    """

    name = "oxford_pet"
    display_name = "OxfordPet"
    image_dir = "images"
    required_dirs = ("images",)
    split_file = "split_zhou_OxfordPets.json"
    template = "a photo of a {c}, a type of pet."
    expected_classes = 37
    layout = ("<root>/images/<Breed>_<n>.jpg and <root>/split_zhou_OxfordPets.json "
              "(CoOp format, paths relative to images/)")
    get_it = ("images.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, or "
              "torchvision.datasets.OxfordIIITPet(<dir>, download=True), which creates "
              f"<dir>/oxford-iiit-pet/images; split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")

    def class_name(self, classname: str, relpath: str) -> str:
        if not classname:
            stem = os.path.splitext(os.path.basename(relpath))[0]
            classname = stem.rsplit("_", 1)[0]
        return prompt_name(classname.lower())


_YEAR = re.compile(r"^(19|20)\d\d$")


def cars_year_first(name: str) -> str:
    """``Tesla Model S Sedan 2012`` → ``2012 Tesla Model S Sedan`` (CoOp's StanfordCars names, spec §1.3);
    a name that already starts with a year is unchanged."""
    parts = name.split()
    if len(parts) >= 2 and _YEAR.match(parts[-1]) and not _YEAR.match(parts[0]):
        parts = [parts[-1]] + parts[:-1]
    return " ".join(parts)


class CarsSource(CoOpSplitSource):
    """Stanford Cars, 196 classes, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/stanford_cars``)::

        root/cars_train/00001.jpg
        root/cars_test/00001.jpg
        root/split_zhou_StanfordCars.json   # paths relative to root (``cars_train/00001.jpg``)
        root/devkit/, root/cars_test_annos_withlabels.mat   # used by CoOp to build the split; optional

    Class name = make/model with the **year moved to the front** (``2012 Tesla Model S Sedan``, spec
    §1.3). Template: ``a photo of a {c}, a type of car.``
    """

    name = "cars"
    display_name = "StanfordCars"
    image_dir = ""
    required_dirs = ("cars_train", "cars_test")
    split_file = "split_zhou_StanfordCars.json"
    template = "a photo of a {c}, a type of car."
    expected_classes = 196
    layout = ("<root>/cars_train/*.jpg, <root>/cars_test/*.jpg and <root>/split_zhou_StanfordCars.json "
              "(CoOp format, paths relative to <root>, e.g. cars_train/00001.jpg)")
    get_it = ("the Stanford Cars images (cars_train.tgz, cars_test.tgz; the official page is offline — see "
              "CoOp's DATASETS.md or torchvision.datasets.StanfordCars' notes for mirrors, which give "
              f"<dir>/stanford_cars/cars_train); split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")

    def class_name(self, classname: str, relpath: str) -> str:
        return prompt_name(cars_year_first(classname))


def sun397_name_from_path(relpath: str) -> str:
    """``b/bakery/shop/sun_x.jpg`` → ``shop bakery``: the path parts after the letter folder, reversed
    (CoOp's SUN397 names, spec §1.3)."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p]
    return prompt_name(" ".join(reversed(parts[1:-1])))


class SUN397Source(CoOpSplitSource):
    """SUN397, 397 scene classes, CoOp split (spec §1.2).

    Layout (``root`` = e.g. ``<data_dir>/sun397``)::

        root/SUN397/<letter>/<scene>[/<sub>]/sun_<id>.jpg
        root/split_zhou_SUN397.json   # paths relative to SUN397/ (``b/bakery/shop/sun_x.jpg``)

    Class name = the path parts after the letter, reversed, ``_`` → space (``b/bakery/shop`` →
    ``shop bakery``, ``a/airport_terminal`` → ``airport terminal``; spec §1.3), derived from each
    image's path. Template: ``a photo of a {c}.``
    """

    name = "sun397"
    display_name = "SUN397"
    image_dir = "SUN397"
    required_dirs = ("SUN397",)
    split_file = "split_zhou_SUN397.json"
    template = "a photo of a {c}."
    expected_classes = 397
    layout = ("<root>/SUN397/<letter>/<scene>[/<sub>]/*.jpg and <root>/split_zhou_SUN397.json "
              "(CoOp format, paths relative to SUN397/)")
    get_it = ("SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/, or "
              "torchvision.datasets.SUN397(<dir>, download=True), which creates <dir>/SUN397; "
              f"split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})")

    def class_name(self, classname: str, relpath: str) -> str:
        return sun397_name_from_path(relpath) or prompt_name(classname)


# ----------------------------------------------------------------------------------------------
# FGVC-Aircraft: official variant lists
# ----------------------------------------------------------------------------------------------


class AircraftSource(_SplitFileSource):
    """FGVC-Aircraft (variant level, 100 classes) with the **official** train / val / test lists
    (spec §1.2: 3,334 / 3,333 / 3,333), as DIKI does.

    Layout (``root`` = e.g. ``<data_dir>/fgvc_aircraft``)::

        root/fgvc-aircraft-2013b/data/images/<id>.jpg
        root/fgvc-aircraft-2013b/data/variants.txt               # one variant per line
        root/fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt   # "<id> <variant>" per line

    This is what ``torchvision.datasets.FGVCAircraft(root, download=True)`` produces. CoOp's flattened
    layout (``root/images``, ``root/variants.txt``, ``root/images_variant_*.txt``) is accepted too.
    Label = index of the variant in ``variants.txt``; class names = the variants in that order (spec
    §1.3). Template: ``a photo of a {c}, a type of aircraft.``
    """

    name = "aircraft"
    display_name = "FGVC-Aircraft"
    template = "a photo of a {c}, a type of aircraft."
    expected_classes = 100
    layout = ("<root>/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, "
              "images_variant_train.txt, images_variant_val.txt, images_variant_test.txt} "
              "(or the same files directly under <root>, CoOp's layout)")
    get_it = ("fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ "
              "extracted into <root>, or torchvision.datasets.FGVCAircraft(<root>, download=True)")

    @property
    def data_dir(self) -> str:
        """``root/fgvc-aircraft-2013b/data`` if it exists, else ``root`` when it holds the CoOp layout."""
        official = os.path.join(self.root, "fgvc-aircraft-2013b", "data")
        if not os.path.isdir(official) and os.path.isfile(os.path.join(self.root, "variants.txt")):
            return self.root
        return official

    def problems(self) -> list[str]:
        if not os.path.isdir(self.root):
            return [_problem(self.name, "dataset folder", self.root, self.layout, self.get_it)]
        d = self.data_dir
        out = []
        if not os.path.isdir(os.path.join(d, "images")):
            out.append(_problem(self.name, "image folder", os.path.join(d, "images"), self.layout, self.get_it))
        for f in ["variants.txt"] + [f"images_variant_{s}.txt" for s in SPLITS]:
            if not os.path.isfile(os.path.join(d, f)):
                out.append(_problem(self.name, "file", os.path.join(d, f), self.layout, self.get_it))
        return out

    def _build(self) -> None:
        d = self.data_dir
        with open(os.path.join(d, "variants.txt"), encoding="utf-8") as f:
            variants = [line.strip() for line in f if line.strip()]
        index = {v: i for i, v in enumerate(variants)}
        data = {}
        for s in SPLITS:
            path = os.path.join(d, f"images_variant_{s}.txt")
            items, labels = [], []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    image_id, _, variant = line.partition(" ")
                    if variant not in index:
                        raise ValueError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
                    items.append(os.path.join(d, "images", image_id + ".jpg"))
                    labels.append(index[variant])
            data[s] = SplitData(items, np.array(labels, dtype=np.int64))
        if len(variants) != self.expected_classes:
            log.warning("%s: %d variants, DIKI's protocol has %d", self.name, len(variants), self.expected_classes)
        self._info = SourceInfo(self.name, len(variants), [prompt_name(v) for v in variants], [self.template])
        self._data = data


# ----------------------------------------------------------------------------------------------
# CIFAR100 and MNIST: torchvision files, official test, per-class 80/20 train/val
# ----------------------------------------------------------------------------------------------

CIFAR100_FINE_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # CIFAR-100 ``fine_label_names`` (meta file order); checked against torchvision's on load

MNIST_NAMES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
               "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]


class _TorchvisionTrainValSource(abc.ABC):
    """Official train/test files read through torchvision; val = ``val_fraction`` of every class of the
    official train split, train = the rest, drawn once with ``random.Random(split_seed)``
    (:func:`per_class_train_val_split`; spec §1.2 and the §5.3 fix). Items are uint8 arrays."""

    name = ""
    display_name = ""
    template = ""
    class_names: list[str] = []
    files: tuple[str, ...] = ()  # relative to root, checked by problems() when download=False
    get_it = ""

    def __init__(self, root: str | os.PathLike[str], split_seed: int = 42, download: bool = True,
                 val_fraction: float = 0.2) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.split_seed = int(split_seed)
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        self.info = SourceInfo(self.name, len(self.class_names), [prompt_name(c) for c in self.class_names],
                               [self.template])
        self._cache: dict[str, SplitData] = {}

    def problems(self) -> list[str]:
        """Nothing is missing when ``download=True`` (torchvision fetches the files on ``load``)."""
        if self.download:
            return []
        layout = ", ".join(f"<root>/{f}" for f in self.files)
        return [
            _problem(self.name, "file", os.path.join(self.root, f), layout, self.get_it)
            for f in self.files if not os.path.isfile(os.path.join(self.root, f))
        ]

    @abc.abstractmethod
    def _official(self, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The official train or test split: images, labels, class names."""

    def _read_official(self, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """:meth:`_official` with torchvision's failures (no network for the download, corrupt or
        partial files) reported as a :class:`MissingDatasetError` naming the folder and the fix."""
        try:
            return self._official(train)
        except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError...
            raise MissingDatasetError(
                f"{self.name}: cannot read or download the official files under {self.root} "
                f"({type(exc).__name__}: {exc}). Get it: {self.get_it}"
            ) from exc

    def load(self, split: str) -> SplitData:
        if split not in SPLITS:
            raise KeyError(f"{self.name}: unknown split {split!r} (train, val or test)")
        if split not in self._cache:
            if not self.download:
                probs = self.problems()
                if probs:
                    raise MissingDatasetError("\n".join(probs))
            if split == "test":
                x, y, classes = self._read_official(train=False)
                self._cache["test"] = SplitData(x, y)
            else:
                x, y, classes = self._read_official(train=True)
                tr, va = per_class_train_val_split(y, self.val_fraction, self.split_seed)
                self._cache["train"] = SplitData(x[tr], y[tr])
                self._cache["val"] = SplitData(x[va], y[va])
            names = [prompt_name(c) for c in classes]
            if names != self.info.class_names:
                log.warning("%s: torchvision class names differ from the built-in list; using torchvision's",
                            self.name)
                self.info = SourceInfo(self.name, len(names), names, [self.template])
        return self._cache[split]


class CIFAR100Source(_TorchvisionTrainValSource):
    """CIFAR100 (100 classes): official test (10,000); train / val = 80/20 per class of the official
    train split (40,000 / 10,000), spec §1.2.

    Layout: torchvision's, ``root/cifar-100-python/{train,test,meta}`` (``torchvision.datasets.CIFAR100``
    downloads it when ``download=True``). Items: uint8 ``[N, 32, 32, 3]``. Class names =
    ``fine_label_names`` with ``_`` → space (spec §1.3). Template: ``a photo of a {c}.``
    """

    name = "cifar100"
    display_name = "CIFAR100"
    template = "a photo of a {c}."
    class_names = CIFAR100_FINE_NAMES
    files = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
    get_it = ("set data.download=true (torchvision downloads it), or extract cifar-100-python.tar.gz from "
              "https://www.cs.toronto.edu/~kriz/cifar.html into <root> (torchvision.datasets.CIFAR100)")

    def _official(self, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from torchvision.datasets import CIFAR100

        ds = CIFAR100(self.root, train=train, download=self.download)
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


class MNISTSource(_TorchvisionTrainValSource):
    """MNIST (10 classes): official test (10,000); train / val = 80/20 per class of the official train
    split (≈ 48,000 / 12,000), spec §1.2.

    Layout: torchvision's, ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (``torchvision.datasets.MNIST`` downloads it when ``download=True``). Items: uint8 ``[N, 28, 28]``
    (grey; made RGB by the image loader). Class names ``0 - zero`` … ``9 - nine`` (spec §1.3).
    Template: ``a photo of the number: "{c}".``
    """

    name = "mnist"
    display_name = "MNIST"
    template = 'a photo of the number: "{c}".'
    class_names = MNIST_NAMES
    files = tuple(f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    get_it = "set data.download=true (torchvision downloads it), or run torchvision.datasets.MNIST(<root>, download=True) once"

    def _official(self, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from torchvision.datasets import MNIST

        ds = MNIST(self.root, train=train, download=self.download)
        return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64), list(MNIST_NAMES)


# ----------------------------------------------------------------------------------------------
# Registry and orders (spec §1.1, §1.5)
# ----------------------------------------------------------------------------------------------

MTIL_SOURCES: dict[str, type] = {
    "aircraft": AircraftSource,
    "caltech101": Caltech101Source,
    "cifar100": CIFAR100Source,
    "dtd": DTDSource,
    "eurosat": EuroSATSource,
    "flowers": FlowersSource,
    "food": FoodSource,
    "mnist": MNISTSource,
    "oxford_pet": OxfordPetSource,
    "cars": CarsSource,
    "sun397": SUN397Source,
}

# Folder of each dataset under the data directory (CoOp's DATASETS.md names; cifar100/mnist: ours).
MTIL_DEFAULT_DIRS: dict[str, str] = {
    "aircraft": "fgvc_aircraft",
    "caltech101": "caltech-101",
    "cifar100": "cifar100",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "flowers": "oxford_flowers",
    "food": "food-101",
    "mnist": "mnist",
    "oxford_pet": "oxford_pets",
    "cars": "stanford_cars",
    "sun397": "sun397",
}

# Order I (DIKI ``datasets.py:34-39``; ``MTIL.yaml``).
MTIL_ORDER_I: tuple[str, ...] = (
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers",
    "food", "mnist", "oxford_pet", "cars", "sun397",
)
# Order II = order I permuted by this index list (ZSCL ``results.ipynb::statistics()``, same as DIKI).
MTIL_ORDER_II_PERMUTATION: tuple[int, ...] = (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)
MTIL_ORDER_II: tuple[str, ...] = (
    "cars", "food", "mnist", "oxford_pet", "flowers", "sun397",
    "aircraft", "caltech101", "dtd", "eurosat", "cifar100",
)
# MTIL-FS (``num_shots >= 1``): order I without EuroSAT, MNIST, OxfordPet (spec §1.1, §1.5).
MTIL_FEWSHOT_DATASETS: tuple[str, ...] = (
    "aircraft", "caltech101", "cifar100", "dtd", "flowers", "food", "cars", "sun397",
)
MTIL_FEWSHOT_SHOTS = 16  # configs/MTIL-FS.yaml; val uses fewshot_val_shots(16) = 4

MTIL_ORDERS: dict[str, tuple[str, ...]] = {"I": MTIL_ORDER_I, "II": MTIL_ORDER_II, "FS": MTIL_FEWSHOT_DATASETS}


def make_mtil_source(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    split_seed: int = 42,
    download: bool = True,
) -> Any:
    """Build the source registered as ``name`` (see :data:`MTIL_SOURCES`).

    ``root`` defaults to ``data_dir / MTIL_DEFAULT_DIRS[name]``; ``split_seed`` and ``download`` only
    reach CIFAR100 and MNIST (the other datasets have fixed split files).
    """
    if name not in MTIL_SOURCES:
        raise KeyError(f"unknown MTIL dataset {name!r}; choose from {', '.join(MTIL_SOURCES)}")
    cls = MTIL_SOURCES[name]
    path = root if root is not None else os.path.join(os.fspath(data_dir), MTIL_DEFAULT_DIRS[name])
    if issubclass(cls, _TorchvisionTrainValSource):
        return cls(path, split_seed=split_seed, download=download)
    return cls(path)
