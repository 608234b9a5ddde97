"""``clcli data download NAME --dst DIR``: fetch a benchmark's archive, verify it, extract it and
run ``clcli data prepare`` on it (:mod:`clcli.data.prepare`).

The download is resumable: bytes go to ``<archive>.part`` in the work folder ``<dst>.download/``
next to ``--dst``, and a rerun (or an automatic retry after a dropped connection) continues it
with an HTTP ``Range`` request. torchvision's ``download_url`` would fit otherwise, but it always
starts from byte 0 (``urlretrieve``), which is why this module has its own small downloader.
The archive is renamed from ``.part`` only once its checksum matches; a mismatch deletes it. The
dataset is prepared in the work folder and moved to ``--dst`` in one rename, so ``--dst`` is either
absent or complete; an existing prepared dataset is never touched.

Checksums: the MD5s below are those the archives are known by in other libraries' dataset code
(ImageNet-R: torch-uncertainty's ``ImageNetR``, pytorch-ood; CUB-200-2011: avalanche's ``CUB200``,
also used with the Caltech DATA URL). No SHA-256 is published for either archive; ``--md5`` /
``--sha256`` replace the known checksum (e.g. for a mirror that repacks the archive).

``--url URL`` downloads from another address; ``CLCLI_DATA_MIRROR=BASE`` looks the archive's file
name up under ``BASE/`` (a local mirror, or the tests' HTTP server).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from clcli.errors import DataError

MIRROR_ENV = "CLCLI_DATA_MIRROR"
CHUNK = 1 << 20
MAX_ATTEMPTS = 20  # retries continue only while each attempt adds bytes


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str | None
    top: str  # the folder the archive extracts to: the --src of `clcli data prepare`


ARCHIVES = {
    "imagenet_r": Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                          "a61312130a589d0ca1a8fca1f2bd3337", "imagenet-r"),
    "cub200": Archive("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                      "97eceeb196236b17998738112f37df78", "CUB_200_2011"),
}


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def source_url(name: str, url: str | None = None) -> str:
    """``--url``, else the archive's file name under ``$CLCLI_DATA_MIRROR``, else the official URL."""
    if url:
        return url
    official = ARCHIVES[name].url
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{official.rsplit('/', 1)[1]}" if mirror else official


def is_prepared(dst: Path) -> bool:
    """A prepared benchmark folder: ``train/`` and ``val/`` each with at least one class folder."""
    return all((dst / s).is_dir() and any(p.is_dir() for p in (dst / s).iterdir()) for s in ("train", "val"))


def download_error(name: str, what: str, dst: Path, part: Path) -> DataError:
    """``what`` went wrong, what was kept, and how to get the data another way."""
    archive = ARCHIVES[name]
    file = archive.url.rsplit("/", 1)[1]
    kept = f" The {part.stat().st_size} bytes already downloaded are kept in '{part}'; rerunning this command resumes." \
        if part.is_file() and part.stat().st_size else ""
    return DataError(
        f"cannot download {name}: {what}{kept} Alternatively download the archive on a machine with network access "
        f"(`wget {archive.url}`), check it (`md5sum {file}` should print {archive.md5}), copy it here, extract it "
        f"(`tar -xf {file}`) and run `clcli data prepare {name} --src {archive.top} --dst {dst}`."
    )


def unreachable(url: str, reason: object) -> str:
    return f"{url} is unreachable ({reason}): the network (or that server) cannot be reached from this machine."


