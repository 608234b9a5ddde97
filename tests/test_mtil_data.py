"""MTIL dataset sources (docs/diki_mtil_protocol.md#datasets-and-orders): tiny fake on-disk layouts,
no downloads."""
from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from clcli.data import mtil
from clcli.data.base import Source, SplitData


def _img(path, fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format=fmt)


def _coop(root, split_file, image_dir, entries):
    """entries: {split: [(relpath, label, classname)]}; writes the images and the split json."""
    for rows in entries.values():
        for rel, _, _ in rows:
            _img(os.path.join(root, image_dir, rel) if image_dir else os.path.join(root, rel))
    with open(os.path.join(root, split_file), "w") as f:
        json.dump({s: [list(r) for r in rows] for s, rows in entries.items()}, f)


def _check_paths(split, root):
    for p in split.items:
        assert os.path.isabs(p) and os.path.isfile(p) and p.startswith(str(root))


# ---------------------------------------------------------------- CoOp-split datasets


def test_caltech101_renames_ignored_and_label_order(tmp_path):
    root = tmp_path / "caltech-101"
    _coop(root, "split_zhou_Caltech101.json", "101_ObjectCategories", {
        # labels deliberately not 0-based / not contiguous: ids are the rank among sorted train labels
        "train": [("Faces/image_0001.jpg", 5, "Faces"), ("airplanes/image_0001.jpg", 2, "airplanes"),
                  ("Leopards/image_0001.jpg", 7, "leopard"), ("water_lilly/image_0001.jpg", 9, "water_lilly"),
                  ("Motorbikes/image_0001.jpg", 8, "Motorbikes"),
                  ("BACKGROUND_Google/image_0001.jpg", 0, "BACKGROUND_Google"),
                  ("Faces_easy/image_0001.jpg", 1, "Faces_easy")],
        "val": [("airplanes/image_0002.jpg", 2, "airplanes")],
        "test": [("Faces/image_0002.jpg", 5, "Faces"), ("water_lilly/image_0002.jpg", 9, "water_lilly")],
    })
    src = mtil.MTILSource("caltech101", root)
    assert isinstance(src, Source)
    assert src.problems() == []
    assert src.info.class_names == ["airplane", "face", "leopard", "motorbike", "water lilly"]
    assert src.info.num_classes == 5
    assert src.info.templates[0] == "a photo of a {c}."
    tr = src.load("train")
    assert len(tr) == 5  # BACKGROUND_Google and Faces_easy dropped
    assert tr.labels.tolist() == [1, 0, 2, 4, 3]
    assert tr.items[0] == str(root / "101_ObjectCategories" / "Faces" / "image_0001.jpg")
    assert src.load("val").labels.tolist() == [0]
    te = src.load("test")
    assert te.labels.tolist() == [1, 4]
    _check_paths(te, root)


def test_eurosat_names(tmp_path):
    root = tmp_path / "eurosat"
    raw = list(mtil.EUROSAT_NAMES)
    _coop(root, "split_zhou_EuroSAT.json", "2750", {
        # CoOp's json already carries the long names; raw folder names are mapped as well
        "train": [(f"{c}/{c}_1.jpg", i, mtil.EUROSAT_NAMES[c] if i % 2 else c) for i, c in enumerate(raw)],
        "val": [("River/River_2.jpg", 8, "River")],
        "test": [("SeaLake/SeaLake_3.jpg", 9, "Sea or Lake")],
    })
    src = mtil.MTILSource("eurosat", root)
    assert src.info.class_names == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
        "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
    assert src.info.templates[0] == "a centered satellite photo of {c}."
    assert src.load("train").labels.tolist() == list(range(10))
    assert src.load("test").labels.tolist() == [9]
    _check_paths(src.load("val"), root)


def test_oxford_pet_lower_cased_breed(tmp_path):
    root = tmp_path / "oxford_pets"
    _coop(root, "split_zhou_OxfordPets.json", "images", {
        "train": [("Abyssinian_1.jpg", 0, "Abyssinian"), ("american_bulldog_10.jpg", 1, "american_bulldog"),
                  ("Bengal_3.jpg", 2, "")],  # no name in the json: breed from the file name
        "val": [("Abyssinian_2.jpg", 0, "abyssinian")],
        "test": [("american_bulldog_11.jpg", 1, "american_bulldog"), ("Bengal_4.jpg", 2, "bengal")],
    })
    src = mtil.MTILSource("oxford_pet", root)
    assert src.info.class_names == ["abyssinian", "american bulldog", "bengal"]
    assert src.info.templates[0] == "a photo of a {c}, a type of pet."
    te = src.load("test")
    assert te.labels.tolist() == [1, 2]
    assert te.items[1] == str(root / "images" / "Bengal_4.jpg")
    _check_paths(te, root)


