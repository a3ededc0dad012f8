"""The book: run the chapter notebooks with papermill, then build the HTML with Jupyter Book 1.x.

``pbip book [--profile smoke|demo|paper] [--chapters 01,02] [--no-html] [--out-dir DIR]``

1. Each chapter notebook ``book/NN_*.ipynb`` is executed **in place** by papermill (cwd ``book/``), in
   dependency order (:data:`CHAPTERS`), with the parameters ``profile`` and ``out_dir`` injected. The
   notebook is written to a temporary name and renamed over the chapter only when every cell ran, so a failing
   chapter leaves the committed notebook untouched; its partial output goes to ``_build/failed/``.
2. papermill's ``injected-parameters`` cell is tagged ``remove-cell`` (hidden in the HTML).
3. ``jupyter-book build .`` (book root = repository root, ``execute_notebooks: off``).

Offline pages. Built pages load require.js, the ipywidgets HTML manager and MathJax. This module is also a
Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [pbip_core.book]``): at ``config-inited`` it
fetches pinned copies of those files from the npm registry with ``npm pack`` into ``book/_static/vendor/``
(a cache, not committed), points ``mathjax_path`` and myst-nb's ``nb_ipywidgets_js`` at them and copies them
into ``_build/html/_static/vendor/``. If npm cannot reach the registry the build warns and keeps the CDN URLs.
``PBIP_BOOK_CDN=1`` forces the CDN; ``PBIP_VENDOR_DIR`` moves the cache.

Chapters call :func:`chapter_setup` right after their parameters cell to turn the parameters into paths and
a :class:`~pbip_core.config.Config`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, DataError, PBIPError

# ---------------------------------------------------------------------------------------------------------------
# Chapters and their dependencies
# ---------------------------------------------------------------------------------------------------------------
#: chapter id -> (notebook file in book/, chapters whose outputs in out_dir it reads)
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
}

#: Size of the synthetic dataset each profile generates when no dataset folder is given (chapter 01).
SYNTH_SIZES: dict[str, dict[str, int]] = {
    "smoke": {"size": 64, "n_train": 48, "n_val": 8, "n_test": 8},
    "demo": {"size": 128, "n_train": 600, "n_val": 60, "n_test": 100},
    "paper": {"size": 224, "n_train": 1000, "n_val": 100, "n_test": 200},
}
#: Seeds per profile (mean +- std over seeds in the result tables).
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0,), "demo": (0,), "paper": (0, 1, 2)}


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
# What a chapter sees: parameters -> paths and a Config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Chapter:
    """A chapter's resolved parameters (absolute paths)."""

    profile: str
    cfg: Any  # pbip_core.config.Config
    dataset: Path
    encoder: str
    seeds: tuple[int, ...]
    out_dir: Path
    synthetic: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line with the resolved parameters (paths relative to the working directory when close by)."""
        return (f"profile={self.profile} dataset={_short(self.dataset)} encoder={self.encoder} "
                f"seeds={list(self.seeds)} out_dir={_short(self.out_dir)}")


def _short(path: Path) -> str:
    rel = os.path.relpath(path, Path.cwd())
    return str(path) if rel.startswith(os.path.join("..", "..")) else rel


def chapter_setup(profile: str = "demo", dataset: str | None = None, encoder: str | None = None,
                  seeds: Sequence[int] | None = None, out_dir: str | None = None,
                  overrides: Sequence[str] | dict[str, Any] | None = None) -> Chapter:
    """Resolve a chapter's parameters cell.

    ``None`` means "the profile's default": ``out_dir`` -> ``../results/book/<profile>`` (relative to ``book/``,
    i.e. ``results/book/<profile>`` in the repository), ``dataset`` -> the synthetic dataset
    ``<out_dir>/synth`` for smoke/demo (generate it with :func:`ensure_synth`) and the manifest's BCSS-WSSS
    folder for ``paper``; ``encoder`` -> the profile's ``bank.encoder``; ``seeds`` -> :data:`DEFAULT_SEEDS`.
    """
    from .config import make_config

    cfg = make_config(profile, overrides=overrides)
    out = Path(out_dir) if out_dir else Path("..") / "results" / "book" / profile
    out = out.resolve()
    synthetic = dataset is None and profile != "paper"
    if dataset is None:
        dataset_path = out / "synth" if synthetic else _manifest_dir("bcss-wsss")
    else:
        dataset_path = Path(dataset).resolve()
    cfg.data.root = str(dataset_path)
    if encoder:
        cfg.bank.encoder = str(encoder)
    out.mkdir(parents=True, exist_ok=True)
    return Chapter(profile=profile, cfg=cfg, dataset=dataset_path, encoder=cfg.bank.encoder,
                   seeds=tuple(int(s) for s in (seeds if seeds is not None else DEFAULT_SEEDS[profile])),
                   out_dir=out, synthetic=synthetic)


def _manifest_dir(name: str) -> Path:
    from .data.manifest import dataset_entry

    local = dataset_entry(name).get("local_dir") or f"data/{name}"
    return (repo_root() / local).resolve()


def ensure_synth(ch: Chapter, seed: int = 0) -> Path:
    """Generate the profile's synthetic dataset into ``ch.dataset`` unless a complete one is there."""
    if (ch.dataset / "dataset.yaml").is_file():
        return ch.dataset
    if not ch.synthetic:
        raise DataError(f"{ch.dataset}: dataset folder not found (see data_manifest.yaml for how to get it)")
    from .data.synth import generate

    return generate(ch.dataset, seed=seed, **SYNTH_SIZES[ch.profile], workers=0, overwrite=True)


