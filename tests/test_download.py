"""``clcli data download`` against a local HTTP server that serves tiny archives and honours Range."""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from clcli.data.download import ARCHIVES
from clcli.data.prepare import prepare_imagenet_r


class Server:
    """Serves ``files`` (path -> bytes). Logs (path, Range header, body bytes sent) per request.
    ``cut`` (path -> n) sends only the first n body bytes of the next full response, then closes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    server.log.append((self.path, self.headers.get("Range"), 0))
                    return
                rng = self.headers.get("Range")
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    server.log.append((self.path, rng, 0))
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                body = body[: server.cut.pop(self.path, len(body))]
                self.wfile.write(body)
                server.log.append((self.path, rng, len(body)))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed % 256, 7, 9)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _imagenet_r_files() -> dict[str, bytes]:
    return {f"imagenet-r/n0{c}/{i}.jpg": _jpeg(10 * c + i) for c in range(3) for i in range(5)}


def _cub_files() -> dict[str, bytes]:
    rels = ["001.Black_footed_Albatross/a1.jpg", "001.Black_footed_Albatross/a2.jpg", "002.Laysan_Albatross/b1.jpg",
            "002.Laysan_Albatross/b2.jpg"]
    files = {f"CUB_200_2011/images/{r}": _jpeg(i) for i, r in enumerate(rels)}
    files["CUB_200_2011/images.txt"] = "".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)).encode()
    files["CUB_200_2011/train_test_split.txt"] = b"1 1\n2 0\n3 0\n4 1\n"
    files["attributes.txt"] = b"1 has_bill_shape::curved\n"  # the real archive has it at the top level too
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _download(name, dst, *extra, capsys):
    return run_cli(["data", "download", name, "--dst", str(dst), *extra], capsys)


def test_known_archives_are_the_official_urls_with_their_md5():
    assert ARCHIVES["imagenet_r"].url == "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
    assert ARCHIVES["imagenet_r"].md5 == "a61312130a589d0ca1a8fca1f2bd3337"
    assert ARCHIVES["cub200"].url == "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    assert ARCHIVES["cub200"].md5 == "97eceeb196236b17998738112f37df78"


def test_download_verifies_extracts_and_prepares_imagenet_r(tmp_path, server, capsys):
    files = _imagenet_r_files()
    archive = _tar(files, "w")
    server.files["/imagenet-r.tar"] = archive
    dst = tmp_path / "data" / "imagenet-r"
    code, out = _download("imagenet_r", dst, "--url", f"{server.base}/imagenet-r.tar",
                          "--md5", hashlib.md5(archive).hexdigest(), capsys=capsys)
    assert code == 0, out
    assert "12 train / 3 val images of 3 classes" in out and str(dst) in out
    # the reference: the prepare step run on the same files, extracted by hand
    src = tmp_path / "by_hand"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    prepare_imagenet_r(src / "imagenet-r", tmp_path / "reference")
    assert _tree(dst) == _tree(tmp_path / "reference") and len(_tree(dst)) == 15
    assert server.log == [("/imagenet-r.tar", None, len(archive))]
    assert not (tmp_path / "data" / "imagenet-r.download").exists()  # archive and scratch folders removed
    # a second run finds the prepared dataset and leaves it alone, without a request
    code, out = _download("imagenet_r", dst, "--url", f"{server.base}/imagenet-r.tar", capsys=capsys)
    assert code == 0 and "already holds a prepared dataset" in out and len(server.log) == 1


def test_download_cub_through_the_mirror_env_with_sha256(tmp_path, server, capsys, monkeypatch):
    archive = _tar(_cub_files(), "w:gz")
    server.files["/CUB_200_2011.tgz"] = archive
    monkeypatch.setenv("CLCLI_DATA_MIRROR", server.base + "/")
    dst = tmp_path / "cub_200"
    code, out = _download("cub200", dst, "--sha256", hashlib.sha256(archive).hexdigest(), "--keep-archive",
                          capsys=capsys)
    assert code == 0, out
    assert set(_tree(dst)) == {"train/001.Black_footed_Albatross/a1.jpg", "train/002.Laysan_Albatross/b2.jpg",
                               "val/001.Black_footed_Albatross/a2.jpg", "val/002.Laysan_Albatross/b1.jpg"}
    assert _tree(dst)["val/002.Laysan_Albatross/b1.jpg"] == _jpeg(2)
    assert [p for p, _, _ in server.log] == ["/CUB_200_2011.tgz"]
    assert (tmp_path / "cub_200.download" / "CUB_200_2011.tgz").read_bytes() == archive  # --keep-archive
    assert sorted(p.name for p in (tmp_path / "cub_200.download").iterdir()) == ["CUB_200_2011.tgz"]


def test_a_partial_download_resumes_with_only_the_missing_bytes(tmp_path, server, capsys):
    archive = _tar(_imagenet_r_files(), "w")
    half = len(archive) // 2
    server.files["/imagenet-r.tar"] = archive
    url, md5 = f"{server.base}/imagenet-r.tar", hashlib.md5(archive).hexdigest()
    dst = tmp_path / "imagenet-r"
    # a connection dropped after half of the body: retried at once from where it stopped
    server.cut["/imagenet-r.tar"] = half
    code, out = _download("imagenet_r", dst, "--url", url, "--md5", md5, capsys=capsys)
    assert code == 0, out
    assert server.log == [("/imagenet-r.tar", None, half), ("/imagenet-r.tar", f"bytes={half}-", len(archive) - half)]
    # a .part left by an earlier (killed) run: this run asks only for the rest
    server.log.clear()
    dst2 = tmp_path / "again" / "imagenet-r"
    part = dst2.with_name("imagenet-r.download") / "imagenet-r.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:half])
    code, out = _download("imagenet_r", dst2, "--url", url, "--md5", md5, capsys=capsys)
    assert code == 0, out
    assert server.log == [("/imagenet-r.tar", f"bytes={half}-", len(archive) - half)]
    assert _tree(dst2) == _tree(dst)
    # a .part that is already whole: the server answers 416 and nothing is sent again
    server.log.clear()
    dst3 = tmp_path / "third" / "imagenet-r"
    part = dst3.with_name("imagenet-r.download") / "imagenet-r.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive)
    assert _download("imagenet_r", dst3, "--url", url, "--md5", md5, capsys=capsys)[0] == 0
    assert server.log == [("/imagenet-r.tar", f"bytes={len(archive)}-", 0)] and _tree(dst3) == _tree(dst)


def test_a_checksum_mismatch_keeps_nothing(tmp_path, server, capsys):
    archive = _tar(_imagenet_r_files(), "w")
    server.files["/imagenet-r.tar"] = archive
    dst = tmp_path / "imagenet-r"
    code, out = _download("imagenet_r", dst, "--url", f"{server.base}/imagenet-r.tar", capsys=capsys)
    assert code == 2
    got = hashlib.md5(archive).hexdigest()
    assert f"MD5 {got}, expected a61312130a589d0ca1a8fca1f2bd3337 (the official archive)" in out, out
    assert "deleted and nothing was extracted" in out and "Traceback" not in out
    assert not dst.exists() and not (tmp_path / "imagenet-r.download").exists()


def test_an_unreachable_url_is_one_paragraph_and_exit_2(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/CUB_200_2011.tgz"
    dst = tmp_path / "cub_200"
    code, out = _download("cub200", dst, "--url", url, capsys=capsys)
    assert code == 2 and "Traceback" not in out
    text = " ".join(out.split())
    assert f"{url} is unreachable" in text and "network" in text
    assert "wget https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz" in text
    assert "97eceeb196236b17998738112f37df78" in text
    assert f"clcli data prepare cub200 --src CUB_200_2011 --dst {dst}" in text
    assert list(tmp_path.iterdir()) == []  # no dst, no empty work folder


def test_an_existing_folder_is_never_overwritten(tmp_path, server, capsys):
    server.files["/imagenet-r.tar"] = _tar(_imagenet_r_files(), "w")
    dst = tmp_path / "imagenet-r"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    code, out = _download("imagenet_r", dst, "--url", f"{server.base}/imagenet-r.tar", capsys=capsys)
    assert code == 2 and "refusing to overwrite" in out
    assert _tree(dst) == {"notes.txt": b"mine"} and server.log == []


def test_an_archive_without_the_expected_folder_is_refused(tmp_path, server, capsys):
    archive = _tar({"other/n01/0.jpg": _jpeg(0)}, "w")
    server.files["/imagenet-r.tar"] = archive
    dst = tmp_path / "imagenet-r"
    code, out = _download("imagenet_r", dst, "--url", f"{server.base}/imagenet-r.tar", "--md5",
                          hashlib.md5(archive).hexdigest(), capsys=capsys)
    assert code == 2 and "does not contain the folder 'imagenet-r/'" in out, out
    assert not dst.exists() and not (tmp_path / "imagenet-r.download" / "extracted").exists()