def test_cars_year_moved_to_front(tmp_path):
    root = tmp_path / "stanford_cars"
    _coop(root, "split_zhou_StanfordCars.json", "", {
        "train": [("cars_train/00001.jpg", 0, "AM General Hummer SUV 2000"),
                  ("cars_train/00002.jpg", 1, "2012 Tesla Model S Sedan"),  # CoOp json: already year-first
                  ("cars_train/00003.jpg", 2, "Ram C/V Cargo Van Minivan 2012")],
        "val": [("cars_train/00004.jpg", 1, "2012 Tesla Model S Sedan")],
        "test": [("cars_test/00001.jpg", 2, "Ram C/V Cargo Van Minivan 2012")],
    })
    src = mtil.MTILSource("cars", root)
    assert src.problems() == []
    assert src.info.class_names == ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan",
                                    "2012 Ram C/V Cargo Van Minivan"]
    assert src.info.templates[0] == "a photo of a {c}, a type of car."
    te = src.load("test")
    assert te.items == [str(root / "cars_test" / "00001.jpg")] and te.labels.tolist() == [2]
    assert mtil.cars_year_first("Tesla Model S Sedan 2012") == "2012 Tesla Model S Sedan"
    assert mtil.cars_year_first("2012 Tesla Model S Sedan") == "2012 Tesla Model S Sedan"


def test_sun397_path_parts_reversed(tmp_path):
    root = tmp_path / "sun397"
    _coop(root, "split_zhou_SUN397.json", "SUN397", {
        "train": [("a/abbey/sun_a.jpg", 0, "abbey"), ("a/airport_terminal/sun_b.jpg", 1, "airport_terminal"),
                  ("b/bakery/shop/sun_c.jpg", 2, "bakery/shop"),  # name from the path, not the json field
                  ("a/apse/indoor/sun_d.jpg", 3, "indoor apse")],
        "val": [("b/bakery/shop/sun_e.jpg", 2, "shop bakery")],
        "test": [("a/apse/indoor/sun_f.jpg", 3, "indoor apse")],
    })
    src = mtil.MTILSource("sun397", root)
    assert src.info.class_names == ["abbey", "airport terminal", "shop bakery", "indoor apse"]
    assert src.load("val").labels.tolist() == [2]
    assert src.load("test").items == [str(root / "SUN397" / "a" / "apse" / "indoor" / "sun_f.jpg")]
    assert mtil.sun397_name_from_path("b/bakery/shop/sun_x.jpg") == "shop bakery"


def test_dtd_food_flowers_read_their_split_files(tmp_path):
    cases = [
        ("dtd", "dtd", "split_zhou_DescribableTextures.json", "images",
         [("banded/banded_0001.jpg", 0, "banded"), ("zigzagged/z_1.jpg", 1, "zigzagged")],
         ["banded", "zigzagged"], "a photo of a {c} texture."),
        ("food", "food-101", "split_zhou_Food101.json", "images",
         [("apple_pie/1.jpg", 0, "apple_pie"), ("waffles/2.jpg", 1, "waffles")],
         ["apple pie", "waffles"], "a photo of a {c}, a type of food."),
        ("flowers", "oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg",
         [("image_00001.jpg", 0, "pink primrose"), ("image_00002.jpg", 1, "hard-leaved pocket orchid")],
         ["pink primrose", "hard-leaved pocket orchid"], "a photo of a {c}, a type of flower."),
    ]
    for name, folder, split_file, image_dir, rows, names, template in cases:
        root = tmp_path / folder
        _coop(root, split_file, image_dir, {"train": rows, "val": rows[:1], "test": rows[1:]})
        src = mtil.MTILSource(name, root)
        assert src.problems() == [], name
        assert src.info.class_names == names
        assert src.info.templates[0] == template
        assert src.load("train").labels.tolist() == [0, 1]
        _check_paths(src.load("test"), root / image_dir)


