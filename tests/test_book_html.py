"""The executed book builds with `jupyter-book build -W`, and its pages render offline in headless Chromium.

The chapters are executed once per session in a temporary copy of the book (tests/_book_support.py, smoke
profile); the HTML is built there. The offline JavaScript (require.js, the ipywidgets HTML manager, MathJax) comes
from the cache ``book/_static/vendor/`` (fetched with ``npm pack`` when missing). The Chromium check loads chapter
04 from file:// with every host name unresolvable and looks for the delta slider and typeset equations; it saves a
screenshot to ``_build/screenshots/04_delta.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from _book_support import ROOT, run_all
from pbip_core.book import build as book
from pbip_core.book import vendor

pytestmark = pytest.mark.book

SCREENSHOT = ROOT / "_build" / "screenshots" / "04_delta.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", '--host-resolver-rules=MAP * ~NOTFOUND']


@pytest.fixture(scope="module")
def vendor_ok():
    ok, msg = vendor.fetch_vendor(vendor.vendor_dir(ROOT))
    return ok, msg


@pytest.fixture(scope="module")
def html_dir(vendor_ok, tmp_path_factory):
    """Execute every chapter (smoke), then `jupyter-book build -W -n --keep-going` into a temporary folder."""
    root = run_all()
    ok, _ = vendor_ok
    env = {"PBIP_VENDOR_DIR": str(vendor.vendor_dir(ROOT))} if ok else {"PBIP_BOOK_CDN": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = tmp_path_factory.mktemp("html")
        return book.build_html(root, path_output=out, strict=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_strict_build_has_every_page(html_dir):
    assert (html_dir / "index.html").is_file()
    assert (html_dir / "book" / "intro.html").is_file()
    for name, _ in book.CHAPTERS.values():
        page = html_dir / "book" / f"{Path(name).stem}.html"
        assert page.is_file(), page
        text = page.read_text()
        # papermill's injected cell and the defaults cell are removed (remove-cell tags)
        assert "injected-parameters" not in text
        assert 'out_dir = "' not in text and "out_dir = None" not in text
        assert "profile=smoke" in text, f"{page.name}: the setup cell's output is shown"


def test_pages_use_local_javascript(html_dir, vendor_ok):
    ok, msg = vendor_ok
    if not ok:
        pytest.skip(f"offline JS assets unavailable ({msg}); the build fell back to the CDN")
    page = (html_dir / "book" / "04_adaptive_threshold.html").read_text()
    srcs = re.findall(r'<script[^>]*\ssrc="([^"]+)"', page)
    remote = [s for s in srcs if s.startswith(("http:", "https:", "//"))]
    assert not remote, f"scripts loaded from the network: {remote}"
    for needed in (vendor.REQUIRE_PATH, vendor.EMBED_PATH, vendor.MATHJAX_PATH):
        assert any(s.split("?")[0].endswith(needed) for s in srcs), needed
        assert (html_dir / "_static" / needed).is_file(), needed
    assert 'type="application/vnd.jupyter.widget-state+json"' in page, "the widget state is embedded"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_delta_chapter_renders_offline_in_chromium(html_dir, vendor_ok, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    ok, msg = vendor_ok
    if not ok:
        pytest.skip(f"offline JS assets unavailable ({msg}); pages need the CDN")
    url = (html_dir / "book" / "04_adaptive_threshold.html").as_uri()
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert "<mjx-container" in dom, "MathJax did not typeset the equations"
    classes = re.findall(r'class="([^"]*)"', dom)
    assert any("widget-slider" in c.split() for c in classes), "no rendered ipywidgets slider"
    assert any("jupyter-widgets" in c.split() for c in classes)
    assert re.search(r'class="widget-readout"[^>]*>0\.15<', dom), "the slider reads delta = 0.15"
    assert '<img src="data:image/png' in dom, "the figure for the selected delta is shown"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    subprocess.run([*common, "--window-size=1200,3000", f"--screenshot={SCREENSHOT}", url],
                   capture_output=True, timeout=180, cwd=tmp_path)
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 20_000
    from PIL import Image

    with Image.open(SCREENSHOT) as im:
        assert im.size == (1200, 3000)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "the screenshot is blank"
