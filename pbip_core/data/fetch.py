"""``pbip data fetch NAME``: download a manifest dataset with checksums, unpack it, convert it to a dataset folder.

Each dataset of ``pbip_core/data/manifest.yaml`` says how it can be had:

* ``download``: a list of files, each ``{url, file, sha256, md5, unpack}``. They are downloaded with
  :func:`pooch.retrieve` into a cache folder (default ``data/downloads``) and checked against ``sha256`` (else
  ``md5``, the checksum some hosts publish). A file already in the cache is checked and reused, so a file
  downloaded by hand is picked up. A file without a recorded checksum is downloaded, its sha256 printed, and the
  user asked to record it in the manifest. ``unpack``: ``zip`` / ``tar`` (with pooch's processors), ``rar`` (with
  ``unrar``, ``7z`` or ``bsdtar`` when one is installed), or ``null``.
* ``convert``: what turns the unpacked release into the dataset-folder format: the name of an importer
  (``ebhi-seg`` -> :func:`pbip_core.data.ebhi_seg.import_ebhi_seg`) or ``null`` (the release is used as it is:
  the unpacked folder becomes the output folder).
* ``manual``: for datasets without a direct download (Google Drive folders, scripts of their own): what to download
  by hand and where to put it.

Nothing is downloaded when there is no network: :func:`fetch_dataset` raises :class:`FetchUnavailable`, whose
``steps`` say exactly which file to download from where, and where to put it (the CLI prints them and exits 2).
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pooch
import requests

from ..errors import DataError
from .ebhi_seg import import_ebhi_seg
from .manifest import dataset_entry, load_manifest
from .staging import staged_folder

DEFAULT_CACHE = Path("data") / "downloads"
MARKER = ".pbip-fetch"
CONVERTERS: dict[str, Callable[..., Path]] = {"ebhi-seg": import_ebhi_seg}
RAR_TOOLS = (("unrar", ["x", "-o+", "-idq"]), ("7z", ["x", "-y", "-bd"]), ("bsdtar", ["-xf"]))
# What a failed download raises: no network, a refused or failed HTTP request, a broken connection.
NETWORK_ERRORS = (requests.RequestException, ConnectionError, TimeoutError)


class FetchUnavailable(DataError):
    """The dataset cannot be fetched here (no URL, or no network); ``steps`` tell how to get it by hand."""

    def __init__(self, reason: str, steps: list[str]) -> None:
        super().__init__(reason)
        self.steps = steps


@dataclass
class FetchResult:
    """What :func:`fetch_dataset` did: the output folder, the files and their sha256, and notes for the user."""

    name: str
    out: Path
    files: dict[str, str] = field(default_factory=dict)        # cached file -> sha256
    notes: list[str] = field(default_factory=list)


def downloads(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's ``download`` list (``[]`` when the dataset has no direct download)."""
    items = entry.get("download") or []
    if not isinstance(items, list) or not all(isinstance(d, dict) and d.get("url") and d.get("file") for d in items):
        raise DataError("manifest: 'download' must be a list of {url, file, sha256, md5, unpack} entries")
    return items


def known_hash(item: dict[str, Any]) -> str | None:
    """The checksum pooch verifies: ``sha256`` if recorded, else ``md5:<hex>``, else None (not recorded)."""
    if item.get("sha256"):
        return f"sha256:{item['sha256']}"
    if item.get("md5"):
        return f"md5:{item['md5']}"
    return None


def manual_steps(name: str, entry: dict[str, Any], cache: Path, out: Path) -> list[str]:
    """Numbered lines: what to download by hand, from where, where to put it and what to run next."""
    steps = []
    items = downloads(entry)
    for item in items:
        check = (f"sha256 {item['sha256']}" if item.get("sha256") else f"md5 {item['md5']}" if item.get("md5")
                 else "no checksum recorded yet")
        size = f"{item['size']}, " if item.get("size") else ""
        steps.append(f"Download {item['url']} and save it as {cache / item['file']} ({size}{check}).")
    if items:
        steps.append(f"Run `pbip data fetch {name} --cache {cache} --out {out}` again: it checks the file(s) there, "
                     "unpacks and converts them.")
    else:
        manual = " ".join(str(entry.get("manual") or f"Get it from {entry.get('source')}.").split())
        steps.append(manual)
        steps.append(f"Put the dataset folder at {out} (or pass --data DIR to the commands), then check it with "
                     f"`pbip data check {out}`.")
    return [f"{i}. {s}" for i, s in enumerate(steps, 1)]