def repo_root() -> Path:
    """The book root: the folder holding ``_config.yml`` (the repository root)."""
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent):
        if (base / "_config.yml").is_file() and (base / "_toc.yml").is_file():
            return base
    return Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Executing chapters
# ---------------------------------------------------------------------------------------------------------------
INJECTED_TAG = "injected-parameters"
HIDE_TAG = "remove-cell"


def kernel_for_this_python(tmp: Path) -> str:
    """Name of a kernelspec that runs this interpreter; returns ``"python3"``.

    ``make setup`` installs a ``python3`` kernelspec into the venv (``ipykernel install --sys-prefix``). When it is
    missing, or when ``python3`` resolves to another interpreter (a system-wide kernelspec), a ``python3``
    kernelspec for ``sys.executable`` is written to ``tmp`` and put first on ``JUPYTER_PATH``.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

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
                    failed_dir: Path, log_output: bool = False, cell_timeout: float | None = None) -> float:
    """Run one chapter in place with papermill; returns the wall time in seconds.

    Raises :class:`PBIPError` naming the chapter and the failing cell; the partial notebook is kept in
    ``failed_dir`` and the chapter's notebook is left as it was.
    """
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_path = book_dir / CHAPTERS[chapter][0]
    if not nb_path.is_file():
        raise PBIPError(f"{nb_path}: chapter {chapter} notebook not found")
    tmp = nb_path.with_name(f".{nb_path.stem}.running.ipynb")
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb_path), str(tmp), parameters=parameters, kernel_name=kernel_name,
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
    nbformat.write(nb, tmp)
    os.replace(tmp, nb_path)
    return time.perf_counter() - t0


def _keep_failed(tmp: Path, dest: Path) -> Path | None:
    if not tmp.exists():
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), dest)
    return dest


def run_chapters(book_root: Path, chapters: Sequence[str], profile: str, out_dir: Path | None = None,
                 extra_parameters: dict[str, Any] | None = None, log_output: bool = False) -> dict[str, float]:
    """Execute ``chapters`` (already ordered) in place; print one progress line per chapter; return wall times."""
    book_dir = book_root / "book"
    out = (out_dir or book_root / "results" / "book" / profile).resolve()
    params = {"profile": profile, "out_dir": os.path.relpath(out, book_dir), **(extra_parameters or {})}
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pbip-kernel-") as tmp:
        old_path = os.environ.get("JUPYTER_PATH")
        kernel = kernel_for_this_python(Path(tmp))
        try:
            for i, ch in enumerate(chapters, 1):
                name = CHAPTERS[ch][0]
                print(f"[{i}/{len(chapters)}] chapter {ch} {name} (profile {profile}) ...", flush=True)
                times[ch] = execute_chapter(ch, book_dir, params, kernel, book_root / "_build" / "failed",
                                            log_output=log_output)
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
    """``jupyter-book build`` the book root; returns the HTML folder. ``strict`` = ``-W`` (warnings are errors)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Offline JavaScript: require.js, the ipywidgets HTML manager, MathJax 3 from the npm registry
