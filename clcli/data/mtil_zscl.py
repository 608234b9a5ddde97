"""ZSCL's train / test splits of the eleven MTIL datasets (``data.protocol=zscl``), read from the
folders clcli documents for DIKI (CoOp's layout), as torchvision's dataset classes define them
(docs/diki_mtil_protocol.md#zscls-splits).

Every dataset is a row of :data:`ZSCL_SPLITS` (:class:`ZSCLSplit`: reader, files it needs, where to
get the ones CoOp's layout lacks, where its class names come from). ZSCL has no validation split: the
``val`` split is empty. Three datasets have no official split: Caltech101 (all 101 categories),
EuroSAT and SUN397 are split by :func:`zscl_random_split` — ``torch.utils.data.random_split`` of the
whole list into ``int(0.8 * n)`` / the rest with ``torch.Generator().manual_seed(42)``. SUN397's list
is sorted by path here; torchvision's is in ``rglob`` order, which depends on the filesystem, so the
reference's SUN397 membership is not reproducible across machines (a documented deviation).

Readers never decode images; they return absolute paths (or CIFAR100 / MNIST arrays) and raise
``OSError`` / ``ValueError`` for unreadable or malformed files, which :class:`clcli.data.mtil.MTILSource`
reports as :class:`clcli.data.mtil.MissingDatasetError`.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clcli.data import mtil
from clcli.data.base import SplitData

ZSCL_SPLIT_RATIO = 0.8  # train share of the random split (the rest is test)
ZSCL_SPLIT_SEED = 42  # seed of the random split's torch.Generator

Listing = tuple[dict[str, SplitData], list[str]]


def zscl_random_split(n: int) -> tuple[list[int], list[int]]:
    """(train, test) indices of ``n`` items, equal to ``random_split(range(n), [int(0.8 * n),
    n - int(0.8 * n)], generator=torch.Generator().manual_seed(42))``: one ``randperm`` of ``n``,
    its first ``int(0.8 * n)`` entries train, the rest test, in permutation order."""
    import torch

    n_train = int(ZSCL_SPLIT_RATIO * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ZSCL_SPLIT_SEED)).tolist()
    return perm[:n_train], perm[n_train:]


def _split(rows: dict[str, tuple[list, list]]) -> dict[str, SplitData]:
    out = {s: SplitData(items, np.asarray(labels, dtype=np.int64)) for s, (items, labels) in rows.items()}
    out["val"] = SplitData([], np.zeros(0, dtype=np.int64))  # ZSCL selects no epoch: no val split
    return out


def _random_split(items: list[str], labels: list[int]) -> dict[str, SplitData]:
    train, test = zscl_random_split(len(items))
    return _split({s: ([items[i] for i in idx], [labels[i] for i in idx]) for s, idx in (("train", train),
                                                                                          ("test", test))})


def _ranked(rows: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, SplitData], list[str]]:
    """(path, class) rows → labels = rank of the class among the sorted classes of train ∪ test
    (torchvision sorts per split; the union keeps ids consistent if a split lacks a class)."""
    classes = sorted({c for r in rows.values() for _, c in r})
    index = {c: i for i, c in enumerate(classes)}
    return _split({s: ([p for p, _ in r], [index[c] for _, c in r]) for s, r in rows.items()}), classes


def _mat(path: str, key: str) -> np.ndarray:
    """Variable ``key`` of a MATLAB file as a 1-d array (scipy's ``loadmat``, squeezed)."""
    from scipy.io import loadmat

    content = loadmat(path, squeeze_me=True)
    if key not in content:
        raise ValueError(f"{path}: no variable {key!r} (found {sorted(k for k in content if not k.startswith('__'))})")
    return np.atleast_1d(content[key])


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------- readers


def _aircraft(src) -> Listing:
    """``images_variant_train.txt`` / ``images_variant_test.txt`` (torchvision FGVCAircraft train / test)."""
    data, names = mtil.read_aircraft(mtil._aircraft_dir(src.root), ("train", "test"))
    return {**data, "val": SplitData([], np.zeros(0, dtype=np.int64))}, names


# The two names the spec gives for the face categories; the other 99 keep CoOp's (caltech_name).
CALTECH_ZSCL_FACES = {"Faces": "off-center face", "Faces_easy": "centered face"}


def _caltech(src) -> Listing:
    """torchvision Caltech101: categories = sorted folders of ``101_ObjectCategories`` except
    ``BACKGROUND_Google`` (101, Faces and Faces_easy kept), items ``image_0001.jpg`` …
    ``image_<n>.jpg`` with n = the folder's entry count; then the seeded 80/20 random split."""
    folder = os.path.join(src.root, "101_ObjectCategories")
    cats = sorted(c for c in os.listdir(folder) if c != "BACKGROUND_Google" and os.path.isdir(os.path.join(folder, c)))
    items, labels = [], []
    for i, c in enumerate(cats):
        n = len(os.listdir(os.path.join(folder, c)))
        items += [os.path.join(folder, c, f"image_{k:04d}.jpg") for k in range(1, n + 1)]
        labels += [i] * n
    return _random_split(items, labels), [CALTECH_ZSCL_FACES.get(c) or mtil.caltech_name(c, "") for c in cats]


def _dtd(src) -> Listing:
    """torchvision DTD partition 1: ``labels/train1.txt`` / ``labels/test1.txt``, lines ``<class>/<file>``."""
    rows = {}
    for s in ("train", "test"):
        path = os.path.join(src.root, "labels", f"{s}1.txt")
        rows[s] = []
        for n, line in enumerate(_lines(path), 1):
            parts = line.split("/")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected <class>/<file>, got {line!r}")
            rows[s].append((os.path.join(src.root, "images", *parts), parts[0]))
    data, classes = _ranked(rows)
    return data, [mtil.prompt_name(c) for c in classes]


def _eurosat(src) -> Listing:
    """torchvision EuroSAT (an ImageFolder over ``2750/``): classes = sorted sub-folders, each walked
    in sorted order keeping image extensions; then the seeded 80/20 random split."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = os.path.join(src.root, "2750")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    items, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, c), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    items.append(os.path.join(dirpath, f))
                    labels.append(i)
    return _random_split(items, labels), [mtil.eurosat_name(c, "") for c in classes]


def _flowers(src) -> Listing:
    """torchvision Flowers102: ``setid.mat`` ``trnid`` / ``tstid`` (1,020 / 6,149), labels from
    ``imagelabels.mat`` minus 1, images ``jpg/image_<id:05d>.jpg``; names from ``cat_to_name.json``."""
    labels = (_mat(os.path.join(src.root, "imagelabels.mat"), "labels") - 1).tolist()
    of = dict(enumerate(labels, 1))
    rows = {}
    for s, key in (("train", "trnid"), ("test", "tstid")):
        image_ids = _mat(os.path.join(src.root, "setid.mat"), key).tolist()
        bad = [i for i in image_ids if i not in of]
        if bad:
            raise ValueError(f"setid.mat {key}: image ids {bad[:5]} have no label in imagelabels.mat")
        rows[s] = ([os.path.join(src.root, "jpg", f"image_{i:05d}.jpg") for i in image_ids], [of[i] for i in image_ids])
    path = os.path.join(src.root, "cat_to_name.json")
    with open(path, encoding="utf-8") as f:
        cat_to_name = json.load(f)
    missing = [k + 1 for k in range(max(labels) + 1) if str(k + 1) not in cat_to_name]
    if missing:
        raise ValueError(f"{path}: no name for labels {missing[:5]}")
    return _split(rows), [mtil.prompt_name(cat_to_name[str(k + 1)]) for k in range(max(labels) + 1)]


def _food(src) -> Listing:
    """torchvision Food101: ``meta/train.json`` / ``meta/test.json`` ({class: ["class/id", …]}),
    images ``images/<class>/<id>.jpg``."""
    rows = {}
    for s in ("train", "test"):
        with open(os.path.join(src.root, "meta", f"{s}.json"), encoding="utf-8") as f:
            meta = json.load(f)
        rows[s] = [(os.path.join(src.root, "images", *f"{rel}.jpg".split("/")), c) for c, rels in meta.items()
                   for rel in rels]
    data, classes = _ranked(rows)
    return data, [mtil.prompt_name(c) for c in classes]


def _pet(src) -> Listing:
    """torchvision OxfordIIITPet: ``annotations/trainval.txt`` / ``test.txt``, lines ``<id> <class 1..37>
    <species> <breed>``, label = class − 1; names = CoOp's lower-cased breed of each label."""
    rows, names = {}, {}
    for s, f in (("train", "trainval"), ("test", "test")):
        path = os.path.join(src.root, "annotations", f"{f}.txt")
        items, labels = [], []
        for n, line in enumerate(_lines(path), 1):
            parts = line.split()
            if line.startswith("#"):
                continue
            if len(parts) != 4 or not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: expected '<image id> <class id> <species> <breed id>', got {line!r}")
            items.append(os.path.join(src.root, "images", parts[0] + ".jpg"))
            labels.append(int(parts[1]) - 1)
            names.setdefault(labels[-1], mtil.pet_name("", parts[0]))
        rows[s] = (items, labels)
    gaps = sorted(set(range(max(names) + 1)) - set(names))
    if gaps:
        raise ValueError(f"{src.root}/annotations: class ids {[g + 1 for g in gaps[:5]]} never occur")
    return _split(rows), [names[k] for k in range(len(names))]


def _cars(src) -> Listing:
    """torchvision StanfordCars: ``devkit/cars_train_annos.mat`` (images ``cars_train/``) and
    ``cars_test_annos_withlabels.mat`` (``cars_test/``), label = ``class`` − 1; names =
    ``devkit/cars_meta.mat`` ``class_names`` (torchvision's, as ZSCL uses them)."""
    rows = {}
    for s, mat in (("train", os.path.join("devkit", "cars_train_annos.mat")), ("test", "cars_test_annos_withlabels.mat")):
        annos = _mat(os.path.join(src.root, mat), "annotations")
        if not {"fname", "class"} <= set(annos.dtype.names or ()):
            raise ValueError(f"{mat}: annotations need the fields fname and class, got {annos.dtype.names}")
        rows[s] = ([os.path.join(src.root, f"cars_{s}", str(a["fname"])) for a in annos],
                   [int(a["class"]) - 1 for a in annos])
    names = _mat(os.path.join(src.root, "devkit", "cars_meta.mat"), "class_names").tolist()
    return _split(rows), [mtil.prompt_name(c) for c in names]


def _sun397(src) -> Listing:
    """torchvision SUN397: classes = ``SUN397/ClassName.txt`` lines without their ``/<letter>/`` prefix
    (``bakery/shop``); images = every ``sun_*.jpg`` under ``SUN397/``, labelled by the path between
    the letter folder and the file, **sorted by path** (torchvision: ``rglob`` order); then the
    seeded 80/20 random split."""
    folder = os.path.join(src.root, "SUN397")
    classes = [line[3:].strip() for line in _lines(os.path.join(folder, "ClassName.txt"))]
    index = {c: i for i, c in enumerate(classes)}
    rels = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                  for d, _, files in os.walk(folder) for f in files if fnmatch.fnmatchcase(f, "sun_*.jpg"))
    labels = []
    for rel in rels:
        c = "/".join(rel.split("/")[1:-1])
        if c not in index:
            raise ValueError(f"{folder}/{rel}: class {c!r} is not in ClassName.txt")
        labels.append(index[c])
    return _random_split([os.path.join(folder, *r.split("/")) for r in rels], labels), \
        [mtil.prompt_name(c) for c in classes]


