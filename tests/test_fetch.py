"""``pbip data fetch``: downloads with checksums (pooch), unpacking, conversion, and the offline instructions.

No test reaches the internet: downloads come from an ``http.server`` on 127.0.0.1 serving files the test wrote; the
offline path uses a closed port on 127.0.0.1 (a refused connection, as without network).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import make_dataset
from pbip_core.cli import main as cli_main
from pbip_core.data import fetch as F
from pbip_core.data.check import check_dataset
from pbip_core.data.manifest import load_manifest
from pbip_core.errors import DataError

EBHI = Path(__file__).parent / "fixtures" / "ebhi-seg"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving a temporary folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # keep pytest's output clean
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]       # closed again when the block ends: connections are refused


def _zip_folder(src: Path, dest: Path, top: str) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(src).as_posix()}")
    return dest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(url: str, file: str, sha256: str | None, convert: str | None = None, md5: str | None = None) -> dict:
    m = copy.deepcopy(load_manifest())
    m["datasets"]["toy"] = {"title": "toy", "source": url, "local_dir": "data/toy", "classes": None,
                            "download": [{"url": url, "file": file, "sha256": sha256, "md5": md5, "unpack": "zip"}],
                            "convert": convert, "manual": None}
    return m


@pytest.fixture(scope="module")
def toy_zip(server, tmp_path_factory):
    served, base = server
    ds = make_dataset(tmp_path_factory.mktemp("toy"), n_train=4, n_val=2, n_test=2, name="toy")
    path = _zip_folder(ds, served / "toy.zip", "toy")
    return f"{base}/toy.zip", _sha256(path)


# ------------------------------------------------------------------------------------------------ downloads
def test_fetch_downloads_verifies_unpacks(tmp_path, toy_zip):
    url, sha = toy_zip
    res = F.fetch_dataset("toy", out=tmp_path / "out", cache=tmp_path / "cache", progress=False,
                          manifest=_manifest(url, "toy.zip", sha))
    assert res.out == tmp_path / "out" and check_dataset(res.out) == []
    assert res.files == {str(tmp_path / "cache" / "toy.zip"): sha}
    assert not any("not in the manifest" in n for n in res.notes)
    assert len(list((res.out / "train").glob("*.png"))) == 4 and (res.out / F.MARKER).is_file()


def test_fetch_reuses_a_file_in_the_cache_without_network(tmp_path, toy_zip):
    """A file downloaded by hand into the cache is checked and used; nothing is downloaded."""
    url, sha = toy_zip
    (tmp_path / "cache").mkdir()
    shutil.copy(Path(F.pooch.retrieve(url, known_hash=f"sha256:{sha}", path=str(tmp_path / "dl"),
                                      progressbar=False)), tmp_path / "cache" / "toy.zip")
    offline = f"http://127.0.0.1:{_closed_port()}/toy.zip"
    res = F.fetch_dataset("toy", out=tmp_path / "out", cache=tmp_path / "cache", progress=False,
                          manifest=_manifest(offline, "toy.zip", sha))
    assert check_dataset(res.out) == []


def test_fetch_rejects_a_wrong_checksum(tmp_path, toy_zip):
    url, _ = toy_zip
    with pytest.raises(DataError, match="checksum mismatch"):
        F.fetch_dataset("toy", out=tmp_path / "out", cache=tmp_path / "cache", progress=False,
                        manifest=_manifest(url, "toy.zip", "0" * 64))
    assert not (tmp_path / "out").exists()


def test_fetch_checks_md5_when_no_sha256_is_recorded(tmp_path, server, toy_zip):
    url, _ = toy_zip
    md5 = hashlib.md5((server[0] / "toy.zip").read_bytes()).hexdigest()
    res = F.fetch_dataset("toy", out=tmp_path / "a", cache=tmp_path / "c1", progress=False,
                          manifest=_manifest(url, "toy.zip", None, md5=md5))
    assert check_dataset(res.out) == []
    with pytest.raises(DataError, match="checksum mismatch"):
        F.fetch_dataset("toy", out=tmp_path / "b", cache=tmp_path / "c2", progress=False,
                        manifest=_manifest(url, "toy.zip", None, md5="0" * 32))


def test_fetch_without_a_checksum_prints_the_sha256_to_record(tmp_path, toy_zip):
    url, sha = toy_zip
    res = F.fetch_dataset("toy", out=tmp_path / "out", cache=tmp_path / "cache", progress=False,
                          manifest=_manifest(url, "toy.zip", None))
    assert any(f"sha256 {sha} is not in the manifest" in n and "datasets.toy.download[0].sha256" in n
               for n in res.notes), res.notes


def test_fetch_converts_with_the_importer(tmp_path, server):
    """EBHI-Seg: the release (here the 12 real fixture pairs, zipped) is unpacked and imported."""
    served, base = server
    path = _zip_folder(EBHI / "EBHI-SEG", served / "EBHI-SEG.zip", "EBHI-SEG")
    m = _manifest(f"{base}/EBHI-SEG.zip", "EBHI-SEG.zip", _sha256(path), convert="ebhi-seg")
    res = F.fetch_dataset("toy", out=tmp_path / "ebhi", cache=tmp_path / "cache", progress=False, manifest=m)
    assert check_dataset(res.out) == []
    assert (res.out / "dataset.yaml").is_file() and "ebhi-seg" in (res.out / "dataset.yaml").read_text()


def test_rar_without_a_tool_says_how_to_unpack(tmp_path, monkeypatch):
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    (tmp_path / "x.rar").write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(DataError, match="none of unrar, 7z, bsdtar is installed; unpack it by hand"):
        F._unpack(tmp_path / "x.rar", "rar", tmp_path / "x.rar.unpacked")


# ------------------------------------------------------------------------------------------------ offline
def test_offline_fetch_says_what_to_download_and_where(tmp_path, capsys, monkeypatch):
    """No network (a refused connection): exit 2, the URL, the file to save in the cache, the command to rerun."""
    url = f"http://127.0.0.1:{_closed_port()}/toy.zip"
    m = _manifest(url, "toy.zip", "ab" * 32)
    monkeypatch.setattr(F, "load_manifest", lambda: m)
    rc = cli_main(["data", "fetch", "toy", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert rc == 2
    assert f"Download {url} and save it as {tmp_path / 'cache' / 'toy.zip'} (sha256 {'ab' * 32})" in cap.out
    assert f"pbip data fetch toy --cache {tmp_path / 'cache'} --out {tmp_path / 'out'}" in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pbip data: error: toy: cannot download") and "ConnectionError" in err[0]
    assert not (tmp_path / "out").exists()


def test_dataset_without_a_download_prints_the_manual_steps(tmp_path, capsys):
    rc = cli_main(["data", "fetch", "bcss-wsss", "--out", str(tmp_path / "b")])
    cap = capsys.readouterr()
    assert rc == 2
    assert "https://drive.google.com/drive/folders/1iS2Z0DsbACqGp7m6VDJbAcgzeXNEFr77" in cap.out
    assert f"Put the dataset folder at {tmp_path / 'b'}" in cap.out
    assert cap.err.strip() == ("pbip data: error: bcss-wsss: no direct download in the manifest "
                               "(https://github.com/ChuHan89/WSSS-Tissue); get it by hand as above")


def test_unknown_dataset_is_a_one_line_error(capsys):
    assert cli_main(["data", "fetch", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the manifest
def test_every_dataset_says_how_to_get_it():
    m = load_manifest()
    for name, d in m["datasets"].items():
        items = F.downloads(d)
        assert items or d.get("manual"), f"{name}: neither download nor manual"
        for item in items:
            assert item["url"].startswith("https://") and item.get("unpack") in (None, "zip", "tar", "rar"), name
            assert "sha256" in item and "md5" in item and item.get("hash_source"), name
            assert item["sha256"] is None or len(item["sha256"]) == 64
            assert item["md5"] is None or len(item["md5"]) == 32
        assert d.get("convert") in (None, *F.CONVERTERS), name
        assert "sha256" not in d, f"{name}: checksums belong to the download files"
    assert m["datasets"]["kather2016"]["download"][0]["md5"] == "0ddbebfc56344752028fda72602aaade"
    assert m["datasets"]["ebhi-seg"]["convert"] == "ebhi-seg"


def test_manifest_classes_of_built_in_and_imported_datasets_match_the_code():
    """`pbip data check` compares folders with these entries: they must say what the writers write."""
    from pbip_core.data import ebhi_seg, kather_mosaic

    d = load_manifest()["datasets"]
    for mod, name in ((kather_mosaic, "kather-mosaic"), (ebhi_seg, "ebhi-seg")):
        assert mod.NAME == name
        assert tuple(d[name]["classes"]) == tuple(mod.CLASSES)
        assert d[name]["background_index"] == mod.BACKGROUND_INDEX
        assert [tuple(c) for c in d[name]["palette"]] == [tuple(c) for c in mod.PALETTE]
