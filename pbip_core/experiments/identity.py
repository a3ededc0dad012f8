"""What makes two runs the same run, wherever they run: the dataset's identity, the method's version, the code.

A run's hash (:func:`pbip_core.experiments.grid.run_hash`) is built from

* the resolved configuration without the keys that only say where or how the same computation is scheduled
  (``pbip_core.config._UNHASHED``: device, workers, logging, the dataset *path* ``data.root``, ...);
* the dataset's identity (:func:`dataset_identity`): its name and a digest of its ``dataset.yaml`` and of the
  sorted names and sizes of the files of the dataset format (``train/*``, ``val/img/*``, ``val/mask/*``,
  ``test/img/*``, ``test/mask/*``). The same folder given as ``data/bcss-wsss`` or as an absolute path, copied to
  another disk or to another machine, is the same dataset; a file added, removed, renamed or resized is not.
  File contents are not read (a 30k-file dataset is identified in a directory scan); the result is cached per folder
  for as long as the folders' modification times do not change;
* :data:`METHOD_VERSION`, a version number of the method's behaviour, raised by hand.

The method version is a manual constant, not a digest of the source: a digest would make every refactoring, renamed
variable or new log line of the modules below recompute the whole paper book (about 265 GPU runs), and a digest of
"the modules that matter" can still miss a change elsewhere. The cost of the manual constant, a reused result computed
by older code, is not left silent: every run records :func:`code_digest` (a digest of the normalised source, AST
without docstrings and comments, of :data:`METHOD_MODULES`) in its ``row.json``; ``pbip run`` lists reused runs whose
recorded digest differs from the current code's, and ``pbip run --rerun-stale`` recomputes them. Raise
:data:`METHOD_VERSION` in any change that is meant to change numbers (a fixed bug in a loss, a new default).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

#: Version of the method's behaviour; part of every run's hash. Raise it when a change is meant to change results.
METHOD_VERSION = "1"

#: The modules (relative to ``pbip_core/``) whose behaviour changes results: their normalised source is
#: :func:`code_digest`, recorded with every run to flag results computed by other code.
METHOD_MODULES: tuple[str, ...] = (
    "method", "nets", "data/folder.py", "data/augment.py", "engine/bank.py", "engine/build.py", "engine/step.py",
    "engine/stage1.py", "engine/stage2.py", "engine/pseudo.py", "engine/metrics.py", "config.py",
)

#: The folders of the dataset format (docs/DESIGN.md) whose files make up a dataset's identity.
DATASET_FOLDERS: tuple[str, ...] = ("train", "val/img", "val/mask", "test/img", "test/mask")

PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DatasetIdentity:
    """A dataset's identity: ``name``, ``digest`` (16 hex digits; None when the folder does not exist) and the
    number of files it covers."""

    name: str
    digest: str | None
    n_files: int = 0

    @property
    def key(self) -> str:
        """``name@digest`` (``name@missing`` for a folder that is not there): what a run's hash holds."""
        return f"{self.name}@{self.digest or 'missing'}"

    @property
    def found(self) -> bool:
        return self.digest is not None


_CACHE: dict[str, tuple[tuple, DatasetIdentity]] = {}


def _dataset_name(root: Path) -> str:
    """``name`` of ``dataset.yaml``, else the folder's name."""
    meta = root / "dataset.yaml"
    if meta.is_file():
        try:
            data = yaml.safe_load(meta.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return root.name


def _signature(root: Path) -> tuple:
    """Modification times of the dataset's folders and of ``dataset.yaml`` (adding, removing or renaming a file
    changes its folder's)."""
    sig = []
    for rel in ("", *DATASET_FOLDERS, "dataset.yaml"):
        try:
            st = os.stat(root / rel)
            sig.append((rel, st.st_mtime_ns, st.st_size if rel else 0))
        except OSError:
            sig.append((rel, None, None))
    return tuple(sig)


def _files(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every visible file of the dataset format's folders, sorted."""
    out = []
    for rel in DATASET_FOLDERS:
        folder = root / rel
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for e in it:
                if not e.name.startswith(".") and e.is_file():
                    out.append((f"{rel}/{e.name}", e.stat().st_size))
    return sorted(out)


def dataset_identity(root: str | Path) -> DatasetIdentity:
    """The identity of the dataset folder ``root`` (see the module docstring); a missing folder gets
    ``digest=None`` and its folder name (a run planned before the data arrives is re-identified once it is there)."""
    root = Path(root)
    if not root.is_dir():
        return DatasetIdentity(root.name, None)
    key = str(root.resolve())
    sig = _signature(root)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    h = hashlib.sha256()
    meta = root / "dataset.yaml"
    h.update(meta.read_bytes() if meta.is_file() else b"<no dataset.yaml>")
    files = _files(root)
    for rel, size in files:
        h.update(f"\0{rel}\0{size}".encode())
    ident = DatasetIdentity(_dataset_name(root), h.hexdigest()[:16], len(files))
    _CACHE[key] = (sig, ident)
    return ident


# ---------------------------------------------------------------------------------------------------- code
def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """The tree without the docstrings of its module, classes and functions."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_digest(path: str | Path) -> str:
    """Digest of one Python file's normalised source: its AST without docstrings (comments and formatting are not
    in the AST), so reformatting or documenting does not change it."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text(), filename=str(path)))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False, include_attributes=False).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """16 hex digits over :data:`METHOD_MODULES`' normalised sources (file names included)."""
    h = hashlib.sha256()
    for rel in METHOD_MODULES:
        p = PACKAGE / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(f.relative_to(PACKAGE).as_posix().encode())
            h.update(source_digest(f).encode())
    return h.hexdigest()[:16]