# ---------------------------------------------------------------------------------------------------------------
#: npm spec -> (folder in the package tarball to keep, folder under vendor/). Pinned: the HTML manager 1.0.x
#: is the one ipywidgets 8 embeds (``ipywidgets._version.__html_manager_version__ == "^1.0.1"``).
VENDOR_PACKAGES: dict[str, tuple[str, str]] = {
    "requirejs@2.3.7": ("package", "requirejs"),
    "@jupyter-widgets/html-manager@1.0.13": ("package/dist", "html-manager"),
    "mathjax@3.2.2": ("package/es5", "mathjax"),
}
# MathJax: keep the CHTML combined file, its fonts, the autoloaded TeX extensions and the menu's a11y parts.
_MATHJAX_SKIP = ("sre/", "output/svg", "tex-svg", "tex-mml-svg", "mml-svg", "node-main", "-full")
VENDOR_STAMP = "pbip-vendor.json"
MATHJAX_PATH = "vendor/mathjax/tex-mml-chtml.js"
REQUIRE_PATH = "vendor/requirejs/require.js"
EMBED_PATH = "vendor/html-manager/embed-amd.js"
WIDGETS_CDN = "https://cdn.jsdelivr.net/npm/"


def vendor_dir(book_root: Path) -> Path:
    env = os.environ.get("PBIP_VENDOR_DIR")
    return Path(env).resolve() if env else book_root / "book" / "_static" / "vendor"


