"""The executed book builds with `jupyter-book build -W`, and every page reads well in headless Chromium.

The chapters are executed once per session in a temporary copy of the book (tests/_book_support.py, smoke
profile); the HTML is built there. The offline JavaScript (require.js, the ipywidgets HTML manager, MathJax) comes
from the cache ``book/_static/vendor/`` (fetched with ``npm pack`` when missing).

Every page of ``_toc.yml`` (the intro, every chapter of ``build.CHAPTERS``, any other page listed there) is loaded
from file:// with every host name unresolvable, once per page (one Chromium process, about 5-10 s each), with a small
script injected into a copy of the page: after load (and MathJax's start-up typesetting) it opens every
``<details>``, measures every visible table against the content column and writes a JSON report into
``<pre id="pbip-qa">``, which ``--dump-dom`` returns with the typeset DOM. Per page (:func:`page_problems`):

* maths: MathJax typeset the page (``<mjx-container>``) when its source has maths, without TeX errors
  (``<mjx-merror>``); no literal ``$`` and no raw LaTeX command (``\\frac``, ``\\mathrm``, ``\\tau``, ``\\text{``, ...)
  in the visible text outside code, ``<pre>`` and MathJax output;
* errors: no traceback, no error or stderr output area;
* noise: no progress bar (tqdm text such as ``it/s]``, ``%|``, ``batch/s``; tqdm's widgets in the saved widget state);
* paths: no absolute path (under a machine root such as work, tmp, home or root, or the build folder) in outputs or
  widget state;
* tables and display equations: none wider than the content column (a few px of slack).

Chapters 02, 04, 05 and 06 are also saved as screenshots (1200 px wide) in ``_build/screenshots/``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from _book_support import ROOT, run_all
from pbip_core.book import build as book
from pbip_core.book import vendor

pytestmark = pytest.mark.book

SCREENS = ROOT / "_build" / "screenshots"
SCREENSHOT = SCREENS / "04_delta.png"
SCREENSHOT_PAGES = {"02_image_bank": "02_image_bank.png", "05_contrastive_training": "05_training.png",
                    "06_stage2": "06_stage2.png"}
WINDOW = (1200, 3000)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", '--host-resolver-rules=MAP * ~NOTFOUND']
TABLE_SLACK_PX = 4


def toc_pages(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every page of a Jupyter Book ``_toc.yml`` (the root, then each ``file:`` in order), without suffix."""
    data = yaml.safe_load(toc.read_text())
    pages = [data["root"]]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in data.items() if k != "root"})
    return list(dict.fromkeys(pages))


PAGES = [p for p in toc_pages() if any((ROOT / f"{p}{s}").is_file() for s in (".ipynb", ".md"))]


# ---------------------------------------------------------------------------------------------------------------
# What a page must not show
# ---------------------------------------------------------------------------------------------------------------
LATEX = re.compile(r"\\(?:[A-Za-z]+|[{}|,;!()\[\]])")          # \frac, \mathrm, \tau, \text, \{ ... in visible text
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|\bename\b|^\w*Error: ", re.M)
PROGRESS = re.compile(r"it/s\]|s/it\]|batch/s|img/s|\d+%\|")
ABS_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|root|Users|private|var/folders)/")
SOURCE_MATH = re.compile(r"(?<!\\)\$[^$\n]+(?<!\\)\$|\$\$|\\begin\{|```\{math\}|\{math\}`")
# the theme's script gives a scrollable <pre> a tabindex, so the report's tag may carry more attributes
QA_REPORT = re.compile(r'<pre id="pbip-qa"[^>]*>(.*?)</pre>', re.S)
CODE_TAGS = {"pre", "code", "mjx-container", "math", "textarea", "kbd", "samp"}
CODE_CLASSES = {"cell_input", "highlight", "MathJax", "math", "notranslate"}
SKIP_TAGS = {"script", "style", "noscript", "template", "head", "title", "svg"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}

