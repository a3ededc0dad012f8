"""The book's chapters run under papermill with the smoke profile; `pbip book`'s helpers behave.

Chapter tests (marked ``book``) execute copies of the notebooks in a temporary book root (tests/_book_support.py),
so the committed notebooks are never rewritten.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from _book_support import ROOT, book_copy, outputs, run_chapter, texts
from pbip_core.book import build as book
from pbip_core.book import chapter, vendor
from pbip_core.cli import build_parser
from pbip_core.cli.book import book_main


def _book_args(*argv: str) -> argparse.Namespace:
    """``pbip book ARGV`` parsed by the real parser (every option present with its default)."""
    return build_parser("book").parse_args(["book", *argv])
from pbip_core.engine.bank import OFFICIAL_PROTOTYPES
from pbip_core.errors import ConfigError, PBIPError

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# ---------------------------------------------------------------------------------------------------------------
# The committed notebooks: structure (no execution)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chapter", list(book.CHAPTERS))
def test_notebook_structure(chapter):
    path = ROOT / "book" / book.CHAPTERS[chapter][0]
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), "first cell: parameters"
    for name in ("profile", "dataset", "encoder", "seeds", "out_dir"):
        assert any(line.startswith(f"{name} =") for line in first.source.splitlines()), name
    # papermill parses every parameter (a "=" inside a comment would hide it from `papermill --help-notebook`)
    assert all(line.count("=") <= 1 for line in first.source.splitlines()), "no '=' in parameter comments"
    # chapters are titled "# NN ..."; the introduction (the book's root page) carries the book's title
    title = "# PBIP, reproduced" if chapter == "00" else f"# {chapter} "
    assert nb.cells[1].cell_type == "markdown" and nb.cells[1].source.startswith(title), "title next"
    assert any("$$" in c.source for c in nb.cells if c.cell_type == "markdown"), "equations in LaTeX"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("pbip_core" in c.source for c in code)
    assert max(len(c.source.splitlines()) for c in code) <= 20, "logic belongs in pbip_core, not in cells"
    # committed clean: no outputs, no widget state, no injected cell
    assert all(not c.get("outputs") for c in code), f"{path.name}: run `pbip book --strip` before committing"
    assert "widgets" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_toc_lists_every_chapter():
    toc = (ROOT / "_toc.yml").read_text()
    for name, _ in book.CHAPTERS.values():
        assert f"book/{Path(name).stem}" in toc
    assert "root: book/intro" in toc
    config = (ROOT / "_config.yml").read_text()
    assert 'execute_notebooks: "off"' in config and "pbip_core.book.vendor" in config


# ---------------------------------------------------------------------------------------------------------------
# Helpers of pbip_core.book (no kernel)
# ---------------------------------------------------------------------------------------------------------------
def test_chapter_order_puts_dependencies_first():
    order = book.chapter_order()
    assert sorted(order) == sorted(book.CHAPTERS)
    for ch, (_, deps) in book.CHAPTERS.items():
        for dep in deps:
            assert order.index(dep) < order.index(ch), (dep, ch)
    assert book.chapter_order(["4"]) == ["01", "02", "03", "04"]
    assert book.chapter_order(["04"], with_deps=False) == ["04"]
    assert book.chapter_order(["06", "01"], with_deps=False) == ["01", "06"]
    with pytest.raises(ConfigError, match="unknown chapter"):
        book.chapter_order(["42"])


def test_hide_and_strip():
    nb = new_notebook(cells=[new_code_cell("profile = 'demo'", metadata={"tags": ["parameters"]}),
                             new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]}),
                             new_markdown_cell("# 00 t"), new_code_cell("1")])
    nb.cells[3].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"}, execution_count=1)]
    nb.cells[3].execution_count = 1
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {}}}
    nb.metadata["papermill"] = {"parameters": {}}
    assert book.hide_injected_parameters(nb) == 1
    assert nb.cells[1].metadata.tags == ["injected-parameters", "remove-cell"]
    assert book.hide_injected_parameters(nb) == 0  # idempotent
    book.strip_outputs(nb)
    assert len(nb.cells) == 3 and nb.cells[0].metadata.tags == ["parameters"]
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None
    assert "widgets" not in nb.metadata and "papermill" not in nb.metadata


def test_strip_command_on_a_copy(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_static", ".*"))
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, root / name)
    path = root / "book" / book.CHAPTERS["02"][0]
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(1, new_code_cell("x = 1", metadata={"tags": ["injected-parameters"]}))
    nbformat.write(nb, path)
    assert book_main(_book_args("--book-root", str(root), "--chapters", "02", "--no-deps", "--strip")) == 0
    stripped = nbformat.read(path, as_version=4)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in stripped.cells)
    assert len(stripped.cells) == len(nb.cells) - 1


def test_chapter_setup_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ch = chapter.chapter_setup("smoke", out_dir=str(tmp_path / "out"))
    assert ch.out_dir == tmp_path / "out" and ch.out_dir.is_dir()
    assert ch.dataset == tmp_path / "out" / "kather-mosaic" and ch.builtin == "kather-mosaic" and not ch.synthetic
    assert ch.seeds == chapter.DEFAULT_SEEDS["smoke"]
    assert ch.encoder == ch.cfg.bank.encoder and ch.cfg.profile == "smoke"
    assert ch.cfg.data.root == str(ch.dataset)
    ch2 = chapter.chapter_setup("demo", dataset="mydata", encoder="pathmnist-densenet121", seeds=[3, 4],
                             out_dir="o")
    assert ch2.dataset == tmp_path / "mydata" and ch2.builtin is None
    assert ch2.encoder == "pathmnist-densenet121" == ch2.cfg.bank.encoder and ch2.seeds == (3, 4)
    with pytest.raises(PBIPError, match="dataset folder not found"):
        chapter.ensure_dataset(ch2)
    with pytest.raises(ConfigError):
        chapter.chapter_setup("huge", out_dir="o")
    syn = chapter.chapter_setup("smoke", dataset="synth", out_dir=str(tmp_path / "out"))
    assert syn.synthetic and syn.dataset == tmp_path / "out" / "synth"
    root = chapter.ensure_dataset(ch)                        # the smoke-sized built-in dataset, made once
    assert (root / "dataset.yaml").is_file() and len(list((root / "train").glob("*.png"))) == 48
    assert chapter.ensure_dataset(ch) == root


def test_kernel_for_this_python_writes_a_spec_when_needed(tmp_path, monkeypatch):
    """With a python3 kernelspec that points at another interpreter, a spec for this one is put first."""
    other = tmp_path / "other" / "kernels" / "python3"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps({"argv": ["/usr/bin/false", "-f", "{connection_file}"],
                                                   "display_name": "other", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "other"))
    assert book.kernel_for_this_python(tmp_path / "mine") == "python3"
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(book.sys.executable).resolve()


def test_run_chapters_order_parameters_and_progress(tmp_path, monkeypatch, capsys):
    """`pbip book` runs chapters in order from book/ into the build copy, with profile and out_dir injected."""
    calls = []

    def fake_execute(ch, book_dir, params, kernel, failed_dir, log_output=False, cell_timeout=None, source_dir=None):
        calls.append((ch, book_dir, dict(params), kernel, source_dir))
        return 0.25

    monkeypatch.setattr(book, "execute_chapter", fake_execute)
    _book_sources(tmp_path)
    times = book.run_chapters(tmp_path, book.chapter_order(["03"]), "smoke", tmp_path / "res")
    assert [c[0] for c in calls] == ["01", "02", "03"] and times == {"01": 0.25, "02": 0.25, "03": 0.25}
    work = tmp_path / "_build" / "src" / "book"
    assert all(c[1] == work and c[3] == "python3" and c[4] == tmp_path / "book" for c in calls)
    assert calls[0][2] == {"profile": "smoke", "out_dir": "../../../res"}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[1/3] chapter 01 01_data.ipynb (profile smoke)")
    assert out[-1] == "[3/3] chapter 03 done in 0.2 s"


def _book_sources(root: Path) -> Path:
    """A copy of the book's sources (committed notebooks, intro, configuration) under ``root``."""
    shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_static", ".*"), dirs_exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, root / name)
    return root


