"""ZSCL's splits under ``data.protocol=zscl`` (docs/diki_mtil_protocol.md#zscls-splits): tiny fake
folders in each dataset's layout, read by clcli and by torchvision's own dataset classes (offline),
whose train / test membership, order and labels must agree; the seed-42 random split against
``torch.utils.data.random_split``; the missing-file messages; protocol=diki unchanged."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import random_split

from clcli.data import mtil
from clcli.data.mtil_data import MTILData
from clcli.data.mtil_zscl import ZSCL_SPLITS, zscl_random_split


def _img(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format="JPEG")


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _zscl(name, root):
    src = mtil.MTILSource(name, root, splits="zscl")
    assert src.problems() == []
    return src


def _pairs(split):
    return list(zip(map(str, split.items), split.labels.tolist()))


def _reference_random_split(pairs):
    """The reference: torchvision's list split by random_split with ZSCL's lengths and generator."""
    n = len(pairs)
    train, test = random_split(pairs, [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(42))
    return [pairs[i] for i in train.indices], [pairs[i] for i in test.indices]


@pytest.mark.parametrize("n", [2, 5, 9, 14, 27, 8677])
def test_random_split_equals_torch_random_split(n):
    """Same index lists as random_split(range(n), [int(0.8n), rest], seed 42); int(0.8n) train, not the
    fraction rule (n = 9: 7 / 2, where random_split([0.8, 0.2]) would give 8 / 1)."""
    train, test = zscl_random_split(n)
    a, b = random_split(range(n), [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(42))
    assert train == list(a) and test == list(b)
    assert len(train) == {2: 1, 5: 4, 9: 7, 14: 11, 27: 21, 8677: 6941}[n]
    assert sorted(train + test) == list(range(n))


def test_caltech101_all_101_categories_random_split(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    counts = {"BACKGROUND_Google": 2, "Faces": 3, "Faces_easy": 4, "Leopards": 2, "accordion": 3, "airplanes": 2}
    for c, n in counts.items():
        for k in range(1, n + 1):
            _img(str(cats / c / f"image_{k:04d}.jpg"))
    src = _zscl("caltech101", tmp_path / "caltech101")
    ref = tvd.Caltech101(str(tmp_path))
    pairs = [(os.path.join(ref.root, "101_ObjectCategories", ref.categories[y], f"image_{i:04d}.jpg"), y)
             for i, y in zip(ref.index, ref.y)]
    train, test = _reference_random_split(pairs)
    assert _pairs(src.load("train")) == train and _pairs(src.load("test")) == test
    assert len(train) == int(0.8 * 14) == 11 and len(src.load("val")) == 0
    assert src.info.class_names == ["off-center face", "centered face", "leopard", "accordion", "airplane"]


def test_eurosat_image_folder_random_split(tmp_path):
    for c, n in {"AnnualCrop": 3, "Forest": 4, "SeaLake": 2}.items():
        for k in range(n):
            _img(str(tmp_path / "eurosat" / "2750" / c / f"{c}_{k + 1}.jpg"))
    _write(str(tmp_path / "eurosat" / "2750" / "Forest" / "notes.txt"), "not an image")
    src = _zscl("eurosat", tmp_path / "eurosat")
    train, test = _reference_random_split([(p, y) for p, y in tvd.EuroSAT(str(tmp_path)).samples])
    assert _pairs(src.load("train")) == train and _pairs(src.load("test")) == test and len(train) == 7
    assert src.info.class_names == ["Annual Crop Land", "Forest", "Sea or Lake"]  # clcli's (CoOp) names


def test_sun397_sorted_paths_random_split(tmp_path):
    data = tmp_path / "SUN397"
    _write(str(data / "ClassName.txt"), "/a/abbey\n/b/bakery/shop\n/a/apartment_building/outdoor\n")
    files = ["a/abbey/sun_b.jpg", "a/abbey/sun_a.jpg", "b/bakery/shop/sun_c.jpg", "b/bakery/shop/sun_d.jpg",
             "a/apartment_building/outdoor/sun_e.jpg", "a/apartment_building/outdoor/sun_f.jpg", "a/abbey/sun_g.jpg"]
    for f in files:
        _img(str(data / f))
    _img(str(data / "a" / "abbey" / "other.jpg"))  # not sun_*.jpg: ignored by both
    src = _zscl("sun397", tmp_path)
    ref = tvd.SUN397(str(tmp_path))
    pairs = sorted((str(p), y) for p, y in zip(ref._image_files, ref._labels))  # the reference's rglob order, sorted
    train, test = _reference_random_split(pairs)
    assert _pairs(src.load("train")) == train and _pairs(src.load("test")) == test and len(train) == 5
    assert src.info.class_names == ["abbey", "bakery/shop", "apartment building/outdoor"]  # torchvision's


def test_dtd_partition_1(tmp_path):
    root = tmp_path / "dtd" / "dtd"
    lines = {"train": ["zigzagged/z1.jpg", "banded/b1.jpg", "banded/b2.jpg"], "test": ["banded/b3.jpg", "zigzagged/z2.jpg"]}
    for s, ls in lines.items():
        _write(str(root / "labels" / f"{s}1.txt"), "\n".join(ls) + "\n")
        _write(str(root / "labels" / f"{s}2.txt"), "banded/b1.jpg\n")  # another partition: not read
        for line in ls:
            _img(str(root / "images" / line))
    src = _zscl("dtd", root)
    for s in ("train", "test"):
        ref = tvd.DTD(str(tmp_path), split=s)
        assert _pairs(src.load(s)) == [(str(p), y) for p, y in zip(ref._image_files, ref._labels)]
    assert src.info.class_names == ["banded", "zigzagged"] and len(src.load("val")) == 0


def test_food101_meta_json(tmp_path):
    root = tmp_path / "food-101"
    meta = {"train": {"pad_thai": ["pad_thai/1", "pad_thai/2"], "apple_pie": ["apple_pie/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "pad_thai": ["pad_thai/5"]}}
    for s, m in meta.items():
        _write(str(root / "meta" / f"{s}.json"), json.dumps(m))
        for rels in m.values():
            for rel in rels:
                _img(str(root / "images" / f"{rel}.jpg"))
    src = _zscl("food", root)
    for s in ("train", "test"):
        ref = tvd.Food101(str(tmp_path), split=s)
        assert _pairs(src.load(s)) == [(str(p), y) for p, y in zip(ref._image_files, ref._labels)]
    assert src.info.class_names == ["apple pie", "pad thai"]


def test_oxford_pet_trainval_test(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    ann = {"trainval": ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1", "Abyssinian_2 1 1 1"],
           "test": ["american_bulldog_11 2 2 1", "Abyssinian_3 1 1 1"]}
    for f, ls in ann.items():
        _write(str(root / "annotations" / f"{f}.txt"), "\n".join(ls) + "\n")
        for line in ls:
            _img(str(root / "images" / (line.split()[0] + ".jpg")))
    src = _zscl("oxford_pet", root)
    for s, f in (("train", "trainval"), ("test", "test")):
        ref = tvd.OxfordIIITPet(str(tmp_path), split=f)
        assert _pairs(src.load(s)) == [(str(p), y) for p, y in zip(ref._images, ref._labels)]
    assert src.info.class_names == ["abyssinian", "american bulldog"]  # clcli's lower-cased breeds


def test_stanford_cars_official_train_test(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    root = tmp_path / "stanford_cars"
    os.makedirs(root / "devkit")
    annos = {"train": [("00002.jpg", 2), ("00001.jpg", 1)], "test": [("00001.jpg", 2), ("00002.jpg", 1)]}
    for s, rows in annos.items():
        arr = np.array(rows, dtype=[("fname", "O"), ("class", "O")])
        mat = root / "devkit" / "cars_train_annos.mat" if s == "train" else root / "cars_test_annos_withlabels.mat"
        savemat(str(mat), {"annotations": arr})
        for fname, _ in rows:
            _img(str(root / f"cars_{s}" / fname))
    savemat(str(root / "devkit" / "cars_meta.mat"),
            {"class_names": np.array(["AM General Hummer SUV 2000", "Tesla Model S Sedan 2012"], dtype=object)})
    src = _zscl("cars", root)
    for s in ("train", "test"):
        assert _pairs(src.load(s)) == [(p, int(y)) for p, y in tvd.StanfordCars(str(tmp_path), split=s)._samples]
    assert src.info.class_names == ["AM General Hummer SUV 2000", "Tesla Model S Sedan 2012"]  # no year moved


def test_flowers102_setid(tmp_path, monkeypatch):
    savemat = pytest.importorskip("scipy.io").savemat
    root = tmp_path / "flowers-102"
    labels = [2, 1, 2, 1, 2]  # image_00001 .. image_00005
    os.makedirs(root)
    savemat(str(root / "imagelabels.mat"), {"labels": np.array([labels])})
    savemat(str(root / "setid.mat"), {"trnid": np.array([[3, 2]]), "tstid": np.array([[5, 1, 4]]),
                                      "valid": np.array([[1]])})
    _write(str(root / "cat_to_name.json"), json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    for i in range(1, 6):
        _img(str(root / "jpg" / f"image_{i:05d}.jpg"))
    src = _zscl("flowers", root)
    monkeypatch.setattr(tvd.Flowers102, "_check_integrity", lambda self: True)  # its md5 check refuses fakes
    for s in ("train", "test"):
        ref = tvd.Flowers102(str(tmp_path), split=s)
        assert _pairs(src.load(s)) == [(str(p), y) for p, y in zip(ref._image_files, ref._labels)]
    assert len(src.load("train")) == 2 and src.info.class_names == ["pink primrose", "hard-leaved pocket orchid"]


def test_aircraft_train_and_test_lists(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    _write(str(data / "variants.txt"), "707-320\nA300B4\n")
    lists = {"train": ["0001 A300B4", "0002 707-320"], "val": ["0003 707-320"], "test": ["0004 A300B4"]}
    for s, ls in lists.items():
        _write(str(data / f"images_variant_{s}.txt"), "\n".join(ls) + "\n")
        for line in ls:
            _img(str(data / "images" / (line.split()[0] + ".jpg")))
    src = _zscl("aircraft", tmp_path)
    for s in ("train", "test"):
        ref = tvd.FGVCAircraft(str(tmp_path), split=s)
        assert _pairs(src.load(s)) == list(zip(ref._image_files, ref._labels))
    assert len(src.load("val")) == 0


def test_missing_files_are_named_with_where_to_get_them(tmp_path):
    """The CoOp layout lacks setid.mat (Flowers) and may lack labels/ (DTD): validate names them."""
    os.makedirs(tmp_path / "oxford_flowers" / "jpg")
    os.makedirs(tmp_path / "dtd" / "images")
    data = MTILData("x", order=["flowers", "dtd", "eurosat"], data_dir=str(tmp_path), protocol="zscl")
    problems = data.problems()
    flowers = [p for p in problems if p.startswith("flowers:")]
    assert [p.split()[2].rsplit(os.sep, 1)[1] for p in flowers] == ["imagelabels.mat", "setid.mat", "cat_to_name.json"]
    assert all("data.protocol=zscl" in p and "robots.ox.ac.uk/~vgg/data/flowers/102" in p for p in flowers[:2])
    dtd = [p for p in problems if p.startswith("dtd:")]
    assert len(dtd) == 2 and "labels" + os.sep + "train1.txt" in dtd[0] and "dtd-r1.0.1.tar.gz" in dtd[0]
    assert any(p.startswith("eurosat: dataset folder") for p in problems)
    # protocol=diki asks for the CoOp split files instead, not for ZSCL's
    diki = MTILData("x", order=["flowers"], data_dir=str(tmp_path)).problems()
    assert len(diki) == 1 and "split_zhou_OxfordFlowers.json" in diki[0]


def test_protocol_zscl_scenario_and_diki_unchanged(tmp_path, tiny_clip):
    """One folder holding both layouts: diki reads the CoOp json (train / val / test), zscl the
    torchvision lists (no val); results.json records splits and class-name sources."""
    root = tmp_path / "food-101"
    coop = {"train": [["apple_pie/1.jpg", 0, "apple_pie"], ["pad_thai/2.jpg", 1, "pad_thai"]],
            "val": [["apple_pie/3.jpg", 0, "apple_pie"]], "test": [["pad_thai/5.jpg", 1, "pad_thai"]]}
    _write(str(root / "split_zhou_Food101.json"), json.dumps(coop))
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/3"], "pad_thai": ["pad_thai/2"]},
            "test": {"apple_pie": ["apple_pie/4"], "pad_thai": ["pad_thai/5"]}}
    for s, m in meta.items():
        _write(str(root / "meta" / f"{s}.json"), json.dumps(m))
    for k, c in enumerate(["apple_pie", "pad_thai", "apple_pie", "apple_pie", "pad_thai"], 1):
        _img(str(root / "images" / c / f"{k}.jpg"))
    diki = mtil.MTILSource("food", root)
    assert [len(diki.load(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    zscl = mtil.MTILSource("food", root, splits="zscl")
    assert [len(zscl.load(s)) for s in ("train", "val", "test")] == [3, 0, 2]
    s = MTILData("x", order=["food"], data_dir=str(tmp_path), protocol="zscl").build(tiny_clip)
    assert s.manifest()["protocol"]["splits"] == {"food": "zscl"}
    assert s.manifest()["protocol"]["class_names"] == {"food": "zscl"}
    assert len(s.tasks[0].train) == 3 and len(s.tasks[0].test) == 2
    few = MTILData("x", order=["food"], data_dir=str(tmp_path), protocol="zscl", num_shots=1).build(tiny_clip)
    assert len(few.tasks[0].train) == 2 and few.tasks[0].val is None  # one shot per class, no val draw
    d = MTILData("x", order=["food"], data_dir=str(tmp_path)).build(tiny_clip)
    assert d.manifest()["protocol"] == {"name": "diki", "eval_templates": "first", "splits": {"food": "coop"}}
    assert len(d.tasks[0].train) == 2 and len(d.tasks[0].test) == 1


def test_class_name_sources_recorded():
    """Where clcli keeps its own names because the spec lacks ZSCL's full list (Caltech, EuroSAT)."""
    assert {d for d, z in ZSCL_SPLITS.items() if z.class_names == "coop"} == {"caltech101", "eurosat"}
    assert set(ZSCL_SPLITS) == set(mtil.MTIL_DATASETS)
    assert mtil.MTILSource("caltech101", "/nonexistent", splits="zscl").info.num_classes == 101
    with pytest.raises(ValueError, match="splits must be one of coop, zscl"):
        mtil.MTILSource("food", "/x", splits="ZSCL")