QA_SCRIPT = """<script>
(function () {
  function report() {
    document.querySelectorAll('details').forEach(function (d) { d.open = true; });
    var col = document.querySelector('article.bd-article') || document.querySelector('.bd-article')
      || document.querySelector('main') || document.body;
    var cr = col.getBoundingClientRect();
    var out = {column: Math.round(col.clientWidth), columnRight: Math.round(cr.right), tables: [],
               mathjax: document.querySelectorAll('mjx-container').length, window: window.innerWidth};
    document.querySelectorAll('table').forEach(function (t, i) {
      var r = t.getBoundingClientRect();
      if (!t.offsetParent || r.width === 0) { return; }          // not shown (an unselected widget page)
      out.tables.push({index: i, width: Math.round(r.width), scroll: t.scrollWidth,
                       overflowRight: Math.round(r.right - cr.right),
                       text: (t.innerText || '').replace(/\\s+/g, ' ').slice(0, 90)});
    });
    out.equations = [];
    document.querySelectorAll('mjx-container[display="true"]').forEach(function (c) {
      var m = c.querySelector('mjx-math') || c;
      var r = m.getBoundingClientRect();
      if (r.width === 0) { return; }
      out.equations.push({width: Math.round(r.width), overflowRight: Math.round(r.right - cr.right),
                          text: (c.getAttribute('aria-label') || c.textContent || '').replace(/\\s+/g, ' ').slice(0, 90)});
    });
    var pre = document.createElement('pre');
    pre.id = 'pbip-qa';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () {
    var mj = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
    (mj || Promise.resolve()).then(function () { setTimeout(report, 300); }, report);
  });
})();
</script>"""


class PageText(HTMLParser):
    """Text of a rendered page, split into prose (visible text outside code, ``<pre>`` and MathJax output) and
    outputs (the text of every cell output area, ``<pre>`` included), with the classes of the output areas."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool, bool]] = []      # (tag, skip, code, output)
        self.prose: list[str] = []
        self.outputs: list[str] = []
        self.output_classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        skip, code, out = self.stack[-1][1:] if self.stack else (False, False, False)
        skip = skip or tag in SKIP_TAGS
        code = code or tag in CODE_TAGS or tag.startswith("mjx-") or bool(CODE_CLASSES & set(cls.split()))
        if "cell_output" in cls.split() or "output" in cls.split():
            out = True
            self.output_classes.append(cls)
        if tag not in VOID:
            self.stack.append((tag, skip, code, out))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        skip, code, out = self.stack[-1][1:] if self.stack else (False, False, False)
        if skip:
            return
        if out:
            self.outputs.append(data)
        if not code:
            self.prose.append(data)


def snippet(text: str, m: re.Match, width: int = 50) -> str:
    return " ".join(text[max(0, m.start() - width): m.end() + width].split())


def widget_state(dom: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/vnd\.jupyter\.widget-state\+json">(.*?)</script>', dom, re.S)
    if not found:
        return {}
    try:
        return json.loads(found.group(1)).get("state", {})
    except ValueError:
        return {}


def progress_widgets(state: dict[str, Any]) -> list[str]:
    """tqdm's notebook bars in a saved widget state: HBoxes holding a Float/IntProgress model."""
    names = {k: v.get("model_name") for k, v in state.items()}
    bars = []
    for k, v in state.items():
        kids = [c.removeprefix("IPY_MODEL_") for c in v.get("state", {}).get("children", []) if isinstance(c, str)]
        if names[k] == "HBoxModel" and any(names.get(c) in book.PROGRESS_MODELS for c in kids):
            bars.append(k)
    return bars


