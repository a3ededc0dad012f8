"""Atomic file output and checked image input.

Everything the library writes goes to a temporary name in the same folder and is renamed into place, so an
interrupted run never leaves a half-written checkpoint, mask or JSON file behind.
"""

from __future__ import annotations

import json
import os
import re
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


def refused_global(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words: ``it refers to posix.system``."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it refers to {found.group(1)}" if found else (str(err).splitlines() or [""])[0][:160]


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


# ---------------------------------------------------------------------- image modes
#: How each PIL mode is read as an RGB image (docs/DESIGN.md, "Dataset folder format"). Histology images are 8-bit
#: RGB; a mode is converted only when the conversion is exact, everything else is refused with a reason, never
#: guessed (a 16-bit grayscale image converted by PIL reads as all white).
RGB_MODES: dict[str, str] = {
    "RGB": "as is (16-bit-per-channel RGB PNGs are opened by Pillow as RGB, scaled to 8 bits)",
    "RGBX": "the padding byte is dropped",
    "YCbCr": "converted (the exact JPEG colour transform)",
    "P": "converted through the palette",
    "RGBA": "converted when every pixel is opaque; real transparency is refused",
    "RGBa": "converted when every pixel is opaque; real transparency is refused",
    "PA": "converted through the palette when every pixel is opaque; real transparency is refused",
}
_GREY_MODES = {"1": "1-bit black-and-white", "L": "8-bit grayscale", "LA": "8-bit grayscale with alpha",
               "La": "8-bit grayscale with alpha", "I;16": "16-bit grayscale", "I;16L": "16-bit grayscale",
               "I;16B": "16-bit grayscale", "I;16N": "16-bit grayscale", "I": "32-bit integer grayscale",
               "F": "32-bit float grayscale"}
#: Masks hold class indices, not colours: P and L as stored; 16/32-bit integer masks when every value fits 0..255.
MASK_MODES: dict[str, str] = {
    "P": "the palette indices (not the colours)", "L": "as is",
    "I;16": "when every value is in 0..255", "I;16L": "when every value is in 0..255",
    "I;16B": "when every value is in 0..255", "I;16N": "when every value is in 0..255",
    "I": "when every value is in 0..255",
}
_FLATTEN_HINT = ("flatten it first, e.g. Image.alpha_composite(Image.new('RGBA', im.size, 'white'), "
                 "im.convert('RGBA')).convert('RGB')")


def rgb_mode_problem(mode: str) -> str | None:
    """Why an image of PIL ``mode`` cannot be read as RGB (None when it can, perhaps after an alpha check)."""
    if mode in RGB_MODES:
        return None
    if mode in _GREY_MODES:
        extra = (" (Pillow would read it as all white)" if mode.startswith("I;16")
                 else " (Pillow would clip its values to 0..255)" if mode in ("I", "F") else "")
        return (f"{_GREY_MODES[mode]} image (mode {mode}){extra}; H&E images must be 8-bit RGB: convert it to RGB "
                "with the intensity scaling you intend")
    if mode == "CMYK":
        return ("CMYK image; convert it to 8-bit RGB with a colour-managed tool (a naive CMYK->RGB conversion "
                "changes the stain colours)")
    return f"unsupported image mode {mode}; save it as 8-bit RGB"


def rgb_from_pil(im: Image.Image, path: str | Path) -> np.ndarray:
    """A loaded PIL image -> (H, W, 3) uint8 following :data:`RGB_MODES`; DataError naming ``path`` otherwise."""
    problem = rgb_mode_problem(im.mode)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    if im.mode in ("RGBA", "RGBa", "PA") or im.info.get("transparency") is not None:
        rgba = np.asarray(im.convert("RGBA"))
        transparent = int((rgba[..., 3] < 255).sum())
        if transparent:
            raise DataError(f"{path}: {transparent} of {rgba.shape[0] * rgba.shape[1]} pixels are (partly) "
                            f"transparent; images must be opaque RGB: {_FLATTEN_HINT}")
        return np.ascontiguousarray(rgba[..., :3])
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def mask_from_pil(im: Image.Image, path: str | Path) -> np.ndarray:
    """A loaded PIL mask -> (H, W) uint8 class indices following :data:`MASK_MODES`; DataError naming ``path``."""
    if im.mode not in MASK_MODES:
        if im.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA", "La", "RGBa"):
            why = (f"a colour image (mode {im.mode}): masks hold one class index per pixel (P or L mode), map each "
                   "colour to its class index")
        else:
            why = f"mode {im.mode}: masks hold one 8-bit class index per pixel (P or L mode)"
        raise DataError(f"{path}: mask must be a single-channel class-index PNG; this is {why}")
    arr = np.array(im)                                     # a writable copy, as before
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: {im.mode} mask holds values {lo}..{hi}; class indices must be 0..255 "
                            "(is this an intensity image rather than a mask?)")
        arr = arr.astype(np.uint8)
    return arr


def image_header(path: str | Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (height, width)) of an image file from its header only (no pixel decoding)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.mode, (im.size[1], im.size[0])
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB (modes: :data:`RGB_MODES`); a corrupt, unreadable or refused file
    raises DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return rgb_from_pil(im, path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel class-index mask as (H, W) uint8 (modes: :data:`MASK_MODES`)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return mask_from_pil(im, path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt mask PNG ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- output paths
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """DataError unless ``path`` is a folder, or can be created as one, that this process may write into.

    Writes nothing (the permission test is ``os.access`` on the nearest existing folder; root passes it except on a
    read-only file system).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DataError(f"{p}: {what} is an existing file, not a folder; give a folder path")
    anc = _nearest_existing(p)
    if not anc.is_dir():
        raise DataError(f"{p}: {what} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DataError(f"{p}: {what}: no permission to write in {anc}")
    return p


def check_output_file(path: str | Path, what: str = "--out", example: str = "out.json") -> Path:
    """DataError unless ``path`` can be written as a file (not an existing folder, its folder writable); writes
    nothing."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: {what} is an existing folder; give a file name such as {p / example}")
    check_output_dir(p.parent, f"the folder of {what}")
    return p