def _write_aircraft(data_dir, split_rows, variants):
    for rows in split_rows.values():
        for image_id, _ in rows:
            _img(os.path.join(data_dir, "images", f"{image_id}.jpg"))
    with open(os.path.join(data_dir, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    for s, rows in split_rows.items():
        with open(os.path.join(data_dir, f"images_variant_{s}.txt"), "w") as f:
            f.write("".join(f"{i} {v}\n" for i, v in rows))


def test_aircraft_official_lists(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    data_dir = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "Cessna 172", "A300B4"]
    _write_aircraft(data_dir, {
        "train": [("1025794", "A300B4"), ("1340192", "707-320"), ("0056978", "Cessna 172")],
        "val": [("0062765", "Cessna 172")],
        "test": [("1514522", "707-320"), ("0065566", "A300B4")],
    }, variants)
    src = mtil.MTILSource("aircraft", root)
    assert src.problems() == []
    assert src.info.class_names == variants  # variants.txt order
    assert src.info.num_classes == 3
    assert src.info.templates[0] == "a photo of a {c}, a type of aircraft."
    tr = src.load("train")
    assert tr.labels.tolist() == [2, 0, 1]
    assert tr.items[0] == str(data_dir / "images" / "1025794.jpg")
    assert src.load("val").labels.tolist() == [1]
    _check_paths(src.load("test"), data_dir)

    # CoOp's flattened layout (files directly under root) is accepted as well
    flat = tmp_path / "flat"
    _write_aircraft(flat, {"train": [("1", "707-320")], "val": [("2", "707-320")], "test": [("3", "707-320")]},
                    ["707-320"])
    assert mtil.MTILSource("aircraft", flat).load("test").items == [str(flat / "images" / "3.jpg")]


def test_problems_on_empty_dirs_name_path_and_layout(tmp_path):
    for name in mtil.MTIL_DATASETS:
        root = tmp_path / name
        root.mkdir()
        src = mtil.MTILSource(name, root, download=False)
        probs = src.problems()
        assert probs, name
        text = "\n".join(probs)
        assert "Expected layout" in text and "Get it" in text, name
        with pytest.raises(FileNotFoundError):
            src.load("train")
        with pytest.raises(KeyError):
            src.load("bogus")
        assert src.info.num_classes > 0 and src.info.templates  # static info without data
    cal = mtil.MTILSource("caltech101", tmp_path / "caltech101").problems()
    assert any(str(tmp_path / "caltech101" / "101_ObjectCategories") in p for p in cal)
    assert any(str(tmp_path / "caltech101" / "split_zhou_Caltech101.json") in p for p in cal)
    assert any("CoOp" in p and "DATASETS.md" in p for p in cal)
    air = mtil.MTILSource("aircraft", tmp_path / "aircraft").problems()
    assert any(str(tmp_path / "aircraft" / "fgvc-aircraft-2013b" / "data" / "variants.txt") in p for p in air)
    assert any("FGVCAircraft" in p for p in air)
    missing = mtil.MTILSource("caltech101", tmp_path / "nowhere").problems()
    assert len(missing) == 1 and str(tmp_path / "nowhere") in missing[0] and "101_ObjectCategories" in missing[0]
    # CIFAR/MNIST with download=True: nothing to report until load() downloads
    assert mtil.MTILSource("cifar100", tmp_path / "c", download=True).problems() == []


def test_static_info_and_templates():
    expected = {"aircraft": 100, "caltech101": 100, "cifar100": 100, "dtd": 47, "eurosat": 10, "flowers": 102,
                "food": 101, "mnist": 10, "oxford_pet": 37, "cars": 196, "sun397": 397}
    for name, n in expected.items():
        src = mtil.make_mtil_source(name, "/nonexistent-data-dir", download=False)
        assert src.info.name == name and src.info.num_classes == n
        assert "{c}" in src.info.templates[0]
    cifar = mtil.MTILSource("cifar100", "/nonexistent", download=False).info
    assert cifar.class_names[:2] == ["apple", "aquarium fish"] and "sweet pepper" in cifar.class_names
    assert len(cifar.class_names) == 100
    mnist = mtil.MTILSource("mnist", "/nonexistent", download=False).info
    assert mnist.class_names[0] == "0 - zero" and mnist.class_names[9] == "9 - nine"
    assert mnist.templates[0] == 'a photo of the number: "{c}".'
    assert mtil.make_mtil_source("food", "/d").root == os.path.abspath("/d/food-101")
    with pytest.raises(KeyError):
        mtil.make_mtil_source("cifar10", "/d")


# ---------------------------------------------------------------- orders


def test_orders():
    assert set(mtil.MTIL_DATASETS) == set(mtil.MTIL_ORDER_I) == set(mtil.MTIL_DEFAULT_DIRS)
    assert len(mtil.MTIL_ORDER_I) == 11
    assert list(mtil.MTIL_ORDER_II) == [mtil.MTIL_ORDER_I[i] for i in [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]]
    assert mtil.MTIL_ORDER_II[0] == "cars" and mtil.MTIL_ORDER_II[-1] == "cifar100"
    assert mtil.MTIL_FEWSHOT_DATASETS == ("aircraft", "caltech101", "cifar100", "dtd", "flowers", "food",
                                          "cars", "sun397")
    assert set(mtil.MTIL_ORDER_I) - set(mtil.MTIL_FEWSHOT_DATASETS) == {"eurosat", "mnist", "oxford_pet"}
    assert mtil.fewshot_val_shots(16) == 4 and mtil.fewshot_val_shots(2) == 2


# ---------------------------------------------------------------- few-shot


def _fake_split():
    labels = np.repeat(np.arange(5), [30, 20, 3, 16, 1])
    return SplitData([f"img{i}.jpg" for i in range(len(labels))], labels)


def test_few_shot_stratified_deterministic():
    split = _fake_split()
    fs = mtil.few_shot(split, 16, seed=42)
    counts = np.bincount(fs.labels, minlength=5).tolist()
    assert counts == [16, 16, 3, 16, 1]  # small classes keep all their items
    assert set(fs.items) <= set(split.items) and len(set(fs.items)) == len(fs)
    for item, lab in zip(fs.items, fs.labels):  # labels stay attached to their items
        assert split.labels[int(item[3:-4])] == lab
    random.seed(0)
    again = mtil.few_shot(split, 16, seed=42)
    random.seed(12345)
    assert mtil.few_shot(split, 16, seed=42).items == again.items == fs.items  # global RNG irrelevant
    other = mtil.few_shot(split, 16, seed=43)
    assert other.items != fs.items
    assert np.bincount(other.labels, minlength=5).tolist() == counts
    with pytest.raises(ValueError):
        mtil.few_shot(split, 0, seed=1)


def test_few_shot_on_array_items():
    x = np.arange(40 * 2 * 2, dtype=np.uint8).reshape(40, 2, 2)
    split = SplitData(x, np.arange(40) % 4)
    fs = mtil.few_shot(split, 3, seed=0)
    assert isinstance(fs.items, np.ndarray) and fs.items.shape == (12, 2, 2)
    assert np.bincount(fs.labels).tolist() == [3, 3, 3, 3]


# ---------------------------------------------------------------- CIFAR/MNIST 80/20 split


def test_per_class_train_val_split():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), [50, 100, 35, 7]))
    tr, va = mtil.per_class_train_val_split(labels, 0.2, seed=1)
    assert len(np.intersect1d(tr, va)) == 0
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[va], minlength=4).tolist() == [10, 20, 7, 1]  # round(0.2 * n) per class
    assert np.bincount(labels[tr], minlength=4).tolist() == [40, 80, 28, 6]
    random.seed(7)
    tr2, va2 = mtil.per_class_train_val_split(labels, 0.2, seed=1)
    random.seed(99)
    random.random()
    tr3, va3 = mtil.per_class_train_val_split(labels, 0.2, seed=1)
    assert np.array_equal(va, va2) and np.array_equal(va, va3) and np.array_equal(tr, tr3)
    _, va4 = mtil.per_class_train_val_split(labels, 0.2, seed=2)
    assert not np.array_equal(va, va4)


