"""Shared by test_book.py and test_book_html.py: execute copies of the chapters once per pytest session.

The committed notebooks are never rewritten: the book (``_config.yml``, ``_toc.yml``, ``book/``) is copied into a
temporary root and its chapters are executed there in place, with the smoke profile, each once (memoised), after
the chapters they depend on (``pbip_core.book.build.CHAPTERS``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import nbformat

from pbip_core.book import build as book
from pbip_core.data.ebhi_seg import import_ebhi_seg


ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT = 600
EBHI_FIXTURE = ROOT / "tests" / "fixtures" / "ebhi-seg"      # 12 real pairs, CC BY 4.0 (its ATTRIBUTION.md)

_state: dict[str, Any] = {"root": None, "results": {}, "kernel": None}


def book_copy() -> Path:
    """A temporary copy of the book root (without executed outputs of other sessions' runs)."""
    if _state["root"] is None:
        tmp = Path(tempfile.mkdtemp(prefix="pbip-book-test-"))
        atexit.register(shutil.rmtree, tmp, True)
        root = tmp / "root"
        root.mkdir()
        for name in ("_config.yml", "_toc.yml"):
            shutil.copy2(ROOT / name, root / name)
        shutil.copytree(ROOT / "book", root / "book",
                        ignore=shutil.ignore_patterns("_static", ".*", "_build", "*.running.ipynb"))
        # chapter 10 (and the intro) read data/ebhi-seg of the book root: the 12 real EBHI-Seg pairs of the fixture
        import_ebhi_seg(EBHI_FIXTURE, root / "data" / "ebhi-seg")
        _state["root"] = root
        _state["kernel"] = book.kernel_for_this_python(tmp / "kernels")
    return _state["root"]


def out_dir() -> Path:
    return book_copy().parent / "results"


def run_chapter(chapter: str) -> nbformat.NotebookNode:
    """Execute ``chapter`` (after its dependencies) in the copy with the smoke profile; return the notebook.

    Raises the chapter's :class:`~pbip_core.errors.PBIPError` (or its dependency's) on failure, every time asked.
    """
    results: dict[str, Any] = _state["results"]
    for ch in book.chapter_order([chapter]):
        if ch not in results:
            root = book_copy()
            params = {"profile": "smoke", "out_dir": str(out_dir())}
            try:
                book.execute_chapter(ch, root / "book", params, _state["kernel"], root / "_build" / "failed",
                                     cell_timeout=CELL_TIMEOUT)
                results[ch] = nbformat.read(root / "book" / book.CHAPTERS[ch][0], as_version=4)
            except Exception as e:  # remembered so that dependants fail with the same cause
                results[ch] = e
        if isinstance(results[ch], Exception):
            if ch != chapter:
                raise RuntimeError(f"chapter {chapter}: its dependency {ch} failed: {results[ch]}")
            raise results[ch]
    return results[chapter]


def run_all() -> Path:
    """Execute every chapter; return the book copy's root."""
    for ch in book.CHAPTERS:
        run_chapter(ch)
    return book_copy()


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def texts(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every output of type ``mime`` (``text/html``, ``text/plain``, or ``stream`` for printed text)."""
    found = []
    for o in outputs(nb):
        if mime == "stream" and o.get("output_type") == "stream":
            found.append(o.get("text", ""))
        elif mime in o.get("data", {}):
            value = o["data"][mime]
            found.append(value if isinstance(value, str) else "".join(value) if isinstance(value, list) else value)
    return found


def fresh_book_copy(tmp_path: Path) -> Path:
    """A private copy of the book root under ``tmp_path`` (``pbip book`` executes chapters in place: never in the
    repository, and not in the session's shared copy either)."""
    root = Path(tmp_path) / "book-root"
    root.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "book", root / "book",
                    ignore=shutil.ignore_patterns("_static", ".*", "_build", "*.running.ipynb"))
    return root