def fetch(url: str, part: Path, progress=None) -> None:
    """Download ``url`` into ``part``, continuing a partial file with ``Range: bytes=<size>-``
    (a server that answers 200 instead of 206 sends everything again: the file restarts). Raises
    ``urllib.error.URLError`` / ``OSError`` as they come; a short body raises ``ConnectionError``
    with the bytes received kept."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "clcli-data-download", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
        if exc.code == 416 and total.isdigit() and int(total) == have:
            return  # the .part already holds the whole file
        if exc.code == 416:
            part.unlink()  # larger than the file on the server: not a prefix of it
        raise
    with resp:
        if have and resp.status == 206:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").partition("-")[0]
            if start != str(have):
                raise ConnectionError(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        if progress is not None:
            progress.update(total=total, completed=have)
        with open(part, mode) as f:
            while block := resp.read(CHUNK):
                f.write(block)
                have += len(block)
                if progress is not None:
                    progress.update(completed=have)
    if total is not None and have < total:
        raise ConnectionError(f"the connection closed after {have} of {total} bytes")


def download_archive(name: str, url: str, work: Path, dst: Path, checksum: tuple[str, str] | None) -> Path:
    """The verified archive in ``work`` (downloaded, resumed, or already there from an earlier run)."""
    target = work / url.rsplit("/", 1)[1].split("?")[0]
    part = target.with_name(target.name + ".part")
    if not target.is_file():
        work.mkdir(parents=True, exist_ok=True)
        columns = (TextColumn(target.name), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("download", total=None)
            for _ in range(MAX_ATTEMPTS):
                before = part.stat().st_size if part.is_file() else 0
                try:
                    fetch(url, part, progress=_Task(bar, task))
                    break
                except urllib.error.HTTPError as exc:
                    what = f"the server answered HTTP {exc.code} ({exc.reason}) for {url}; check the URL (--url, ${MIRROR_ENV})."
                    raise download_error(name, what, dst, part) from exc
                except (urllib.error.URLError, OSError) as exc:
                    after = part.stat().st_size if part.is_file() else 0
                    if after <= before:  # no progress: unreachable, or dropped before any byte
                        raise download_error(name, unreachable(url, getattr(exc, "reason", exc)), dst, part) from exc
            else:
                raise download_error(name, unreachable(url, f"still incomplete after {MAX_ATTEMPTS} attempts"), dst, part)
        part.replace(target)
    if checksum is not None:
        algorithm, expected = checksum
        got = file_digest(target, algorithm)
        if got != expected.lower():
            target.unlink()
            raise DataError(
                f"cannot download {name}: the archive from {url} has {algorithm.upper()} {got}, expected {expected} "
                f"({'given with --' + algorithm if checksum != _known(name) else 'the official archive'}). It is corrupt "
                "or not the same file; it was deleted and nothing was extracted. Rerun to download it again; if the "
                "mismatch persists, check the URL, or verify the archive yourself and pass its checksum with --md5/--sha256."
            )
    return target


def _known(name: str) -> tuple[str, str] | None:
    md5 = ARCHIVES[name].md5
    return ("md5", md5) if md5 else None


class _Task:
    """A rich progress task seen as ``update(total=?, completed=?)``."""

    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def update(self, **kw):
        self.bar.update(self.task, **kw)


def extract(archive: Path, into: Path) -> None:
    """Extract a tar archive (any compression) refusing members that leave ``into`` (tarfile's
    ``data`` filter where this Python has it)."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
            return
        root = into.resolve()
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or not (root / m.name).resolve().is_relative_to(root):
                raise DataError(f"{archive}: refusing the archive member '{m.name}' (a link or a path outside the folder).")
        tar.extractall(into)


def download(name: str, dst: Path, url: str | None = None, md5: str | None = None, sha256: str | None = None,
             keep_archive: bool = False) -> str:
    """Download, verify, extract and prepare ``name`` into ``dst``; returns a one-line summary."""
    from clcli.data.prepare import PREPARERS

    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if dst.is_dir() and is_prepared(dst):
            return f"{name}: '{dst}' already holds a prepared dataset (train/ and val/); nothing downloaded."
        raise DataError(f"cannot download {name} into --dst '{dst}': it exists and is not a prepared dataset (no train/ "
                        "and val/ class folders); refusing to overwrite it. Move it away or choose another --dst.")
    url = source_url(name, url)
    checksum = ("sha256", sha256) if sha256 else ("md5", md5) if md5 else _known(name)
    work = dst.with_name(dst.name + ".download")
    if checksum is None:
        print(f"clcli data: no checksum is known for {name}: the archive is not verified (pass --md5 or --sha256).",
              file=sys.stderr)
    try:
        archive = download_archive(name, url, work, dst, checksum)
    finally:
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # nothing kept (a failed first attempt, a deleted corrupt archive)
    extracted, staged = work / "extracted", work / "prepared"
    for leftover in (extracted, staged):  # an interrupted earlier run: our own scratch folders
        shutil.rmtree(leftover, ignore_errors=True)
    print(f"extracting {archive.name} ...", file=sys.stderr)
    try:
        extract(archive, extracted)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(extracted, ignore_errors=True)
        raise DataError(f"cannot extract {archive} ({type(exc).__name__}: {exc}); delete it and rerun.") from exc
    src = extracted / ARCHIVES[name].top
    if not src.is_dir():
        shutil.rmtree(extracted, ignore_errors=True)
        raise DataError(f"{archive} does not contain the folder '{ARCHIVES[name].top}/' that {name} extracts to; "
                        f"is it the {name} archive? Delete it and check --url.")
    try:
        message = PREPARERS[name](src, staged)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"preparing {name} from '{src}' failed: {exc}. The verified archive is kept in '{archive}'.") from exc
    if dst.is_dir():
        dst.rmdir()  # empty (checked above): the rename needs the name free
    dst.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(dst)
    shutil.rmtree(extracted)
    if not keep_archive:
        archive.unlink()
        if not any(work.iterdir()):
            work.rmdir()
    return message.replace(str(staged), str(dst))
