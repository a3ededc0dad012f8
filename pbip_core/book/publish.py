"""Published runs: the small files of the book's runs, committed under ``published/<profile>/`` so that a fresh clone
builds the demo book without training its ~180 runs again (issue: ``make book`` under 20 minutes on 2 cores).

What a published run holds: its ``row.json`` (the scores the tables read), configs, training histories and metrics
(the curves), ``run_info.json`` (device, dtype, weights), and, for the few runs whose masks or weights a chapter
shows, their mask PNGs (:func:`book_selection`: the smallest seed of each method of ``book-table1`` and
``book-ebhi``). Checkpoints are left out: the one run whose weights chapters 03-05 use (the shared stage-1 run, a
minute of training) is trained again by :func:`pbip_core.book.results.stage1_run`, which on a CPU reproduces its
published numbers.

``pbip book`` copies published runs into ``results/book/<profile>/experiments`` when that folder lacks them
(:func:`restore`; ``--fresh`` skips it and trains everything); the runner then finds them done, by the same content
hashes it would compute (:mod:`pbip_core.experiments.identity`: dataset identity, resolved config, method version).
A run recorded with other code keeps its code digest in ``row.json``; the runner reports such runs as stale
(``pbip run --rerun-stale`` recomputes them). ``pbip book --publish`` writes the folder from a finished results
folder (:func:`publish`) with a ``published.json`` that says when, with which code and from what.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import PBIPError
from ..experiments.grid import plan
from ..experiments.identity import METHOD_VERSION, code_digest
from ..io import atomic_write_text
from .chapter import Chapter
from .plan import GRID_DATASETS, book_grid, on_grid_dataset

#: Grids whose smallest seed per method a chapter shows masks of (chapters 05, 06, 10).
MASK_GRIDS: tuple[str, ...] = ("book-table1", "book-ebhi")

#: Files every published run keeps (relative to its run folder), when present.
SMALL_FILES: tuple[str, ...] = (
    "row.json", "config.yaml",
    "stage1/config.yaml", "stage1/history.json", "stage1/metrics.json", "stage1/run_info.json",
    "stage2/config.yaml", "stage2/history.json", "stage2/metrics.json", "stage2/run_info.json",
)
#: Folders of mask PNGs kept for the runs whose masks a chapter shows.
MASK_DIRS: tuple[str, ...] = ("pseudo_val", "pseudo_test", "stage2/pred_test")
INDEX = "published.json"


def published_dir(root: str | Path, profile: str) -> Path:
    """``<repository>/published/<profile>``."""
    return Path(root) / "published" / profile


def publish(results_dir: str | Path, dest: str | Path, masks: Iterable[str] = (), command: str = "") -> dict[str, Any]:
    """Copy the finished runs of ``results_dir`` (``runs/<hash>/`` with an ``ok`` row) into ``dest`` (replaced
    wholesale, through a temporary folder): :data:`SMALL_FILES` of every run and :data:`MASK_DIRS` of the runs in
    ``masks``. Returns the index written to ``dest/published.json``. Refuses (:class:`PBIPError`, ``dest``
    untouched) a results folder without finished runs."""
    src, dest = Path(results_dir) / "runs", Path(dest)
    if not src.is_dir():
        raise PBIPError(f"{src}: no runs folder here, nothing to publish (run the book first)")
    masks = set(masks)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    runs: dict[str, dict[str, Any]] = {}
    for run in sorted(p for p in src.iterdir() if (p / "row.json").is_file()):
        row = json.loads((run / "row.json").read_text())
        if row.get("status") != "ok":
            continue
        files = [f for f in SMALL_FILES if (run / f).is_file()]
        if run.name in masks:
            files += [str(p.relative_to(run)) for d in MASK_DIRS if (run / d).is_dir() for p in sorted((run / d).iterdir())]
        for f in files:
            (tmp / "runs" / run.name / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / f, tmp / "runs" / run.name / f)
        runs[run.name] = {"grid": row.get("grid"), "method": row.get("method"), "variant": row.get("variant"),
                          "seed": row.get("seed"), "code": row.get("code"), "files": len(files)}
    if not runs:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PBIPError(f"{src}: no finished (status ok) run here, nothing to publish; {dest} is left as it was")
    index = {"published": time.strftime("%Y-%m-%dT%H:%M:%S"), "code_now": code_digest(),
             "method_version": METHOD_VERSION, "command": command, "runs": runs,
             "note": "small files of finished runs; restored into results/book/<profile>/experiments by `pbip book`"}
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tmp / INDEX, json.dumps(index, indent=1))
    old = dest.with_name(dest.name + ".old")          # swap by renames: dest is never left half deleted
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return index


def restore(published: str | Path, results_dir: str | Path) -> int:
    """Copy the published runs that ``results_dir`` lacks (no ``row.json`` there) into it; never overwrites a run.
    Returns the number of runs copied (0 when nothing is published)."""
    src = Path(published) / "runs"
    if not src.is_dir():
        return 0
    n = 0
    for run in sorted(p for p in src.iterdir() if p.is_dir()):
        target = Path(results_dir) / "runs" / run.name
        if (target / "row.json").is_file():
            continue
        tmp = target.with_name(target.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run, tmp)
        if target.exists():                      # a folder without a row: an unfinished run, replaced
            shutil.rmtree(target)
        tmp.rename(target)
        n += 1
    return n


def index(published: str | Path) -> dict[str, Any]:
    """``published.json`` of a published folder ({} when there is none)."""
    p = Path(published) / INDEX
    return json.loads(p.read_text()) if p.is_file() else {}


def book_selection(ch: Chapter) -> set[str]:
    """The runs whose masks the chapters show (:data:`MASK_GRIDS`: smallest seed per method), as run hashes. A grid
    whose own dataset is missing is skipped."""
    masks: set[str] = set()
    for name in MASK_GRIDS:
        if name in GRID_DATASETS and not (on_grid_dataset(ch, name).dataset / "dataset.yaml").is_file():
            continue
        specs = plan(book_grid(name, ch), quiet=True)
        for method in {s.method for s in specs}:
            masks.add(min((s for s in specs if s.method == method), key=lambda s: s.seed).hash)
    return masks
