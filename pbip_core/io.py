"""Atomic file output and checked image input.

Everything the library writes goes to a temporary name in the same folder and is renamed into place, so an
interrupted run never leaves a half-written checkpoint, mask or JSON file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)          # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_png(array: np.ndarray, path: str | Path, palette: list[tuple[int, int, int]] | None = None) -> None:
    """Write an RGB (H, W, 3) uint8 image, or an (H, W) index mask as a P-mode PNG with ``palette``."""
    if array.ndim == 2:
        if palette is None:                          # a plain 8-bit index mask (P mode without a palette loses bits)
            img = Image.fromarray(array.astype(np.uint8), mode="L")
        else:
            img = Image.fromarray(array.astype(np.uint8), mode="P")
            flat = [c for rgb in palette for c in rgb]
            img.putpalette(flat + [0] * (768 - len(flat)))
    else:
        img = Image.fromarray(array.astype(np.uint8), mode="RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; a corrupt or unreadable file raises DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel class-index mask (P or L mode) as (H, W) uint8."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(
                    f"{path}: mask must be a single-channel class-index PNG (P or L mode), found mode {im.mode}"
                )
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt mask PNG ({type(e).__name__}: {e})") from None
    return arr.astype(np.uint8) if arr.max(initial=0) < 256 else arr
