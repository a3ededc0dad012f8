"""The data manifest: where every dataset and pretrained weight comes from (``pbip_core/data/manifest.yaml``).

The YAML file ships inside the package (package data); its header documents the fields. ``pbip data list`` prints it,
``pbip data fetch`` downloads from it (:mod:`pbip_core.data.fetch`). Its ``shipped`` section lists the third-party
files of the repository with a ``SHA256SUMS`` file each; :func:`verify_sums` checks such a folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError, WeightsError

MANIFEST_PATH = Path(__file__).with_name("manifest.yaml")


def load_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """``{"datasets": {name: entry}, "weights": {name: entry}}`` from ``pbip_core/data/manifest.yaml``."""
    p = Path(path) if path is not None else MANIFEST_PATH
    if not p.is_file():
        raise DataError(f"{p}: data manifest not found (it ships inside the package: reinstall pbip-core)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict) or not isinstance(
            data.get("weights"), dict):
        raise DataError(f"{p}: expected top-level mappings 'datasets' and 'weights'")
    return data


def dataset_entry(name: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    m = manifest or load_manifest()
    if name not in m["datasets"]:
        raise DataError(f"unknown dataset {name!r}; the manifest lists {', '.join(m['datasets'])}")
    return m["datasets"][name]


def weights_entry(name: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    m = manifest or load_manifest()
    if name not in m["weights"]:
        raise WeightsError(f"unknown weights {name!r}; the manifest lists {', '.join(m['weights'])}")
    return m["weights"][name]


def read_sums(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of a ``sha256sum`` file (``<hex>  <path>`` per line)."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise DataError(f"{path}:{n}: expected '<sha256>  <path>'")
        out[name.lstrip("*")] = digest
    return out


def verify_sums(folder: str | Path, sums: str = "SHA256SUMS", own_files: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Problems of ``folder`` against its sums file, one line each (empty = every file listed and matching).

    Every file under ``folder`` except the sums file, ``own_files`` and hidden files must be listed, and every listed
    file must exist with that sha256.
    """
    folder = Path(folder)
    listed = read_sums(folder / sums)
    problems = []
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    for name in sorted(present - set(listed) - set(own_files) - {sums}):
        problems.append(f"{folder / name}: not listed in {folder / sums}")
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in {folder / sums} but missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{path}: sha256 differs from {folder / sums}")
    return problems
