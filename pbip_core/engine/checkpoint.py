"""Checkpoints that hold only tensors and plain data, and the stage-1 model of a run folder.

A checkpoint is written atomically (:func:`save_checkpoint`) and read with ``torch.load(weights_only=True)``
(:func:`load_checkpoint`): unpickling cannot run code, so a run folder received from someone else is safe to load.
RNG states are stored as tensors and lists for that reason (:func:`encode_rng` / :func:`decode_rng`).

Checkpoints written by earlier versions of this library (full pickles) are refused with a message; convert one you
trust with ``pbip checkpoint convert FILE`` (:func:`convert_legacy`), which loads it once with the unsafe loader
and rewrites it in the safe format.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, load_config
from ..errors import DataError
from ..io import atomic_torch_save, refused_global
from ..method.model import ClassNet
from .build import build_classnet


# ---------------------------------------------------------------------- RNG state as plain data
def encode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """An :func:`~pbip_core.engine.runtime.rng_state` as tensors, lists and numbers only."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss = state["python"]
    out = {"torch": state["torch"],
           "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)},
           "python": {"version": int(version), "internal": list(internal), "gauss": gauss}}
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def decode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_rng`."""
    n = state["numpy"]
    p = state["python"]
    out = {"torch": state["torch"],
           "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]),
           "python": (p["version"], tuple(p["internal"]), p["gauss"])}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


# ---------------------------------------------------------------------- files
def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` (tensors, numbers, strings, lists, dicts) atomically; ``rng`` is encoded as plain data."""
    if "rng" in obj:
        obj = {**obj, "rng": encode_rng(obj["rng"])}
    atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path, what: str = "checkpoint", keys: tuple[str, ...] = (),
                    hint: str = "delete it and start over, or use the run's best.pt") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing, truncated, unsafe or incomplete file (one of ``keys``
    absent) is a one-line DataError naming the file and ``hint``, the way out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty {what} (0 bytes); {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused to load: the file holds Python objects other than tensors and plain data "
                        f"({refused_global(e)}); if you wrote it yourself with an older pbip, convert it "
                        f"with `pbip checkpoint convert {path}`") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = (str(e).splitlines() or [""])[0][:160]
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise DataError(f"{path}: corrupt or truncated {what} ({detail}); {hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a pbip {what} (expected a dict); {hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path}: not a complete {what} (no {', '.join(missing)}); {hint}")
    if "rng" in obj:
        obj["rng"] = decode_rng(obj["rng"])
    return obj


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with numpy arrays as tensors and numpy scalars as Python numbers; DataError naming any other object."""
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str, bytes)):
        return obj
    raise DataError(f"{where}: holds a {type(obj).__module__}.{type(obj).__qualname__}, which a safe checkpoint "
                    "cannot hold; not a pbip checkpoint")


def convert_legacy(path: str | Path, out: str | Path | None = None) -> tuple[Path, bool]:
    """Rewrite a checkpoint of an earlier pbip version (a full pickle) in the safe format.

    A file that already loads with ``weights_only=True`` is left as it is. Otherwise it is loaded once with
    ``weights_only=False``, **which runs any code hidden in it: only convert files you or your colleagues wrote**,
    its RNG state is encoded as plain data, numpy values become tensors and numbers, and it is written atomically.
    Returns ``(path written or checked, converted?)``; ``out`` defaults to ``path`` (in place).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass                                     # holds Python objects: a legacy checkpoint (or worse)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]}); nothing to convert") from None
    else:
        if out is not None and Path(out) != path:
            atomic_torch_save(torch.load(path, map_location="cpu", weights_only=True), out)
        return Path(out) if out is not None else path, False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: corrupt or not a checkpoint ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]}); nothing to convert") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a pbip checkpoint (expected a dict)")
    if isinstance(obj.get("rng"), dict) and isinstance(obj["rng"].get("numpy"), tuple):
        obj["rng"] = encode_rng(obj["rng"])
    obj = _plain(obj, str(path))
    target = Path(out) if out is not None else path
    atomic_torch_save(obj, target)
    return target, True


# ---------------------------------------------------------------------- stage-1 runs
def load_classnet(run_dir: str | Path, checkpoint: str = "best.pt", device: str = "cpu") -> tuple[ClassNet, Config]:
    """Rebuild the ClassNet of a stage-1 run from its config and checkpoint (no pretrained weights needed)."""
    run = Path(run_dir)
    ckpt_path = run / checkpoint
    if not ckpt_path.is_file():
        ckpt_path = run / "last.pt"
    if not (run / "config.yaml").is_file() or not ckpt_path.is_file():
        raise DataError(f"{run}: not a finished stage-1 run (needs config.yaml and {checkpoint} or last.pt)")
    cfg = load_config(run / "config.yaml")
    hint = "pass --checkpoint with the run's other file (best.pt / last.pt), or train the run again"
    sd = load_checkpoint(ckpt_path, "stage-1 checkpoint", keys=("classnet",), hint=hint)["classnet"]
    net = build_classnet(cfg.model, sd["prototypes"], pretrained=False)
    net.load_state_dict(sd)
    return net.to(device).eval(), cfg
