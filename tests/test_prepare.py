"""Dataset preparation commands on tiny fake downloads."""
import subprocess
import sys

import torch
from PIL import Image

from clcli.data.prepare import imagenet_r_split, prepare_cub200, prepare_imagenet_r


def test_imagenet_r_split_is_dualprompt_seed42_randperm():
    g = torch.Generator().manual_seed(42)
    perm = torch.randperm(30000, generator=g).tolist()
    train, val = imagenet_r_split(30000)
    assert (len(train), len(val)) == (24000, 6000)
    assert train == perm[:24000] and val == perm[24000:]


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_prepare_imagenet_r_and_cub(tmp_path):
    src = tmp_path / "imagenet-r"
    for c in ("n01", "n02"):
        for i in range(5):
            _img(src / c / f"{i}.jpg")
    msg = prepare_imagenet_r(src, tmp_path / "out")
    assert "8 train / 2 val" in msg
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 10

    cub = tmp_path / "CUB_200_2011"
    rels = ["001.A/a1.jpg", "001.A/a2.jpg", "002.B/b1.jpg"]
    for r in rels:
        _img(cub / "images" / r)
    (cub / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    prepare_cub200(cub, tmp_path / "cub")
    assert (tmp_path / "cub/train/001.A/a1.jpg").is_file() and (tmp_path / "cub/val/001.A/a2.jpg").is_file()


def test_prepare_refuses_to_overwrite(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    r = subprocess.run([sys.executable, "-m", "clcli.cli", "data", "prepare", "imagenet_r", "--src",
                        str(tmp_path / "src"), "--dst", str(tmp_path / "dst")], capture_output=True, text=True)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
