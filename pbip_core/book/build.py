"""The book: run the chapter notebooks with papermill, then build the HTML with Jupyter Book 1.x.

``pbip book [--profile smoke|demo|paper] [--chapters 01,02] [--no-html] [--html-only] [--out-dir DIR]``

The committed notebooks ``book/*.ipynb`` are never written to (they stay without outputs, so ``make book`` leaves
``git status`` clean):

1. :func:`stage_book` copies the book sources (``_config.yml``, ``_toc.yml``, ``book/`` without notebooks) into the
   build folder ``_build/src/`` (:data:`SOURCE_DIR`); it marks the copy with :data:`ROOT_POINTER`, so
   :func:`pbip_core.book.chapter.repo_root` still finds the repository (``data/``, ``results/``) from inside it.
2. Each chapter ``book/NN_*.ipynb`` is executed by papermill from the repository into ``_build/src/book/`` (cwd
   ``_build/src/book``), in dependency order (:data:`CHAPTERS`), with the parameters ``profile`` and ``out_dir``
   injected. The output is written to a temporary name and renamed into place only when every cell ran, so a
   failing chapter leaves the last good executed copy; its partial output goes to ``_build/failed/``. A chapter
   not executed in this run keeps its executed copy from an earlier run (or a clean copy of the committed one).
3. papermill's ``injected-parameters`` cell is tagged ``remove-cell`` (hidden in the HTML).
   The kernels run in quiet mode (:data:`QUIET_ENV`: ``PBIP_QUIET=1``, ``TQDM_DISABLE=1``, ``PBIP_REPO_ROOT``): the
   runner writes its runs' logs into the results folder and prints one line per grid
   (:func:`pbip_core.experiments.runner.quiet_mode`), with paths relative to the repository; progress-bar widgets
   that a library still shows are dropped from the executed notebook (:func:`drop_progress_widgets`), so no log
   and no progress bar reaches a page.
4. ``jupyter-book build _build/src --path-output .`` writes the HTML to ``_build/html`` (``execute_notebooks: off``);
   ``pbip book --html-only`` (``make html``) does only this step, from the chapters executed before.

Offline pages. Built pages load require.js, the ipywidgets HTML manager and MathJax: :mod:`pbip_core.book.vendor`,
a Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [pbip_core.book.vendor]``): at ``config-inited`` it
fetches pinned copies of those files from the npm registry with ``npm pack`` into ``book/_static/vendor/``
(a cache, not committed), points ``mathjax_path`` and myst-nb's ``nb_ipywidgets_js`` at them and copies them
into ``_build/html/_static/vendor/``. If npm cannot reach the registry the build warns and keeps the CDN URLs.
``PBIP_BOOK_CDN=1`` forces the CDN; ``PBIP_VENDOR_DIR`` moves the cache.

Chapters call :func:`chapter_setup` right after their parameters cell to turn the parameters into paths and
a :class:`~pbip_core.config.Config`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from papermill.exceptions import PapermillExecutionError

from ..errors import ConfigError, PBIPError
from .chapter import ROOT_POINTER, find_root  # ROOT_POINTER in SOURCE_DIR: the repository root, relative to it

SOURCE_DIR = Path("_build") / "src"        # where the chapters are executed and the HTML is built from
BOOK_FILES = ("_config.yml", "_toc.yml")

# ---------------------------------------------------------------------------------------------------------------
# Chapters and their dependencies
# ---------------------------------------------------------------------------------------------------------------
CHAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "01": ("01_data.ipynb", ()),
    "02": ("02_image_bank.ipynb", ("01",)),
    "03": ("03_similarity_masks.ipynb", ("02",)),
    "04": ("04_adaptive_threshold.ipynb", ("03",)),
    "05": ("05_contrastive_training.ipynb", ("02",)),
    "06": ("06_stage2.ipynb", ("05",)),
    "07": ("07_ablations.ipynb", ("05",)),
    "08": ("08_zero_shot.ipynb", ("02",)),
    "09": ("09_paper_vs_code.ipynb", ("05", "07")),
    "10": ("10_ebhi_seg.ipynb", ()),
    # The introduction's results summary reads the runs of chapters 05-07 and 10: it is executed last.
    "00": ("intro.ipynb", ("05", "06", "07", "09", "10")),
}


def chapter_order(selected: Iterable[str] | None = None, with_deps: bool = True) -> list[str]:
    """Chapter ids in an order where every chapter comes after the chapters it depends on.

    ``selected`` (ids like ``"01"`` or ``"1"``) limits the run; with ``with_deps`` their dependencies are added.
    """
    wanted = list(CHAPTERS) if selected is None else [_chapter_id(c) for c in selected]
    order: list[str] = []

    def visit(ch: str, stack: tuple[str, ...]) -> None:
        if ch in order:
            return
        if ch in stack:
            raise ConfigError(f"chapter dependency cycle: {' -> '.join(stack + (ch,))}")
        if with_deps:
            for dep in CHAPTERS[ch][1]:
                visit(dep, stack + (ch,))
        order.append(ch)

    for ch in sorted(wanted):
        visit(ch, ())
    return order


def _chapter_id(c: str) -> str:
    c = str(c).strip()
    cid = c.zfill(2) if c.isdigit() else c[:2]
    if cid not in CHAPTERS:
        raise ConfigError(f"unknown chapter {c!r}; chapters are {', '.join(CHAPTERS)}")
    return cid


# ---------------------------------------------------------------------------------------------------------------
# Executing chapters
# ---------------------------------------------------------------------------------------------------------------
INJECTED_TAG = "injected-parameters"


HIDE_TAG = "remove-cell"

#: Environment of the kernels that execute chapters (besides ``PBIP_REPO_ROOT``, the book root): the runner's quiet
#: mode (logs to files, no progress bars) and tqdm's switch for bars created without an explicit ``disable``.
QUIET_ENV: dict[str, str] = {"PBIP_QUIET": "1", "TQDM_DISABLE": "1"}

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PROGRESS_MODELS = ("FloatProgressModel", "IntProgressModel")


def kernel_for_this_python(tmp: Path) -> str:
    """Name of a kernelspec that runs this interpreter; returns ``"python3"``.

    ``make setup`` installs a ``python3`` kernelspec into the venv (``ipykernel install --sys-prefix``). When it is
    missing, or when ``python3`` resolves to another interpreter (a system-wide kernelspec), a ``python3``
    kernelspec for ``sys.executable`` is written to ``tmp`` and put first on ``JUPYTER_PATH``.
    """
    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = ""
    if argv0 and argv0 != "python" and Path(shutil.which(argv0) or argv0).resolve() == Path(sys.executable).resolve():
        return "python3"
    spec_dir = tmp / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (pbip)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(tmp), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    return "python3"


def hide_injected_parameters(nb: Any) -> int:
    """Tag papermill's ``injected-parameters`` cell(s) ``remove-cell`` so the HTML hides them; returns the count."""
    n = 0
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if INJECTED_TAG in tags and HIDE_TAG not in tags:
            cell.metadata["tags"] = [*tags, HIDE_TAG]
            n += 1
    return n


