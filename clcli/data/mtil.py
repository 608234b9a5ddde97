"""The eleven MTIL datasets as a table of facts (:data:`MTIL_DATASETS`) read by one generic
:class:`MTILSource`, the MTIL orders, and few-shot sampling.

MTIL (Multi-domain Task-Incremental Learning, introduced by ZSCL) trains a CLIP model on eleven image
datasets one after the other. This module follows the protocol of **DIKI** ("Mind the Interference:
Retaining Pre-trained Knowledge in Parameter Efficient Continual Learning of Vision-Language Models",
ECCV 2024, arXiv 2407.05342):

* **Splits.** DIKI uses the **CoOp** splits (Zhou et al., "Learning to Prompt for Vision-Language
  Models"): a ``split_zhou_<Name>.json`` file per dataset with keys ``"train"``, ``"val"`` and
  ``"test"``, each a list of ``[relative_image_path, label_int, classname]``. Exceptions:
  FGVC-Aircraft uses the official ``images_variant_{train,val,test}.txt`` lists, and CIFAR100 / MNIST
  use the official test set plus an 80/20 per-class split of the official training set.
* **ZSCL's splits** (``data.protocol=zscl``, ``MTILSource(splits="zscl")``): torchvision's train / test
  definitions, no val, read from the same folders by :mod:`clcli.data.mtil_zscl`.
* **Validation split of CIFAR100 / MNIST.** The reference re-shuffles these with the global ``random``
  state on every construction, so its val set overlaps its train set. Here the split is drawn once,
  from a dedicated ``random.Random(split_seed)`` (:func:`per_class_train_val_split`), and is identical
  however often and in whatever order the source is loaded — a documented deviation.
* **Class names** follow CoOp's conventions (Caltech renames, EuroSAT long names, Cars with the year in
  front, SUN397 path parts reversed, lower-cased pet breeds, ...). Label ids are the sorted labels of
  the train split (CoOp's ``get_lab2cname``). Names are stored *prompt-ready*: DIKI replaces ``_`` by a
  space after filling the template; we do it once, here, so ``template.format(c=name)`` is the prompt.
* **Templates.** DIKI uses only each dataset's *first* template (no ensemble): ``SourceInfo.templates[0]``.
* **Orders.** :data:`MTIL_ORDER_I`, :data:`MTIL_ORDER_II` (order I permuted by ZSCL's index list
  9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2), :data:`MTIL_FEWSHOT_DATASETS` (MTIL-FS, 8 datasets).
* **Few-shot.** :func:`few_shot` draws ``shots`` items per label with a dedicated seeded RNG (the
  reference uses the global ``random`` and, for CIFAR100 / MNIST, re-draws per construction).

The datasets differ in data, not behaviour, so each is a row of :data:`MTIL_DATASETS`
(:class:`MTILDataset`: folder, split file, naming rule, template, class count, expected layout, where
to get it); its ``listing`` picks one of three readers: ``coop`` (split json), ``aircraft`` (variant
lists) or ``torchvision`` (official CIFAR100 / MNIST files, which torchvision may download).

Nothing here downloads anything except the torchvision sources when ``download=True``. ``problems()``
only stats paths; ``load()`` reads split files (never decodes images: items are absolute path
strings, or uint8 arrays for CIFAR100 / MNIST) and reports a missing, unreadable or malformed dataset
as :class:`MissingDatasetError` (a :class:`clcli.errors.DataError`, which the CLI prints as a clean
message, that is also a ``FileNotFoundError``).

Config names: ``aircraft, caltech101, cifar100, dtd, eurosat, flowers, food, mnist, oxford_pet,
cars, sun397``; :func:`make_mtil_source` builds one from a data directory using
:data:`MTIL_DEFAULT_DIRS` (CoOp's folder names).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clcli.data.base import SourceInfo, SplitData
from clcli.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_KINDS = ("coop", "zscl")  # DIKI's CoOp splits | ZSCL's (clcli.data.mtil_zscl)

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
    """Split indices ``0..len(labels)-1`` into (train, val), stratified by label.

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
    """``shots`` items per label, drawn with a dedicated ``random.Random(seed)``.

    Labels are visited in ascending order and each draws ``rng.sample(indices_of_label, shots)``; a
    label with ``shots`` items or fewer keeps all of them. The result keeps the original item order.
    Deterministic for a given split and seed and independent of the global ``random`` state (the
    reference uses the global ``random.sample``).
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


def few_shot_reference(split: SplitData, shots: int, rng: random.Random) -> SplitData:
    """``shots`` items per label drawn as DIKI's code (CoOp's ``generate_fewshot_dataset``) draws them
    (docs/diki_mtil_protocol.md#few-shot-draws): labels are visited in the order they *first appear*
    in the split's item list, each draws ``rng.sample(items_of_label, shots)`` from the caller's
    stream (the reference: the global ``random`` seeded 42 once), and a label with fewer than
    ``shots`` items keeps all of them. The items keep the draw order (label by label, sampled
    order), as the reference's list does. ``rng`` is advanced: the next draw continues the stream."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_label: dict[int, list[int]] = {}
    for i, lab in enumerate(np.asarray(split.labels).tolist()):
        by_label.setdefault(int(lab), []).append(i)
    picked: list[int] = []
    for idx in by_label.values():  # insertion order = first appearance
        picked.extend(rng.sample(idx, shots) if len(idx) >= shots else idx)
    return split.subset(picked)


def fewshot_val_shots(shots: int) -> int:
    """Shots of the few-shot *validation* split: ``min(shots, 4)``."""
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


# ----------------------------------------------------------------------------------------------
# Naming rules of the CoOp-split datasets: (json class name, relative image path) -> prompt-ready name
# ----------------------------------------------------------------------------------------------


def coop_name(classname: str, relpath: str) -> str:
    """The split file's name, ``_`` → space (DTD, Flowers, Food)."""
    return prompt_name(classname)


CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def caltech_name(classname: str, relpath: str) -> str:
    """CoOp's renames, applied again so that raw folder names work too."""
    return prompt_name(CALTECH_RENAMES.get(classname, classname))


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


def eurosat_name(classname: str, relpath: str) -> str:
    """CoOp's long names (the json already carries them; raw folder names are mapped)."""
    return prompt_name(EUROSAT_NAMES.get(classname, classname))


def pet_name(classname: str, relpath: str) -> str:
    """The lower-cased breed: the json's name, or the file name without its ``_<n>`` suffix."""
    if not classname:
        classname = os.path.splitext(os.path.basename(relpath))[0].rsplit("_", 1)[0]
    return prompt_name(classname.lower())


_YEAR = re.compile(r"^(19|20)\d\d$")


def cars_year_first(name: str) -> str:
    """``Tesla Model S Sedan 2012`` → ``2012 Tesla Model S Sedan`` (CoOp's StanfordCars names);
    a name that already starts with a year is unchanged."""
    parts = name.split()
    if len(parts) >= 2 and _YEAR.match(parts[-1]) and not _YEAR.match(parts[0]):
        parts = [parts[-1]] + parts[:-1]
    return " ".join(parts)


def cars_name(classname: str, relpath: str) -> str:
    return prompt_name(cars_year_first(classname))


def sun397_name_from_path(relpath: str) -> str:
    """``b/bakery/shop/sun_x.jpg`` → ``shop bakery``: the path parts after the letter folder, reversed
    (CoOp's SUN397 names)."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p]
    return prompt_name(" ".join(reversed(parts[1:-1])))


def sun397_name(classname: str, relpath: str) -> str:
    return sun397_name_from_path(relpath) or prompt_name(classname)


# ----------------------------------------------------------------------------------------------
# CIFAR100 and MNIST: torchvision's official files
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


def cifar100_official(root: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-100's official train or test split through torchvision: uint8 ``[N, 32, 32, 3]``."""
    from torchvision.datasets import CIFAR100

    ds = CIFAR100(root, train=train, download=download)
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def mnist_official(root: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MNIST's official train or test split through torchvision: uint8 ``[N, 28, 28]`` (grey)."""
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=train, download=download)
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64), list(MNIST_NAMES)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTILDataset:
    """What distinguishes one MTIL dataset. ``listing`` picks the reader: ``coop`` (a CoOp split json,
    images under ``image_dir``), ``aircraft`` (FGVC-Aircraft's variant lists) or ``torchvision``
    (``official`` files; val = ``val_fraction`` of every class of the official train split)."""

    folder: str  # default folder under the data directory (CoOp's DATASETS.md names)
    template: str  # DIKI's first template, with a {c} placeholder
    num_classes: int  # DIKI's class count (another count in the files is logged)
    layout: str  # the expected files, reported by problems()
    get_it: str  # where to get them, reported by problems()
    listing: str = "coop"
    split_file: str = ""  # coop: the split json under the root
    image_dir: str = ""  # coop: folder the json's relative paths start from ("" = the root)
    required_dirs: tuple[str, ...] = ()  # coop: folders that must exist under the root
    class_name: Callable[[str, str], str] = coop_name  # coop: naming rule
    ignored: tuple[str, ...] = ()  # coop: classes (or top folders) that are not part of the dataset
    class_names: tuple[str, ...] = ()  # names known without reading the files (static info)
    official: Callable | None = None  # torchvision: (root, train, download) -> (images, labels, names)
    files: tuple[str, ...] = ()  # torchvision: files under the root, checked when download=False


COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
_COOP = f"split file via CoOp's DATASETS.md ({COOP_DATASETS_MD})"


def _coop_layout(images: str, split_file: str, relative_to: str) -> str:
    return f"<root>/{images} and <root>/{split_file} (CoOp format, paths relative to {relative_to})"


_MNIST_FILES = tuple(f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
_CIFAR_FILES = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")

MTIL_DATASETS: dict[str, MTILDataset] = {
    "aircraft": MTILDataset(  # variant level, official lists 3,334 / 3,333 / 3,333; labels in variants.txt order
        "fgvc_aircraft", "a photo of a {c}, a type of aircraft.", 100, listing="aircraft",
        layout="<root>/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_train.txt, "
               "images_variant_val.txt, images_variant_test.txt} (or the same files directly under <root>, "
               "CoOp's layout)",
        get_it="fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ extracted "
               "into <root>, or torchvision.datasets.FGVCAircraft(<root>, download=True)"),
    "caltech101": MTILDataset(  # CoOp's 100 classes (ZSCL has 101)
        "caltech-101", "a photo of a {c}.", 100, split_file="split_zhou_Caltech101.json",
        image_dir="101_ObjectCategories", required_dirs=("101_ObjectCategories",), class_name=caltech_name,
        ignored=("BACKGROUND_Google", "Faces_easy"),
        layout=_coop_layout("101_ObjectCategories/<category>/*.jpg", "split_zhou_Caltech101.json",
                            "101_ObjectCategories/"),
        get_it="101_ObjectCategories from the official Caltech101 page (https://data.caltech.edu/records/"
               "mzrjq-6wc02) or torchvision.datasets.Caltech101(<dir>, download=True), which creates "
               f"<dir>/caltech101/101_ObjectCategories; {_COOP}"),
    "cifar100": MTILDataset(  # official test 10,000; train / val 40,000 / 10,000
        "cifar100", "a photo of a {c}.", 100, listing="torchvision", class_names=tuple(CIFAR100_FINE_NAMES),
        official=cifar100_official, files=_CIFAR_FILES, layout=", ".join(f"<root>/{f}" for f in _CIFAR_FILES),
        get_it="set data.download=true (torchvision downloads it), or extract cifar-100-python.tar.gz from "
               "https://www.cs.toronto.edu/~kriz/cifar.html into <root> (torchvision.datasets.CIFAR100)"),
    "dtd": MTILDataset(
        "dtd", "a photo of a {c} texture.", 47, split_file="split_zhou_DescribableTextures.json",
        image_dir="images", required_dirs=("images",),
        layout=_coop_layout("images/<texture>/*.jpg", "split_zhou_DescribableTextures.json", "images/"),
        get_it="dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ (its dtd/ folder is the root), "
               f"or torchvision.datasets.DTD(<dir>, download=True), which creates <dir>/dtd/dtd/images; {_COOP}"),
    "eurosat": MTILDataset(
        "eurosat", "a centered satellite photo of {c}.", 10, split_file="split_zhou_EuroSAT.json",
        image_dir="2750", required_dirs=("2750",), class_name=eurosat_name, class_names=tuple(EUROSAT_NAMES.values()),
        layout=_coop_layout("2750/<Class>/*.jpg", "split_zhou_EuroSAT.json", "2750/"),
        get_it="EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT, or torchvision.datasets.EuroSAT(<dir>, "
               f"download=True), which creates <dir>/eurosat/2750; {_COOP}"),
    "flowers": MTILDataset(  # names of the split file, which CoOp took from cat_to_name.json
        "oxford_flowers", "a photo of a {c}, a type of flower.", 102, split_file="split_zhou_OxfordFlowers.json",
        image_dir="jpg", required_dirs=("jpg",),
        layout=_coop_layout("jpg/image_*.jpg", "split_zhou_OxfordFlowers.json", "jpg/; names from cat_to_name.json"),
        get_it="102flowers.tgz from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, or "
               "torchvision.datasets.Flowers102(<dir>, download=True), which creates <dir>/flowers-102/jpg; "
               f"split file and cat_to_name.json via CoOp's DATASETS.md ({COOP_DATASETS_MD})"),
    "food": MTILDataset(
        "food-101", "a photo of a {c}, a type of food.", 101, split_file="split_zhou_Food101.json",
        image_dir="images", required_dirs=("images",),
        layout=_coop_layout("images/<dish>/*.jpg", "split_zhou_Food101.json", "images/"),
        get_it="food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, or "
               f"torchvision.datasets.Food101(<dir>, download=True), which creates <dir>/food-101/images; {_COOP}"),
    "mnist": MTILDataset(  # official test 10,000; train / val ≈ 48,000 / 12,000
        "mnist", 'a photo of the number: "{c}".', 10, listing="torchvision", class_names=tuple(MNIST_NAMES),
        official=mnist_official, files=_MNIST_FILES, layout=", ".join(f"<root>/{f}" for f in _MNIST_FILES),
        get_it="set data.download=true (torchvision downloads it), or run torchvision.datasets.MNIST(<root>, "
               "download=True) once"),
    "oxford_pet": MTILDataset(
        "oxford_pets", "a photo of a {c}, a type of pet.", 37, split_file="split_zhou_OxfordPets.json",
        image_dir="images", required_dirs=("images",), class_name=pet_name,
        layout=_coop_layout("images/<Breed>_<n>.jpg", "split_zhou_OxfordPets.json", "images/"),
        get_it="images.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, or torchvision.datasets."
               f"OxfordIIITPet(<dir>, download=True), which creates <dir>/oxford-iiit-pet/images; {_COOP}"),
    "cars": MTILDataset(  # make/model with the year moved to the front
        "stanford_cars", "a photo of a {c}, a type of car.", 196, split_file="split_zhou_StanfordCars.json",
        required_dirs=("cars_train", "cars_test"), class_name=cars_name,
        layout=_coop_layout("cars_train/*.jpg, <root>/cars_test/*.jpg", "split_zhou_StanfordCars.json",
                            "<root>, e.g. cars_train/00001.jpg"),
        get_it="the Stanford Cars images (cars_train.tgz, cars_test.tgz; the official page is offline — see CoOp's "
               "DATASETS.md or torchvision.datasets.StanfordCars' notes for mirrors, which give "
               f"<dir>/stanford_cars/cars_train); {_COOP}"),
    "sun397": MTILDataset(  # names from each image's path: b/bakery/shop -> "shop bakery"
        "sun397", "a photo of a {c}.", 397, split_file="split_zhou_SUN397.json", image_dir="SUN397",
        required_dirs=("SUN397",), class_name=sun397_name,
        layout=_coop_layout("SUN397/<letter>/<scene>[/<sub>]/*.jpg", "split_zhou_SUN397.json", "SUN397/"),
        get_it="SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/, or torchvision.datasets."
               f"SUN397(<dir>, download=True), which creates <dir>/SUN397; {_COOP}"),
}
MTIL_DEFAULT_DIRS: dict[str, str] = {name: d.folder for name, d in MTIL_DATASETS.items()}

# The template lists ZSCL evaluates with (its ``protocol=zscl`` ensemble, docs/diki_mtil_protocol.md#the-protocol-choice):
# CLIP's published prompt lists per dataset; the first entry of each is DIKI's single template (the
# ``template`` of MTIL_DATASETS) and is also ZSCL's training prompt. Counts 2/34/18/8/3/1/1/1/1/9/2.
# Cars: "…, a type of car." followed by CLIP's eight car prompts (the count of 9 is ZSCL's; the list is
# our reading of it).
_OBJECT_34 = tuple(f"{p} {{c}}{e}" for p, e in [
    ("a photo of a", "."), ("a painting of a", "."), ("a plastic", "."), ("a sculpture of a", "."),
    ("a sketch of a", "."), ("a tattoo of a", "."), ("a toy", "."), ("a rendition of a", "."),
    ("a embroidered", "."), ("a cartoon", "."), ("a", " in a video game."), ("a plushie", "."),
    ("a origami", "."), ("art of a", "."), ("graffiti of a", "."), ("a drawing of a", "."),
    ("a doodle of a", "."), ("a photo of the", "."), ("a painting of the", "."), ("the plastic", "."),
    ("a sculpture of the", "."), ("a sketch of the", "."), ("a tattoo of the", "."), ("the toy", "."),
    ("a rendition of the", "."), ("the embroidered", "."), ("the cartoon", "."), ("the", " in a video game."),
    ("the plushie", "."), ("the origami", "."), ("art of the", "."), ("graffiti of the", "."),
    ("a drawing of the", "."), ("a doodle of the", ".")])
_CIFAR_18 = tuple(f"a {q}photo of {a} {s}{{c}}." for a in ("a", "the") for q, s in [
    ("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""), ("high contrast ", ""),
    ("bad ", ""), ("good ", ""), ("", "small "), ("", "big ")])
ZSCL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "aircraft": ("a photo of a {c}, a type of aircraft.", "a photo of the {c}, a type of aircraft."),
    "caltech101": _OBJECT_34,
    "cifar100": _CIFAR_18,
    "dtd": tuple(f"a photo of {a} {{c}} {w}." for a in ("a", "the") for w in ("texture", "pattern", "thing", "object")),
    "eurosat": ("a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."),
    "flowers": ("a photo of a {c}, a type of flower.",),
    "food": ("a photo of a {c}, a type of food.",),
    "mnist": ('a photo of the number: "{c}".',),
    "oxford_pet": ("a photo of a {c}, a type of pet.",),
    "cars": ("a photo of a {c}, a type of car.", "a photo of a {c}.", "a photo of the {c}.", "a photo of my {c}.",
             "i love my {c}!", "a photo of my dirty {c}.", "a photo of my clean {c}.", "a photo of my new {c}.",
             "a photo of my old {c}."),
    "sun397": ("a photo of a {c}.", "a photo of the {c}."),
}


# ----------------------------------------------------------------------------------------------
# The three readers and the generic source
# ----------------------------------------------------------------------------------------------


def _aircraft_dir(root: str) -> str:
    """``root/fgvc-aircraft-2013b/data`` if it exists, else ``root`` when it holds CoOp's flat layout."""
    official = os.path.join(root, "fgvc-aircraft-2013b", "data")
    if not os.path.isdir(official) and os.path.isfile(os.path.join(root, "variants.txt")):
        return root
    return official


def _missing_files(src: MTILSource) -> list[tuple[str, str]]:
    """(what, path) of everything the dataset's listing needs that is not on disk (stat calls only)."""
    d, root = src.facts, src.root
    if d.listing == "torchvision":
        return [] if src.download else [("file", os.path.join(root, f)) for f in d.files
                                         if not os.path.isfile(os.path.join(root, f))]
    if not os.path.isdir(root):
        return [("dataset folder", root)]
    if d.listing == "aircraft":
        data = _aircraft_dir(root)
        dirs, files = [os.path.join(data, "images")], ["variants.txt"] + [f"images_variant_{s}.txt" for s in SPLITS]
        return [("image folder", p) for p in dirs if not os.path.isdir(p)] + \
            [("file", os.path.join(data, f)) for f in files if not os.path.isfile(os.path.join(data, f))]
    missing = [("image folder", os.path.join(root, p)) for p in d.required_dirs
               if not os.path.isdir(os.path.join(root, p))]
    if not os.path.isfile(os.path.join(root, d.split_file)):
        missing.append(("CoOp split file", os.path.join(root, d.split_file)))
    return missing


def _read_coop(src: MTILSource) -> tuple[dict[str, SplitData], list[str]]:
    d = src.facts
    path = os.path.join(src.root, d.split_file)
    raw = read_coop_split(path)
    rows = {s: [(rel, lab, d.class_name(c, rel)) for rel, lab, c in raw[s]
                if rel.replace("\\", "/").split("/")[0] not in d.ignored and c not in d.ignored] for s in SPLITS}
    mapping, names = _index_labels(rows, path)
    base = os.path.join(src.root, d.image_dir) if d.image_dir else src.root
    data = {s: SplitData([os.path.normpath(os.path.join(base, rel)) for rel, _, _ in rows[s]],
                         np.array([mapping[lab] for _, lab, _ in rows[s]], dtype=np.int64)) for s in SPLITS}
    return data, [names[lab] for lab in sorted(mapping)]


def read_aircraft(d: str, splits: Sequence[str] = SPLITS) -> tuple[dict[str, SplitData], list[str]]:
    """FGVC-Aircraft's lists under ``d``: label = index of the variant in ``variants.txt``; lines
    ``<image id> <variant>`` in ``images_variant_<split>.txt``."""
    with open(os.path.join(d, "variants.txt"), encoding="utf-8") as f:
        variants = [line.strip() for line in f if line.strip()]
    index = {v: i for i, v in enumerate(variants)}
    data = {}
    for s in splits:
        path = os.path.join(d, f"images_variant_{s}.txt")
        items, labels = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                image_id, _, variant = line.strip().partition(" ")
                if not image_id:
                    continue
                if variant not in index:
                    raise ValueError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
                items.append(os.path.join(d, "images", image_id + ".jpg"))
                labels.append(index[variant])
        data[s] = SplitData(items, np.array(labels, dtype=np.int64))
    return data, [prompt_name(v) for v in variants]


def _read_aircraft(src: MTILSource) -> tuple[dict[str, SplitData], list[str]]:
    return read_aircraft(_aircraft_dir(src.root))


def _read_torchvision(src: MTILSource) -> tuple[dict[str, SplitData], list[str]]:
    """Official test; train / val = a per-class split of the official train set, drawn once."""
    x, y, names = src.facts.official(src.root, False, src.download)
    data = {"test": SplitData(x, y)}
    x, y, _ = src.facts.official(src.root, True, src.download)
    train, val = per_class_train_val_split(y, src.val_fraction, src.split_seed)
    data.update(train=SplitData(x[train], y[train]), val=SplitData(x[val], y[val]))
    return data, [prompt_name(c) for c in names]


_READERS = {"coop": _read_coop, "aircraft": _read_aircraft, "torchvision": _read_torchvision}


class MTILSource:
    """One MTIL dataset under ``root`` (a :class:`~clcli.data.base.Source`), described by its row of
    :data:`MTIL_DATASETS` (``facts`` replaces it). Files are read on the first :meth:`load` — or on
    the first :attr:`info` where class names come from the files (not the torchvision datasets,
    whose read may download); ``split_seed``, ``download`` and ``val_fraction`` concern the
    torchvision datasets only. ``splits``: ``coop`` (DIKI's protocol, train / val / test) or ``zscl``
    (ZSCL's train / test with an empty val, :mod:`clcli.data.mtil_zscl`)."""

    def __init__(self, name: str, root: str | os.PathLike[str], split_seed: int = 42, download: bool = True,
                 val_fraction: float = 0.2, facts: MTILDataset | None = None, splits: str = "coop") -> None:
        if splits not in SPLIT_KINDS:
            raise ValueError(f"{name}: splits must be one of {', '.join(SPLIT_KINDS)}, got {splits!r}")
        self.name, self.facts, self.splits = name, facts or MTIL_DATASETS[name], splits
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.split_seed, self.download, self.val_fraction = int(split_seed), bool(download), float(val_fraction)
        self._info = SourceInfo(name, self.expected_classes, [prompt_name(c) for c in self.facts.class_names],
                                [self.facts.template])
        self._data: dict[str, SplitData] | None = None

    @property
    def info(self) -> SourceInfo:
        """Static facts; class names (and their count) from the files once read."""
        if self._data is None and self.facts.listing != "torchvision" and not self.problems():
            self._read()
        return self._info

    @property
    def expected_classes(self) -> int:
        """The protocol's class count (Caltech101: 100 under CoOp's split, 101 under ZSCL's)."""
        if self.splits == "zscl":
            from clcli.data.mtil_zscl import ZSCL_SPLITS

            return ZSCL_SPLITS[self.name].num_classes
        return self.facts.num_classes

    def problems(self) -> list[str]:
        """What is missing on disk, with the expected layout and where to get it."""
        if self.splits == "zscl":
            from clcli.data.mtil_zscl import zscl_problems

            return zscl_problems(self)
        return self.coop_problems()

    def coop_problems(self) -> list[str]:
        """What the CoOp split (DIKI's protocol) lacks on disk."""
        d = self.facts
        return [f"{self.name}: {what} {path} is missing. Expected layout: {d.layout}. Get it: "
                + (f"download {d.split_file} from the links in CoOp's DATASETS.md ({COOP_DATASETS_MD}) and put it "
                   f"in {self.root}" if what == "CoOp split file" else d.get_it)
                for what, path in _missing_files(self)]

    def load(self, split: str) -> SplitData:
        if split not in SPLITS:
            raise KeyError(f"{self.name}: unknown split {split!r} (train, val or test)")
        if self._data is None:
            problems = self.problems()
            if problems:
                raise MissingDatasetError("\n".join(problems))
            self._read()
        return self._data[split]

    def _read(self) -> None:
        try:
            if self.splits == "zscl":
                from clcli.data.mtil_zscl import ZSCL_SPLITS

                self._data, names = ZSCL_SPLITS[self.name].read(self)
            else:
                self._data, names = _READERS[self.facts.listing](self)
        except (OSError, ValueError, RuntimeError) as exc:  # unreadable, malformed, or a failed download
            raise MissingDatasetError(f"{self.name}: cannot read the files under {self.root} "
                                      f"({type(exc).__name__}: {exc}). Get it: {self.facts.get_it}") from exc
        if self._info.class_names and names != self._info.class_names:
            log.warning("%s: the class names in the files differ from the built-in list; using the files'", self.name)
        if len(names) != self.expected_classes:
            log.warning("%s: %d classes under %s, %s's protocol has %d", self.name, len(names), self.root,
                        "ZSCL" if self.splits == "zscl" else "DIKI", self.expected_classes)
        self._info = SourceInfo(self.name, len(names), names, [self.facts.template])


# ----------------------------------------------------------------------------------------------
# Orders
# ----------------------------------------------------------------------------------------------

# Order I (DIKI ``datasets.py:34-39``; ``MTIL.yaml``).
MTIL_ORDER_I: tuple[str, ...] = (
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers",
    "food", "mnist", "oxford_pet", "cars", "sun397",
)
# Order II = order I permuted by [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2] (ZSCL ``results.ipynb::statistics()``,
# same as DIKI).
MTIL_ORDER_II: tuple[str, ...] = (
    "cars", "food", "mnist", "oxford_pet", "flowers", "sun397",
    "aircraft", "caltech101", "dtd", "eurosat", "cifar100",
)
# MTIL-FS (``num_shots >= 1``): order I without EuroSAT, MNIST, OxfordPet
# (docs/diki_mtil_protocol.md#few-shot-variant).
MTIL_FEWSHOT_DATASETS: tuple[str, ...] = (
    "aircraft", "caltech101", "cifar100", "dtd", "flowers", "food", "cars", "sun397",
)
MTIL_FEWSHOT_SHOTS = 16  # configs/MTIL-FS.yaml; val uses fewshot_val_shots(16) = 4

MTIL_ORDERS: dict[str, tuple[str, ...]] = {"I": MTIL_ORDER_I, "II": MTIL_ORDER_II, "FS": MTIL_FEWSHOT_DATASETS}


def make_mtil_source(name: str, data_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                     split_seed: int = 42, download: bool = True, splits: str = "coop") -> MTILSource:
    """The source of dataset ``name`` (a key of :data:`MTIL_DATASETS`) under ``root``, by default
    ``data_dir / MTIL_DEFAULT_DIRS[name]``; ``split_seed`` and ``download`` only reach CIFAR100 and MNIST;
    ``splits``: ``coop`` (DIKI) or ``zscl``."""
    if name not in MTIL_DATASETS:
        raise KeyError(f"unknown MTIL dataset {name!r}; choose from {', '.join(MTIL_DATASETS)}")
    path = root if root is not None else os.path.join(os.fspath(data_dir), MTIL_DEFAULT_DIRS[name])
    return MTILSource(name, path, split_seed=split_seed, download=download, splits=splits)