def _official(src) -> Listing:
    """CIFAR100 / MNIST: torchvision's official train / test files (no val carve-out)."""
    data = {}
    for s, train in (("train", True), ("test", False)):
        x, y, names = src.facts.official(src.root, train, src.download)
        data[s] = SplitData(x, y)
    data["val"] = SplitData(data["train"].items[:0], data["train"].labels[:0])
    return data, [mtil.prompt_name(c) for c in names]


# ---------------------------------------------------------------------------------------- the table

_VGG_FLOWERS = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


@dataclass(frozen=True)
class ZSCLSplit:
    """How ZSCL splits one dataset: ``read(source)``, the files / folders (trailing ``/``) it needs
    under the root, where to get those CoOp's layout may lack, ZSCL's class count, and where the class
    names come from (``zscl``: as ZSCL names them; ``coop``: clcli's names, ZSCL's full list unknown)."""

    read: Callable[..., Listing]
    needs: tuple[str, ...]
    get_it: str
    num_classes: int
    class_names: str = "zscl"


ZSCL_SPLITS: dict[str, ZSCLSplit] = {
    "aircraft": ZSCLSplit(_aircraft, ("images/", "variants.txt", "images_variant_train.txt",
                                      "images_variant_test.txt"), "", 100),
    "caltech101": ZSCLSplit(_caltech, ("101_ObjectCategories/",), "", 101, class_names="coop"),
    "cifar100": ZSCLSplit(_official, (), "", 100),
    "dtd": ZSCLSplit(_dtd, ("images/", "labels/train1.txt", "labels/test1.txt"),
                     "the labels/ folder of dtd-r1.0.1.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/dtd/)", 47),
    "eurosat": ZSCLSplit(_eurosat, ("2750/",), "", 10, class_names="coop"),
    "flowers": ZSCLSplit(_flowers, ("jpg/", "imagelabels.mat", "setid.mat", "cat_to_name.json"),
                         f"imagelabels.mat and setid.mat from {_VGG_FLOWERS} ('image labels', 'data splits'); "
                         f"cat_to_name.json via CoOp's DATASETS.md ({mtil.COOP_DATASETS_MD})", 102),
    "food": ZSCLSplit(_food, ("images/", "meta/train.json", "meta/test.json"),
                      "the meta/ folder of food-101.tar.gz (https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/)",
                      101),
    "mnist": ZSCLSplit(_official, (), "", 10),
    "oxford_pet": ZSCLSplit(_pet, ("images/", "annotations/trainval.txt", "annotations/test.txt"),
                            "annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/", 37),
    "cars": ZSCLSplit(_cars, ("cars_train/", "cars_test/", "devkit/cars_train_annos.mat", "devkit/cars_meta.mat",
                              "cars_test_annos_withlabels.mat"),
                      "car_devkit.tgz (devkit/) and cars_test_annos_withlabels.mat — the official page is offline; "
                      f"see CoOp's DATASETS.md ({mtil.COOP_DATASETS_MD}) or torchvision.datasets.StanfordCars' "
                      "notes for mirrors", 196),
    "sun397": ZSCLSplit(_sun397, ("SUN397/", "SUN397/ClassName.txt"),
                        "SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/ (ClassName.txt is in "
                        "its SUN397/ folder)", 397),
}


