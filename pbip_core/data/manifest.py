"""The data manifest: where every dataset and pretrained weight comes from (``pbip_core/data/manifest.yaml``).

The YAML file ships inside the package (package data); its header documents the fields. ``pbip data list`` prints it.
"""

from __future__ import annotations

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