def vendor_ready(dest: Path) -> bool:
    """True when ``dest`` holds every pinned package (the stamp lists the npm specs)."""
    try:
        stamp = json.loads((dest / VENDOR_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return sorted(stamp.get("packages", [])) == sorted(VENDOR_PACKAGES) and all(
        (dest.parent / p).is_file() for p in (MATHJAX_PATH, REQUIRE_PATH, EMBED_PATH))


def fetch_vendor(dest: Path, timeout: float = 180.0) -> tuple[bool, str]:
    """``npm pack`` the pinned packages and unpack the needed files into ``dest``; returns (ok, message)."""
    if vendor_ready(dest):
        return True, f"offline JS assets in {dest}"
    npm = shutil.which("npm")
    if npm is None:
        return False, "npm not found"
    with tempfile.TemporaryDirectory(prefix="pbip-npm-") as tmp:
        cmd = [npm, "pack", *VENDOR_PACKAGES, "--pack-destination", tmp, "--silent",
               "--fetch-retries=1", "--fetch-timeout=30000"]
        try:
            proc = subprocess.run(cmd, cwd=tmp, text=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"`npm pack` timed out after {timeout:.0f} s"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return False, f"`npm pack` failed: {last}"
        staging = Path(tmp) / "vendor"
        for spec, (inner, target) in VENDOR_PACKAGES.items():
            tgz = _tarball_name(spec)
            path = Path(tmp) / tgz
            if not path.is_file():
                return False, f"`npm pack {spec}` did not write {tgz}"
            _extract(path, inner, staging / target, skip=_MATHJAX_SKIP if target == "mathjax" else ())
        (staging / VENDOR_STAMP).write_text(json.dumps({"packages": sorted(VENDOR_PACKAGES)}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return True, f"fetched {', '.join(VENDOR_PACKAGES)} into {dest}"


def _tarball_name(spec: str) -> str:
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def _extract(tgz: Path, inner: str, target: Path, skip: Sequence[str] = ()) -> None:
    prefix = inner.rstrip("/") + "/"
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if not m.isfile() or not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if ".." in Path(rel).parts or any(s in rel for s in skip) or rel.endswith(".map"):
                continue
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(out, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)


def _sphinx_config_inited(app: Any, config: Any) -> None:
    from sphinx.util import logging

    log = logging.getLogger("pbip_core.book")
    if os.environ.get("PBIP_BOOK_CDN"):
        log.info("pbip: PBIP_BOOK_CDN set; pages load require.js, the widget manager and MathJax from CDNs")
        return
    dest = vendor_dir(Path(app.srcdir))
    ok, msg = fetch_vendor(dest)
    if not ok:
        log.warning(f"pbip: could not fetch the offline JS assets ({msg}); the pages will load require.js, "
                    "the widget manager and MathJax from CDNs and need internet to show widgets and math")
        return
    log.info(f"pbip: {msg}")
    app._pbip_vendor = dest
    config.mathjax_path = MATHJAX_PATH
    # myst-nb's `ipywidgets_js` (URL -> script attributes): local copies, no crossorigin (file:// pages).
    config.nb_ipywidgets_js = {REQUIRE_PATH: {}, EMBED_PATH: {"data-jupyter-widgets-cdn": WIDGETS_CDN}}


def _sphinx_build_finished(app: Any, exception: Exception | None) -> None:
    dest = getattr(app, "_pbip_vendor", None)
    if exception is None and dest is not None and app.builder.format == "html":
        shutil.copytree(dest, Path(app.outdir) / "_static" / "vendor", dirs_exist_ok=True)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx extension entry point (listed in ``_config.yml`` under ``sphinx: extra_extensions``)."""
    app.connect("config-inited", _sphinx_config_inited, priority=900)
    app.connect("build-finished", _sphinx_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# ---------------------------------------------------------------------------------------------------------------
# Command line: pbip book
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config import PROFILES

    p.add_argument("--profile", default="demo", choices=PROFILES,
                   help="smoke (minutes, CI), demo (the built-in synthetic dataset on a CPU), paper (GPU, real data)")
    p.add_argument("--chapters", default=None,
                   help="comma-separated chapter ids, e.g. 01,04 (their dependencies run too; default: all)")
    p.add_argument("--no-deps", action="store_true", help="run only the named chapters, not their dependencies")
    p.add_argument("--no-html", action="store_true", help="execute the chapters but do not build the HTML")
    p.add_argument("--html-only", action="store_true", help="build the HTML from the notebooks as they are")
    p.add_argument("--out-dir", default=None, help="where chapters write results (default results/book/PROFILE)")
    p.add_argument("--strict", action="store_true", help="jupyter-book -W: warnings fail the build")
    p.add_argument("--strip", action="store_true",
                   help="remove outputs and widget state from the chapter notebooks (before a commit) and exit")
    p.add_argument("--book-root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")


def main(args: argparse.Namespace) -> int:
    root = Path(args.book_root).resolve() if args.book_root else repo_root()
    if not (root / "_config.yml").is_file():
        raise PBIPError(f"{root}: no _config.yml here; run `pbip book` from the repository")
    chapters = chapter_order(args.chapters.split(",") if args.chapters else None, with_deps=not args.no_deps)
    if args.strip:
        import nbformat

        for ch in chapters:
            path = root / "book" / CHAPTERS[ch][0]
            nbformat.write(strip_outputs(nbformat.read(path, as_version=4)), path)
            print(f"stripped {path.relative_to(root)}")
        return 0
    t0 = time.perf_counter()
    if not args.html_only:
        out = Path(args.out_dir).resolve() if args.out_dir else None
        times = run_chapters(root, chapters, args.profile, out, log_output=args.log_output)
        print(f"executed {len(times)} chapter(s) in {sum(times.values()):.1f} s: "
              + ", ".join(f"{c} {t:.1f}s" for c, t in times.items()))
    if not args.no_html:
        t1 = time.perf_counter()
        html = build_html(root, strict=args.strict)
        print(f"built the HTML book in {time.perf_counter() - t1:.1f} s: {html / 'index.html'}")
    print(f"pbip book: done in {time.perf_counter() - t0:.1f} s")
    return 0