def zscl_problems(src) -> list[str]:
    """What ``src`` (an MTILSource) lacks for ZSCL's split (stat calls only), one line each naming the
    path, ``data.protocol=zscl`` and where to get it."""
    if src.facts.listing == "torchvision":
        return src.coop_problems()
    z = ZSCL_SPLITS[src.name]
    layout = f"data.protocol=zscl reads {', '.join(f'<root>/{r}' for r in z.needs)}"
    if not os.path.isdir(src.root):
        get = src.facts.get_it + (f"; then {z.get_it}" if z.get_it else "")
        return [f"{src.name}: dataset folder {src.root} is missing ({layout}). Get it: {get}"]
    base = mtil._aircraft_dir(src.root) if src.facts.listing == "aircraft" else src.root
    out = []
    for rel in z.needs:
        path = os.path.join(base, rel.rstrip("/"))
        if not (os.path.isdir(path) if rel.endswith("/") else os.path.isfile(path)):
            what = "folder" if rel.endswith("/") else "file"
            out.append(f"{src.name}: {what} {path} is missing ({layout}). Get it: {z.get_it or src.facts.get_it}")
    if any(r.endswith(".mat") for r in z.needs) and importlib.util.find_spec("scipy") is None:
        out.append(f"{src.name}: reading its .mat files under data.protocol=zscl needs scipy: pip install scipy")
    return out
