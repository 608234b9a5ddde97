"""``clcli data prepare NAME --src DIR --dst DIR``: build the folder layouts the benchmarks read
(``clcli data download NAME --dst DIR`` fetches the archive first: :mod:`clcli.data.download`).

- ``imagenet_r``: DualPrompt's split used by SLCA (docs/slca_protocol.md#benchmarks-and-data-layout):
  ImageFolder order over the 200 wnid folders, ``torch.manual_seed(42)``, ``randperm(N)``; the first
  int(0.8·N) indices are train, the rest val. Not stratified.
- ``cub200``: the official split of CUB-200-2011 (``images.txt`` + ``train_test_split.txt``,
  ``is_training_image == 1`` -> train), class folders ``001.Black_footed_Albatross`` ...

Files are hard-linked when possible (copied otherwise); the destination must not exist yet, so
nothing the user had is overwritten.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from clcli.data.cil import scan_image_folder


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def imagenet_r_split(num_images: int, seed: int = 42, train_fraction: float = 0.8) -> tuple[list[int], list[int]]:
    """Indices into the sorted ImageFolder sample list: DualPrompt's seeded random 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_images, generator=g).tolist()
    n_train = int(train_fraction * num_images)
    return perm[:n_train], perm[n_train:]


def prepare_imagenet_r(src: Path, dst: Path) -> str:
    classes, paths, labels = scan_image_folder(src)
    train, val = imagenet_r_split(len(paths))
    for split, idx in (("train", train), ("val", val)):
        for i in idx:
            p = Path(paths[i])
            _place(p, dst / split / classes[labels[i]] / p.name)
    return f"imagenet_r: {len(train)} train / {len(val)} val images of {len(classes)} classes in {dst}"


def prepare_cub200(src: Path, dst: Path) -> str:
    images = dict(line.split() for line in (src / "images.txt").read_text().splitlines() if line.strip())
    is_train = dict(line.split() for line in (src / "train_test_split.txt").read_text().splitlines() if line.strip())
    counts = {"train": 0, "val": 0}
    for image_id, rel in images.items():
        split = "train" if is_train[image_id] == "1" else "val"
        _place(src / "images" / rel, dst / split / rel)
        counts[split] += 1
    return f"cub200: {counts['train']} train / {counts['val']} val images in {dst}"


PREPARERS = {"imagenet_r": prepare_imagenet_r, "cub200": prepare_cub200}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="clcli data")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the train/val folder layout of a benchmark")
    prep.add_argument("name", choices=sorted(PREPARERS))
    prep.add_argument("--src", required=True, type=Path, help="the extracted download")
    prep.add_argument("--dst", required=True, type=Path, help="the benchmark folder under paths.data_dir")
    down = sub.add_parser("download", help="download, verify, extract and prepare a benchmark (resumable)")
    down.add_argument("name", choices=sorted(PREPARERS))
    down.add_argument("--dst", required=True, type=Path, help="the benchmark folder under paths.data_dir")
    down.add_argument("--url", help="download from this URL instead (default: the official one, or the archive's name "
                      "under $CLCLI_DATA_MIRROR)")
    check = down.add_mutually_exclusive_group()
    check.add_argument("--md5", help="expected MD5 of the archive (default: the official archive's)")
    check.add_argument("--sha256", help="expected SHA-256 of the archive, instead of the known MD5")
    down.add_argument("--keep-archive", action="store_true", help="keep the verified archive in <dst>.download/")
    args = parser.parse_args(argv)
    if args.command == "download":
        from clcli.data.download import download
        from clcli.errors import ClcliError

        try:
            print(download(args.name, args.dst, url=args.url, md5=args.md5, sha256=args.sha256,
                           keep_archive=args.keep_archive))
        except ClcliError as exc:
            print(f"clcli data: {exc}", file=sys.stderr)
            sys.exit(2)
        return
    if not args.src.is_dir():
        print(f"clcli data: --src '{args.src}' is not a directory", file=sys.stderr)
        sys.exit(2)
    if args.dst.exists() and any(args.dst.iterdir()):
        print(f"clcli data: --dst '{args.dst}' already exists and is not empty; refusing to overwrite it", file=sys.stderr)
        sys.exit(2)
    try:
        print(PREPARERS[args.name](args.src, args.dst))
    except (OSError, KeyError, ValueError) as exc:
        print(f"clcli data: preparing {args.name} from '{args.src}' failed: {exc}", file=sys.stderr)
        sys.exit(2)