def fetch_dataset(name: str, out: str | Path | None = None, cache: str | Path | None = None, overwrite: bool = False,
                  progress: bool = True, manifest: dict[str, Any] | None = None) -> FetchResult:
    """Download, verify, unpack and convert the manifest dataset ``name`` into ``out`` (default its ``local_dir``).

    Raises :class:`FetchUnavailable` (with the manual steps) when the dataset has no direct download or the network
    cannot be reached, :class:`DataError` when a checksum does not match or unpacking/conversion fails.
    """
    m = manifest or load_manifest()
    entry = dataset_entry(name, m)
    out = Path(out) if out is not None else Path(entry.get("local_dir") or f"data/{name}")
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    items = downloads(entry)
    if not items:
        where = entry.get("source") or "its source"
        raise FetchUnavailable(f"{name}: no direct download in the manifest ({where}); get it by hand as above",
                               manual_steps(name, entry, cache, out))
    result = FetchResult(name, out)
    cache.mkdir(parents=True, exist_ok=True)
    unpacked = []
    for item in items:
        path = _retrieve(name, entry, item, cache, out, progress)
        sha = pooch.file_hash(str(path), alg="sha256")
        result.files[str(path)] = sha
        if not item.get("sha256"):
            result.notes.append(f"{path.name}: sha256 {sha} is not in the manifest yet: record it as "
                                f"datasets.{name}.download[{items.index(item)}].sha256 in pbip_core/data/manifest.yaml")
        unpacked.append(_unpack(path, item.get("unpack"), cache / f"{Path(item['file']).name}.unpacked"))
    convert = entry.get("convert")
    if convert:
        if convert not in CONVERTERS:
            raise DataError(f"manifest: datasets.{name}.convert = {convert!r}; known converters: {sorted(CONVERTERS)}")
        CONVERTERS[convert](unpacked[0], out, overwrite=overwrite, progress=progress)
        result.notes.append(f"converted with `pbip data import {convert}`; check it with `pbip data check {out}`")
    else:
        with staged_folder(out, overwrite, MARKER, f"pbip data fetch {name}") as tmp:
            for src in unpacked:
                _copy_into(src, tmp)
        what = entry.get("fetched") or f"check it with `pbip data check {out}`"
        result.notes.append(" ".join(str(what).split()))
    return result


def _retrieve(name: str, entry: dict[str, Any], item: dict[str, Any], cache: Path, out: Path,
              progress: bool) -> Path:
    """pooch.retrieve one file into ``cache`` (reused when present and matching); errors -> one-line DataError."""
    try:
        return Path(pooch.retrieve(item["url"], known_hash=known_hash(item), fname=Path(item["file"]).name,
                                   path=str(cache), progressbar=progress))
    except NETWORK_ERRORS as e:
        raise FetchUnavailable(f"{name}: cannot download {item['url']} ({type(e).__name__}); get it by hand as above",
                               manual_steps(name, entry, cache, out)) from None
    except ValueError as e:                         # pooch: the file's hash differs from the known one
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{cache / Path(item['file']).name}: checksum mismatch ({first}); delete the file and "
                        "download it again") from None


def _unpack(path: Path, kind: str | None, dest: Path) -> Path:
    """Unpack ``path`` (``zip``, ``tar``, ``rar``) into ``dest`` and return it; ``None`` returns ``path`` itself."""
    if not kind:
        return path
    if kind == "zip":
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a zip archive")
        pooch.Unzip(extract_dir=str(dest.resolve()))(str(path), "fetch", None)     # unpacks once (kept in the cache)
    elif kind == "tar":
        pooch.Untar(extract_dir=str(dest.resolve()))(str(path), "fetch", None)
    elif kind == "rar":
        _unrar(path, dest)
    else:
        raise DataError(f"manifest: unpack = {kind!r} for {path.name}; use zip, tar, rar or null")
    return dest


def _unrar(path: Path, dest: Path) -> None:
    """Unpack a RAR archive with the first of ``unrar``, ``7z``, ``bsdtar`` found on PATH (Python has no RAR reader)."""
    if dest.is_dir() and any(dest.iterdir()):
        return
    for tool, args in RAR_TOOLS:
        exe = shutil.which(tool)
        if exe is None:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        target = [f"-o{dest}"] if tool == "7z" else ["-C", str(dest)] if tool == "bsdtar" else []
        cmd = [exe, *args, str(path), *target] + ([f"{dest}/"] if tool == "unrar" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise DataError(f"{path}: {tool} failed (exit {proc.returncode}): {tail[0]}")
        return
    raise DataError(f"{path}: a RAR archive and none of unrar, 7z, bsdtar is installed; unpack it by hand into "
                    f"{dest} (e.g. `apt-get install unrar` or `libarchive-tools`), then run the command again")


def _copy_into(src: Path, dest: Path) -> None:
    """Copy the unpacked release into ``dest``; a single top-level folder is unwrapped (``X.zip`` -> ``X/``)."""
    if src.is_file():
        shutil.copy2(src, dest / src.name)
        return
    entries = [p for p in src.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        src = entries[0]
    for p in src.iterdir():
        if p.name == "__MACOSX":
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dest / p.name)