def test_torchvision_source_split_once(tmp_path):
    """CIFAR-style source: train/val from one seeded split of the official train set, disjoint,
    identical on a second source object whatever the global RNG did in between
    (docs/diki_mtil_protocol.md#splits-and-data-layout)."""
    x = np.arange(100 * 3 * 3 * 3, dtype=np.int64).astype(np.uint8).reshape(100, 3, 3, 3)
    x[:, 0, 0, 0] = np.arange(100)  # unique id per image
    y = np.arange(100) % 10

    def fake_official(root, train, download):
        names = list(mtil.CIFAR100_FINE_NAMES)
        return (x, y, names) if train else (x[:20], y[:20], names)

    facts = dataclasses.replace(mtil.MTIL_DATASETS["cifar100"], official=fake_official)
    a = mtil.MTILSource("cifar100", tmp_path, split_seed=3, facts=facts)
    tr, va = a.load("train"), a.load("val")
    assert isinstance(tr.items, np.ndarray) and tr.items.dtype == np.uint8 and tr.items.shape[1:] == (3, 3, 3)
    assert len(tr) == 80 and len(va) == 20
    assert np.bincount(va.labels).tolist() == [2] * 10
    assert not set(tr.items[:, 0, 0, 0].tolist()) & set(va.items[:, 0, 0, 0].tolist())
    random.shuffle(list(range(10)))
    b = mtil.MTILSource("cifar100", tmp_path, split_seed=3, facts=facts)
    assert np.array_equal(b.load("val").items, va.items)
    other = mtil.MTILSource("cifar100", tmp_path, split_seed=4, facts=facts)  # the seed reaches the split
    assert not np.array_equal(other.load("val").items, va.items)
    assert len(a.load("test")) == 20
