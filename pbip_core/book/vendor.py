"""Offline JavaScript for the HTML book: require.js, the ipywidgets HTML manager and MathJax 3 from the npm registry.

This module is a Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [pbip_core.book.vendor]``): at
``config-inited`` it fetches pinned copies of those files with ``npm pack`` into ``book/_static/vendor/`` (a cache, not
committed), points ``mathjax_path`` and myst-nb's ``nb_ipywidgets_js`` at them and copies them into
``_build/html/_static/vendor/``. If npm cannot reach the registry the build warns and keeps the CDN URLs.
``PBIP_BOOK_CDN=1`` forces the CDN; ``PBIP_VENDOR_DIR`` moves the cache.

It also adds the book's small style sheet (:data:`PAGE_CSS`, written to ``_build/html/_static/pbip.css``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VENDOR_PACKAGES: dict[str, tuple[str, str]] = {
    "requirejs@2.3.7": ("package", "requirejs"),
    "@jupyter-widgets/html-manager@1.0.13": ("package/dist", "html-manager"),
    "mathjax@3.2.2": ("package/es5", "mathjax"),
}


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

    log = logging.getLogger("pbip_core.book.vendor")
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


# Markdown tables (the intro's readings, cite's sources) hold long paths and config keys in <code>: let them break
# anywhere, so a table shrinks to the content column instead of running past it.
PAGE_CSS = """\
.bd-article table { max-width: 100%; }
.bd-article table td, .bd-article table th, .bd-article table code { overflow-wrap: anywhere; }
"""
PAGE_CSS_NAME = "pbip.css"


def _sphinx_build_finished(app: Any, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    (static / PAGE_CSS_NAME).write_text(PAGE_CSS)
    dest = getattr(app, "_pbip_vendor", None)
    if dest is not None:
        shutil.copytree(dest, static / "vendor", dirs_exist_ok=True)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx extension entry point (listed in ``_config.yml`` under ``sphinx: extra_extensions``)."""
    app.connect("config-inited", _sphinx_config_inited, priority=900)
    app.connect("build-finished", _sphinx_build_finished)
    app.add_css_file(PAGE_CSS_NAME)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
