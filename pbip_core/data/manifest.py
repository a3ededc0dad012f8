"""The data manifest: where every dataset and pretrained weight comes from (``data_manifest.yaml``).

The YAML file sits at the repository root, next to the package; its header documents the fields.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError, WeightsError

MANIFEST_PATH = Path(__file__).resolve().parents[2] / "data_manifest.yaml"


def load_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """``{"datasets": {name: entry}, "weights": {name: entry}}`` from ``data_manifest.yaml``."""
    p = Path(path) if path is not None else MANIFEST_PATH
    if not p.is_file():
        raise DataError(f"{p}: data manifest not found (it ships at the repository root next to pbip_core/)")
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


def weights_env_var(name: str) -> str:
    """``'pathmnist-densenet121'`` -> ``'PBIP_WEIGHTS_PATHMNIST_DENSENET121'``."""
    return "PBIP_WEIGHTS_" + re.sub(r"[^A-Za-z0-9]+", "_", name).upper().strip("_")


def weights_local_dir(name: str) -> Path | None:
    """The local directory given by ``PBIP_WEIGHTS_<NAME>``, if set (its existence is the caller's check)."""
    value = os.environ.get(weights_env_var(name))
    return Path(value).expanduser() if value else None