def _model_refs(value: Any) -> set[str]:
    """Model ids a widget state refers to (``"IPY_MODEL_<id>"`` strings, however deeply nested)."""
    if isinstance(value, str):
        return {value[len("IPY_MODEL_"):]} if value.startswith("IPY_MODEL_") else set()
    if isinstance(value, Mapping):
        return set().union(*(_model_refs(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_model_refs(v) for v in value)) if value else set()
    return set()


def drop_progress_widgets(nb: Any) -> int:
    """Remove progress bars (tqdm's notebook bars: an HBox holding a Float/IntProgress, or a bare progress widget)
    from an executed notebook: their outputs and their models in the saved widget state, with the layout and style
    models only they use. Returns the number of bars removed. Other widgets (the chapters' sliders) stay."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    if not state:
        return 0
    name = {mid: m.get("model_name", "") for mid, m in state.items()}
    bars = {mid for mid, m in state.items() if name[mid] == "HBoxModel"
            and any(name.get(c) in PROGRESS_MODELS for c in _model_refs(m.get("state", {}).get("children", [])))}
    inside = set().union(*(_model_refs(state[b].get("state", {}).get("children", [])) for b in bars)) if bars else set()
    bars |= {mid for mid in state if name[mid] in PROGRESS_MODELS and mid not in inside}
    if not bars:
        return 0
    drop, frontier = set(), set(bars)
    while frontier:                                  # the bars and everything they refer to ...
        drop |= frontier
        frontier = set().union(*(_model_refs(state[m].get("state", {})) for m in frontier if m in state)) - drop
    kept_refs = set().union(*(_model_refs(m.get("state", {})) for mid, m in state.items() if mid not in drop))
    drop -= kept_refs                                # ... unless a widget that stays uses it too
    for mid in drop:
        state.pop(mid, None)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell.outputs = [o for o in cell.get("outputs", [])
                            if o.get("data", {}).get(WIDGET_VIEW, {}).get("model_id") not in drop]
    return len(bars)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set while inside (a kernel started meanwhile inherits it), restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def strip_outputs(nb: Any) -> Any:
    """Remove outputs, execution counts, papermill metadata, widget state and the injected cell (for commits)."""
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.metadata.get("tags") == []:
            cell.metadata.pop("tags")
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    if "language_info" in nb.metadata:  # the kernel's version details change from machine to machine
        nb.metadata["language_info"] = {k: v for k, v in nb.metadata["language_info"].items()
                                        if k in ("name", "pygments_lexer")}
    return nb


def execute_chapter(chapter: str, book_dir: Path, parameters: dict[str, Any], kernel_name: str,
                    failed_dir: Path, log_output: bool = False, cell_timeout: float | None = None,
                    source_dir: Path | None = None, quiet: bool = True) -> float:
    """Run one chapter with papermill in ``book_dir`` (its cwd); returns the wall time in seconds.

    The notebook is read from ``source_dir`` (default ``book_dir``: in place) and the executed copy written to
    ``book_dir``. Raises :class:`PBIPError` naming the chapter and the failing cell; the partial notebook is kept in
    ``failed_dir`` and ``book_dir``'s notebook is left as it was. With ``quiet`` the kernel runs with
    :data:`QUIET_ENV` and ``PBIP_REPO_ROOT`` (the book root of ``book_dir``, its pointer followed) and progress
    bars are dropped from the executed notebook (:func:`drop_progress_widgets`).
    """
    name = CHAPTERS[chapter][0]
    src_path = (source_dir or book_dir) / name
    if not src_path.is_file():
        raise PBIPError(f"{src_path}: chapter {chapter} notebook not found")
    nb_path = book_dir / name
    book_dir.mkdir(parents=True, exist_ok=True)
    tmp = nb_path.with_name(f".{nb_path.stem}.running.ipynb")
    root = find_root(book_dir) or book_dir.resolve().parent
    env = {**QUIET_ENV, "PBIP_REPO_ROOT": str(root)} if quiet else {}
    t0 = time.perf_counter()
    try:
        with _environment(env):
            pm.execute_notebook(str(src_path), str(tmp), parameters=parameters, kernel_name=kernel_name,
                                cwd=str(book_dir), progress_bar=False, log_output=log_output,
                                execution_timeout=cell_timeout,
                                # the kernel's own log (e.g. "running over TCP without encryption") is noise here
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except PapermillExecutionError as e:
        kept = _keep_failed(tmp, failed_dir / nb_path.name)
        first = (e.source or "").strip().splitlines()[:1]
        raise PBIPError(
            f"chapter {chapter} ({nb_path.name}) failed in cell {e.cell_index} "
            f"[In {e.exec_count}] {first[0] if first else ''!r}: {e.ename}: {e.evalue} "
            f"(executed notebook with the traceback: {kept})"
        ) from None
    except Exception as e:  # a dead kernel, a cell timeout, a missing kernelspec
        kept = _keep_failed(tmp, failed_dir / nb_path.name)
        raise PBIPError(f"chapter {chapter} ({nb_path.name}) could not be executed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                        + (f" (partial notebook: {kept})" if kept else "")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    nb = nbformat.read(tmp, as_version=4)
    hide_injected_parameters(nb)
    if quiet:
        drop_progress_widgets(nb)
    nbformat.write(nb, tmp)
    os.replace(tmp, nb_path)
    return time.perf_counter() - t0


def stage_book(book_root: Path, work_root: Path | None = None) -> Path:
    """Copy the book's sources into ``work_root`` (default ``book_root/_build/src``) and return it.

    ``_config.yml``, ``_toc.yml`` and every file of ``book/`` except the chapter notebooks are copied on every call
    (so edits to ``cite.md`` or the configuration show up); a chapter notebook is copied, clean, only when the
    copy has none yet (an executed copy is kept). ``ROOT_POINTER`` records the way back to ``book_root``.
    """
    work = work_root or book_root / SOURCE_DIR
    (work / "book").mkdir(parents=True, exist_ok=True)
    for name in BOOK_FILES:
        shutil.copy2(book_root / name, work / name)
    chapters = {nb for nb, _ in CHAPTERS.values()}
    for p in sorted((book_root / "book").iterdir()):
        if p.name.startswith(".") or p.name == "_static" or p.name.endswith(".running.ipynb"):
            continue
        dest = work / "book" / p.name
        if p.is_dir():
            shutil.copytree(p, dest, dirs_exist_ok=True)
        elif p.name not in chapters or not dest.exists():
            shutil.copy2(p, dest)
    (work / ROOT_POINTER).write_text(os.path.relpath(book_root.resolve(), work.resolve()) + "\n")
    return work


def _keep_failed(tmp: Path, dest: Path) -> Path | None:
    if not tmp.exists():
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), dest)
    return dest


def run_chapters(book_root: Path, chapters: Sequence[str], profile: str, out_dir: Path | None = None,
                 extra_parameters: dict[str, Any] | None = None, log_output: bool = False,
                 work_root: Path | None = None) -> dict[str, float]:
    """Execute ``chapters`` (already ordered) into the staged copy; print one line per chapter; return wall times.

    The notebooks are read from ``book_root/book`` and executed in ``work_root/book`` (default: the staged copy
    ``book_root/_build/src``, :func:`stage_book`), so the committed notebooks stay untouched. Results go to
    ``out_dir`` (default ``book_root/results/book/<profile>``).
    """
    work = work_root or stage_book(book_root)
    book_dir = work / "book"
    out = (out_dir or book_root / "results" / "book" / profile).resolve()
    params = {"profile": profile, "out_dir": os.path.relpath(out, book_dir.resolve()), **(extra_parameters or {})}
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pbip-kernel-") as tmp:
        old_path = os.environ.get("JUPYTER_PATH")
        kernel = kernel_for_this_python(Path(tmp))
        try:
            for i, ch in enumerate(chapters, 1):
                name = CHAPTERS[ch][0]
                print(f"[{i}/{len(chapters)}] chapter {ch} {name} (profile {profile}) ...", flush=True)
                times[ch] = execute_chapter(ch, book_dir, params, kernel, book_root / "_build" / "failed",
                                            log_output=log_output, source_dir=book_root / "book")
                print(f"[{i}/{len(chapters)}] chapter {ch} done in {times[ch]:.1f} s", flush=True)
        finally:
            if old_path is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old_path
    return times


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
def build_html(book_root: Path, path_output: Path | None = None, strict: bool = False,
               quiet: bool = True) -> Path:
    """``jupyter-book build`` a book root (the staged copy for ``pbip book``); returns the HTML folder
    ``<path_output or book_root>/_build/html``. ``strict`` = ``-W`` (warnings are errors)."""
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jupyter_book.cli.main"]
    cmd += ["build", str(book_root)]
    if path_output is not None:
        cmd += ["--path-output", str(path_output)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    if quiet:
        cmd += ["-q"]
    proc = subprocess.run(cmd, cwd=book_root, text=True, capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise PBIPError(f"jupyter-book build {book_root} failed (exit {proc.returncode}):\n{tail}")
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    for line in warnings[:20]:
        print(line, file=sys.stderr)
    if len(warnings) > 20:
        print(f"... and {len(warnings) - 20} more warnings", file=sys.stderr)
    return (path_output or book_root) / "_build" / "html"