def test_stage_book_copies_sources_and_keeps_executed_chapters(tmp_path, monkeypatch):
    root = _book_sources(tmp_path / "repo")
    work = book.stage_book(root)
    assert work == root / "_build" / "src"
    for name in ("_config.yml", "_toc.yml", "book/cite.md", *(f"book/{nb}" for nb, _ in book.CHAPTERS.values())):
        assert (work / name).read_bytes() == (root / name).read_bytes(), name
    executed = work / "book" / book.CHAPTERS["02"][0]
    executed.write_text(executed.read_text().replace('"outputs": []', '"outputs": [ ]', 1))   # "executed"
    (root / "book" / "cite.md").write_text("# changed page\n")
    book.stage_book(root)
    assert '"outputs": [ ]' in executed.read_text(), "an executed chapter is kept"
    assert (work / "book" / "cite.md").read_text() == "# changed page\n", "other sources are refreshed"
    # chapters running in the copy find the repository (data/, results/), not the copy
    monkeypatch.chdir(work / "book")
    assert chapter.repo_root() == root.resolve()
    assert chapter.chapter_setup("smoke").out_dir == root.resolve() / "results" / "book" / "smoke"


@pytest.mark.book
def test_pbip_book_leaves_the_committed_notebooks_untouched(tmp_path, monkeypatch, capsys):
    """A real papermill run of a small chapter: the executed copy lands in _build/src/book, book/ stays as it was."""
    root = tmp_path / "repo"
    (root / "book").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, root / name)
    nb = new_notebook(cells=[new_code_cell("profile = 'demo'\nout_dir = None", metadata={"tags": ["parameters"]}),
                             new_markdown_cell("# 77 tiny"), new_code_cell("print('ran with', profile)")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = root / "book" / "77_tiny.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    monkeypatch.setitem(book.CHAPTERS, "77", ("77_tiny.ipynb", ()))
    args = _book_args("--book-root", str(root), "--chapters", "77", "--no-deps", "--no-html",
                      "--out-dir", str(tmp_path / "res"), "--profile", "smoke")
    assert book_main(args) == 0
    assert path.read_bytes() == before, "the committed notebook is not rewritten"
    executed = nbformat.read(root / "_build" / "src" / "book" / "77_tiny.ipynb", as_version=4)
    assert any("ran with smoke" in t for t in texts(executed, "stream"))
    assert "into " + str(root / "_build" / "src" / "book") in capsys.readouterr().out


def test_vendor_helpers(tmp_path):
    assert vendor._tarball_name("@jupyter-widgets/html-manager@1.0.13") == "jupyter-widgets-html-manager-1.0.13.tgz"
    assert vendor._tarball_name("mathjax@3.2.2") == "mathjax-3.2.2.tgz"
    assert not vendor.vendor_ready(tmp_path / "vendor")
    import tarfile

    src = tmp_path / "src" / "package" / "es5"
    for rel in ("tex-mml-chtml.js", "sre/big.js", "output/chtml/fonts/woff-v2/a.woff", "x.js.map"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    tgz = tmp_path / "m.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "package", arcname="package")
    vendor._extract(tgz, "package/es5", tmp_path / "out", skip=vendor._MATHJAX_SKIP)
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["output/chtml/fonts/woff-v2/a.woff", "tex-mml-chtml.js"]


# ---------------------------------------------------------------------------------------------------------------
# Executing chapters (papermill, smoke profile)
# ---------------------------------------------------------------------------------------------------------------
def _no_errors(nb):
    """No error output: no error cell, and no stderr stream (warnings, tracebacks, log noise) in the page either."""
    errors = [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""
    stderr = [o["text"] for o in outputs(nb) if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"stderr output in the chapter: {stderr[0][:500]}"


def _check_01(nb):
    html = "\n".join(texts(nb, "text/html"))
    for marker in ("LUAD-HistoSeg", "BCSS-WSSS", "GCSS", "images with class", "single-class images",
                   "classes per image", "pixel share"):
        assert marker in html, f"chapter 01: no table with {marker!r}"
    assert len(texts(nb, "image/png")) >= 4, "chapter 01: label statistics and image/mask grid figures"


def _check_04(nb):
    assert texts(nb, WIDGET_VIEW), "chapter 04: the delta explorer widget is displayed"
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    models = {m["model_name"] for m in state.values()}
    assert {"SelectionSliderModel", "StackModel", "LinkModel", "HTMLModel"} <= models
    slider = next(m["state"] for m in state.values() if m["model_name"] == "SelectionSliderModel")
    assert slider["_options_labels"][slider["index"]] == "0.15"  # the paper's delta (eq. 4)
    html = "\n".join(texts(nb, "text/html"))
    assert "foreground share" in html


CHECKS = {"01": _check_01, "04": _check_04}


# ----- chapters 02, 03, 04, 08 (image bank, similarity masks, adaptive threshold, zero-shot) -------------------
def _html(nb):
    return "\n".join(texts(nb, "text/html"))


def _markdown(nb):
    """The Markdown the chapter's cells display (findings paragraphs, "Not run here" lists)."""
    return "\n".join(texts(nb, "text/markdown"))


def _check_02(nb):
    html = _html(nb)
    for marker in ("single-class", "dropped as white", "eligible for the bank", "sub-bank size",
                   "within class (other prototypes)"):
        assert marker in html, f"chapter 02: no table with {marker!r}"
    assert len(texts(nb, "image/png")) >= 4, "chapter 02: white filter, montage, projection, similarity heatmap"
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    slider = next(m["state"] for m in state.values() if m["model_name"] == "SelectionSliderModel")
    assert any(label.startswith("K=") for label in slider["_options_labels"]), "the (K, N_K) explorer"
    stream = "\n".join(texts(nb, "stream"))
    assert "prototypes P:" in stream and "(N, K, d)" in stream
    assert OFFICIAL_PROTOTYPES.is_file()
    assert "(4, 3, 512)" in stream, "chapter 02: the official prototype file's shape"


def _check_03(nb):
    html = _html(nb)
    assert "M_i" in html and "P_i" in html, "chapter 03: the shapes table of eq. 2"
    stream = "\n".join(texts(nb, "stream"))
    hand, lib = (float(v) for v in re.search(r"by hand (-?[\d.]+), sim_map (-?[\d.]+)", stream).groups())
    assert abs(hand - lib) < 1e-5, "chapter 03: eq. 2 by hand equals sim_map"
    assert len(texts(nb, "image/png")) >= 2, "chapter 03: per-level maps and the batch figure"


def _check_04_real_maps(nb):
    _check_04(nb)
    stream = "\n".join(texts(nb, "stream"))
    assert "stage-1" in stream or "pbip run:" in stream, "chapter 04 uses the trained run's maps"
    assert "demo_cam" not in "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert len(texts(nb, "image/png")) >= 1, "chapter 04: Figure 1 (with / without AT)"


def _check_08(nb):
    html = _html(nb)
    assert "Table 6" in _markdown(nb) + html
    for marker in ("Image / PLIP", "Image / imagenet-efficientnet-lite0", "F1 mean"):
        assert marker in html, f"chapter 08: no row/column {marker!r}"
    # the encoders whose weights are not here are listed under the table, with the reason
    not_run = _markdown(nb)
    assert "Not run here:" in not_run and "Text / clip" in not_run, "chapter 08: the text-prompt rows that did not run"


CHECKS.update({"02": _check_02, "03": _check_03, "04": _check_04_real_maps, "08": _check_08})
# ----- end of chapters 02, 03, 04, 08 ----------------------------------------------------------------------------


# ----- chapters 05, 06, 07, 09 (contrastive training, stage 2 / Table 1, ablations, paper vs code) ---------------
def _tables(nb):
    return "\n".join(texts(nb, "text/html"))


def _check_05(nb):
    html = _tables(nb)
    assert "L_FGS (eq. 9)" in html and "by hand" in html, "chapter 05: the toy loss table"
    assert "Paper (Tang et al. 2025, Table 5" in html and "profile smoke" in html, "chapter 05: stage-1 vs paper"
    for method in ("pbip", "cam", "official"):
        assert method in html
    assert len(texts(nb, "image/png")) >= 4, "chapter 05: loss curves, val curves, Figure 5a and 5b"


def _check_06(nb):
    html = _tables(nb)
    assert "Paper (Tang et al. 2025, Table 1" in html and "PBIP (Ours)" in html, "chapter 06: Table 1"
    assert "stage-2 predictions on test" in html and "seeds [0]" in html, "chapter 06: provenance caption"
    assert "stage 2 - " in html and "(pp)" in html, "chapter 06: stage 2's gain over each stage-1 protocol"
    found = _markdown(nb)
    assert "What we found (stage 2, test split)" in found, "chapter 06: the findings paragraph"
    assert "a single run per group: no test possible" in found, "chapter 06: one smoke seed is not tested"
    assert len(texts(nb, "image/png")) >= 2


def _check_07(nb):
    html = _tables(nb)
    for table in ("Table 2", "Table 5", "Table 4", "Figure 4", "Table 3"):
        assert f"Paper (Tang et al. 2025, {table}" in html, f"chapter 07: {table} beside the paper"
    assert "CLS+FGS+BGS" in html and "SIM+AT" in html and "100 clustering" in html
    found = _markdown(nb)
    assert "Not run here:" in found and "weights not available offline" in found, "chapter 07: Table 3 status"
    assert "no numbers for Figure 3" in "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "s = 1" in html and "no white rule" in html, "chapter 07: the readings switched back"
    assert len(texts(nb, "image/png")) >= 3, "chapter 07: Table 2 bars, Figure 3, Figure 4"


def _check_09(nb):
    html = _tables(nb)
    for marker in ("temperature of eq. 9, 11", "mask threshold (eq. 4)", "official preset",
                   "pooled FG/BG (approximation)", "stage-1 training (s)", "official source", "p (Welch)",
                   "explains part of the gap", "sub-class pairs"):
        assert marker in html, f"chapter 09: no row/column {marker!r}"
    assert len(texts(nb, "image/png")) >= 1


CHECKS.update({"05": _check_05, "06": _check_06, "07": _check_07, "09": _check_09})
# ----- end of chapters 05, 06, 07, 09 ----------------------------------------------------------------------------


@pytest.mark.book
@pytest.mark.parametrize("chapter", list(book.CHAPTERS))
def test_chapter_runs_with_smoke_profile(chapter):
    nb = run_chapter(chapter)
    _no_errors(nb)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata.tags
    assert "profile = \"smoke\"" in injected[0].source
    assert any("profile=smoke" in t for t in texts(nb, "stream")), "the setup cell prints the parameters"
    CHECKS.get(chapter, lambda nb: None)(nb)


@pytest.mark.book
def test_failing_chapter_names_chapter_and_cell(tmp_path, monkeypatch):
    book_dir = tmp_path / "book"
    book_dir.mkdir()
    nb = new_notebook(cells=[new_code_cell("profile = 'demo'", metadata={"tags": ["parameters"]}),
                             new_markdown_cell("# 77 failing"), new_code_cell("x = 1"),
                             new_code_cell("raise ValueError('boom in the third cell')")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = book_dir / "77_fail.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    monkeypatch.setitem(book.CHAPTERS, "77", ("77_fail.ipynb", ()))
    kernel = book.kernel_for_this_python(tmp_path / "k")
    with pytest.raises(PBIPError) as err:
        book.execute_chapter("77", book_dir, {"profile": "smoke"}, kernel, tmp_path / "failed", cell_timeout=120)
    msg = str(err.value)
    assert "chapter 77" in msg and "ValueError" in msg and "boom in the third cell" in msg
    assert "cell 4" in msg  # 0-based index after papermill inserted the injected-parameters cell
    assert path.read_bytes() == before, "a failing chapter leaves the notebook as it was"
    assert (tmp_path / "failed" / "77_fail.ipynb").is_file()
    assert not list(book_dir.glob(".*.running.ipynb"))


def test_book_copy_is_not_the_repository():
    assert book_copy() != ROOT and (book_copy() / "_config.yml").is_file()