def test_cifar_mnist_official_train_without_val(tmp_path):
    """CIFAR100 / MNIST under zscl: the whole official train set in its order, empty val, official test."""
    x = np.arange(30, dtype=np.uint8).reshape(30, 1, 1)
    y = np.arange(30) % 10

    def fake_official(root, train, download):
        return (x, y, list(mtil.MNIST_NAMES)) if train else (x[:7], y[:7], list(mtil.MNIST_NAMES))

    facts = dataclasses.replace(mtil.MTIL_DATASETS["mnist"], official=fake_official)
    src = mtil.MTILSource("mnist", tmp_path, facts=facts, splits="zscl")
    assert np.array_equal(src.load("train").items, x) and np.array_equal(src.load("train").labels, y)
    assert len(src.load("val")) == 0 and len(src.load("test")) == 7
    assert len(mtil.MTILSource("mnist", tmp_path, facts=facts).load("val")) == 10  # diki: round(0.2 * 3) = 1 per class


def test_malformed_listing_is_a_clear_data_error(tmp_path):
    data = tmp_path / "SUN397"
    _write(str(data / "ClassName.txt"), "/a/abbey\n")
    _img(str(data / "b" / "bakery" / "shop" / "sun_x.jpg"))
    with pytest.raises(mtil.MissingDatasetError, match=r"class 'bakery/shop' is not in ClassName.txt"):
        _zscl("sun397", tmp_path).load("train")


def test_mat_without_the_split_variable_names_it(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    root = tmp_path / "flowers-102"
    os.makedirs(root / "jpg")
    savemat(str(root / "imagelabels.mat"), {"labels": np.array([[1, 2]])})
    savemat(str(root / "setid.mat"), {"trnid": np.array([[1]])})
    _write(str(root / "cat_to_name.json"), json.dumps({"1": "a", "2": "b"}))
    with pytest.raises(mtil.MissingDatasetError, match=r"setid.mat: no variable 'tstid' \(found \['trnid'\]\)"):
        _zscl("flowers", root).load("test")