def page_problems(dom: str, source_has_math: bool, build_dirs: list[str]) -> list[str]:
    """Every problem of a rendered page (``--dump-dom`` output with the ``pbip-qa`` report), one line each:
    ``check: snippet``."""
    problems: list[str] = []
    qa_match = QA_REPORT.search(dom)
    qa = json.loads(html.unescape(qa_match.group(1))) if qa_match else None
    dom = dom.replace(qa_match.group(0), "") if qa_match else dom
    text = PageText()
    text.feed(dom)
    prose, outputs = "".join(text.prose), "\n".join(text.outputs)
    # maths
    if source_has_math and "<mjx-container" not in dom:
        problems.append("maths: the source has maths but MathJax typeset nothing (no <mjx-container>)")
    for m in re.finditer(r'<mjx-merror[^>]*data-mjx-error="([^"]*)"', dom):
        problems.append(f"maths: MathJax error {m.group(1)!r}")
    for m in re.finditer(r"\$", prose):
        problems.append(f"literal $: ...{snippet(prose, m)}...")
    for m in LATEX.finditer(prose):
        problems.append(f"raw LaTeX {m.group(0)!r}: ...{snippet(prose, m)}...")
    # errors
    for m in TRACEBACK.finditer(outputs):
        problems.append(f"error output: ...{snippet(outputs, m)}...")
    for cls in text.output_classes:
        if any(w in cls.lower() for w in ("error", "traceback", "stderr")):
            problems.append(f"error output area: class {cls!r}")
    # noise
    for m in PROGRESS.finditer(outputs):
        problems.append(f"progress bar text: ...{snippet(outputs, m)}...")
    state = widget_state(dom)
    if progress_widgets(state):
        problems.append(f"progress bar widgets: {len(progress_widgets(state))} tqdm bars (HBoxModel + "
                        "FloatProgressModel) in the widget state")
    # paths
    state_text = json.dumps(state)
    for where, t in (("output", outputs), ("widget state", state_text)):
        for m in ABS_PATH.finditer(t):
            problems.append(f"absolute path in {where}: ...{snippet(t, m)}...")
        for d in build_dirs:
            if d and d in t and not ABS_PATH.search(d):
                problems.append(f"build folder in {where}: {d}")
    # tables
    if qa is None:
        problems.append("tables: no layout report (the injected script did not run)")
    else:
        for t in qa["tables"]:
            wide = max(t["width"], t["scroll"])
            if wide > qa["column"] + TABLE_SLACK_PX or t["overflowRight"] > TABLE_SLACK_PX:
                problems.append(f"table wider than the content column ({wide} px > {qa['column']} px, "
                                f"{t['overflowRight']} px past its right edge): {t['text'][:80]!r}")
        for e in qa.get("equations", []):
            if e["width"] > qa["column"] + TABLE_SLACK_PX or e["overflowRight"] > TABLE_SLACK_PX:
                problems.append(f"equation wider than the content column ({e['width']} px > {qa['column']} px, "
                                f"{e['overflowRight']} px past its right edge): {e['text'][:80]!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vendor_ok():
    ok, msg = vendor.fetch_vendor(vendor.vendor_dir(ROOT))
    return ok, msg


@pytest.fixture(scope="module")
def book_root():
    """The session's executed copy of the book (every chapter, smoke profile)."""
    return run_all()


@pytest.fixture(scope="module")
def html_dir(vendor_ok, book_root, tmp_path_factory):
    """Execute every chapter (smoke), then `jupyter-book build -W -n --keep-going` into a temporary folder."""
    ok, _ = vendor_ok
    env = {"PBIP_VENDOR_DIR": str(vendor.vendor_dir(ROOT))} if ok else {"PBIP_BOOK_CDN": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = tmp_path_factory.mktemp("html")
        return book.build_html(book_root, path_output=out, strict=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser(vendor_ok):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    ok, msg = vendor_ok
    if not ok:
        pytest.skip(f"offline JS assets unavailable ({msg}); pages need the CDN")
    return exe


def _chrome(exe: str, profile: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=profile.parent)


def rendered_dom(exe: str, page: Path, tmp: Path) -> str:
    """The DOM of ``page`` after load, MathJax and the QA script (a copy of the page, beside it)."""
    text = page.read_text()
    copy = page.with_name(f".qa-{page.name}")
    copy.write_text(text.replace("</body>", QA_SCRIPT + "</body>", 1) if "</body>" in text else text + QA_SCRIPT)
    try:
        return _chrome(exe, tmp / "profile", "--dump-dom", copy.as_uri()).stdout
    finally:
        copy.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
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


def test_every_chapter_is_a_checked_page():
    """The per-page checks cover the intro and every chapter that `pbip book` executes."""
    assert PAGES[0] == "book/intro"
    for name, _ in book.CHAPTERS.values():
        assert f"book/{Path(name).stem}" in PAGES, f"{name} is not in _toc.yml"


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


def has_source_math(markdown: str) -> bool:
    """Whether Markdown text has maths outside code (a ``$`` in a shell line such as ``$(nproc)`` is not maths)."""
    fenced = re.sub(r"^(```|~~~)(?!\{math\}).*?^\1", "", markdown, flags=re.S | re.M)   # ```{math} is maths
    prose = re.sub(r"(?<!`)`[^`\n]+`(?!`)", "", fenced)
    return bool(SOURCE_MATH.search(prose))


def _source(root: Path, page: str) -> tuple[Path, bool]:
    """The page's source in the executed copy and whether its text (markdown cells) has maths."""
    for suffix in (".ipynb", ".md"):
        src = root / f"{page}{suffix}"
        if src.is_file():
            if suffix == ".md":
                return src, has_source_math(src.read_text())
            cells = json.loads(src.read_text())["cells"]
            text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
            return src, has_source_math(text)
    raise FileNotFoundError(f"{root / page}.ipynb|.md")


@pytest.mark.parametrize("page", PAGES, ids=[Path(p).name for p in PAGES])
def test_page_reads_well(page, html_dir, book_root, browser, tmp_path):
    """Maths typeset, no raw TeX, no error output, no progress bar, no machine path, no table past the column."""
    path = html_dir / f"{page}.html"
    assert path.is_file(), path
    _, has_math = _source(book_root, page)
    dom = rendered_dom(browser, path, tmp_path)
    assert QA_REPORT.search(dom), f"{page}: the page did not finish loading in Chromium"
    problems = page_problems(dom, has_math, [str(html_dir.parent), str(book_root.parent)])
    assert not problems, f"{page}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:40])


def test_source_math_ignores_code():
    assert has_source_math("the cut $\\tau = \\delta$ of eq. 4")
    assert has_source_math("```{math}\nx^2\n```\n")
    assert not has_source_math('run `pbip run plan.yaml --only $(sed -n "${TASK_ID}p" runs.txt)` per task')
    assert not has_source_math("```bash\nJOBS=$(nproc) make book\necho $HOME\n```\n")


def test_page_checks_find_each_problem():
    """page_problems on a hand-made page with one instance of every problem names each of them."""
    qa = {"column": 700, "tables": [{"width": 900, "scroll": 900, "overflowRight": 200, "text": "wide"}],
          "equations": [{"width": 760, "overflowRight": 60, "text": "IoU_c = ..."},
                        {"width": 400, "overflowRight": -300, "text": "fits"}]}
    state = {"a": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_b"]}},
             "b": {"model_name": "FloatProgressModel", "state": {}}}
    dom = ("<html><body><p>the threshold $\\tau$ and \\frac{a}{b}</p><pre>$ ok in code</pre>"
           "<div class=\"cell_output\"><div class=\"output stream\"><pre>epoch 1: 100%|##| 3/3 [00:01, 2.0it/s]\n"
           "Traceback (most recent call last)\nresults in " + "/wo" + "rk/x/results</pre></div>"
           "<div class=\"output stderr\"><pre>w</pre></div></div>"
           f"<script type=\"application/vnd.jupyter.widget-state+json\">{json.dumps({'state': state})}</script>"
           f"<pre id=\"pbip-qa\">{json.dumps(qa)}</pre></body></html>")
    problems = page_problems(dom, True, [])
    kinds = {p.split(":")[0] for p in problems}
    assert {"maths", "literal $", "raw LaTeX '\\\\tau'", "raw LaTeX '\\\\frac'", "error output",
            "error output area", "progress bar text", "progress bar widgets", "absolute path in output"} <= kinds, \
        problems
    assert any(p.startswith("table wider than the content column (900 px > 700 px") for p in problems)
    wide_maths = [p for p in problems if p.startswith("equation wider than the content column")]
    assert len(wide_maths) == 1 and "(760 px > 700 px, 60 px past" in wide_maths[0], problems
    clean = ("<html><body><p>the threshold <mjx-container>x</mjx-container></p><pre>$ \\tau in code</pre>"
             f"<pre id=\"pbip-qa\">{json.dumps({'column': 700, 'tables': []})}</pre></body></html>")
    assert page_problems(clean, True, []) == []


def _screenshot(exe: str, url: str, dest: Path, tmp_path: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    _chrome(exe, tmp_path / "profile", f"--screenshot={dest}", url)
    assert dest.is_file() and dest.stat().st_size > 20_000, dest
    from PIL import Image

    with Image.open(dest) as im:
        assert im.size == WINDOW
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{dest}: the screenshot is blank"


def test_delta_chapter_renders_offline_in_chromium(html_dir, browser, tmp_path):
    url = (html_dir / "book" / "04_adaptive_threshold.html").as_uri()
    dom = _chrome(browser, tmp_path / "profile", "--dump-dom", url).stdout
    assert "<mjx-container" in dom, "MathJax did not typeset the equations"
    classes = re.findall(r'class="([^"]*)"', dom)
    assert any("widget-slider" in c.split() for c in classes), "no rendered ipywidgets slider"
    assert any("jupyter-widgets" in c.split() for c in classes)
    assert re.search(r'class="widget-readout"[^>]*>0\.15<', dom), "the slider reads delta = 0.15"
    assert '<img src="data:image/png' in dom, "the figure for the selected delta is shown"
    _screenshot(browser, url, SCREENSHOT, tmp_path)


@pytest.mark.parametrize("page", sorted(SCREENSHOT_PAGES))
def test_chapter_screenshots(page, html_dir, browser, tmp_path):
    """Screenshots of the top of chapters 02, 05 and 06 (1200 px wide) for a reader's eye: _build/screenshots/."""
    _screenshot(browser, (html_dir / "book" / f"{page}.html").as_uri(), SCREENS / SCREENSHOT_PAGES[page], tmp_path)
