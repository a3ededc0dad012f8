"""Write a whole dataset folder or nothing: a temporary sibling folder, renamed into place at the end.

Used by the dataset builders (:mod:`pbip_core.data.kather_mosaic`, :mod:`pbip_core.data.ebhi_seg`). The
temporary folder lies next to ``out`` (same file system, so the final rename is atomic on POSIX) and is removed if
anything fails, so an interrupted or failed run leaves neither a half-written ``out`` nor a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_target(out: str | Path, overwrite: bool, marker: str, tool: str) -> Path:
    """Raise :class:`DataError` unless ``out`` may be (re)written.

    ``out`` may be missing or an empty folder. A non-empty folder is replaced only with ``overwrite`` and only if it
    holds ``marker`` (a file the builder writes), so a folder the builder did not write is never deleted.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: folder exists and is not empty; pass overwrite=True (--overwrite) or choose "
                            f"another output folder")
        if not (out / marker).exists():
            raise DataError(f"{out}: not empty and not written by {tool} (no {marker}); refusing to overwrite")
    return out


@contextmanager
def staged_folder(out: str | Path, overwrite: bool, marker: str, tool: str) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out`` holding ``marker``; on success it replaces ``out``.

    On any exception the temporary folder is deleted and ``out`` is left as it was.
    """
    out = check_target(out, overwrite, marker, tool)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)           # mkdtemp creates 0700; give the folder normal permissions
        (tmp / marker).write_text(f"{tool}\n")
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "data")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "data", out)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
