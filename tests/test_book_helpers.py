"""Helpers of the chapters (pbip_core.book.chapter / results / tables / figures / widgets) and the bank's pool
(sec. 3.2 steps 1-3, pbip_core.engine.bank): the steps the chapters plot are the bank's own; tables that fit the
page; figures readable at page width (labels >= 9 pt, nothing overlapping, framed image panels); quiet book builds
(the runner's logs in files, no progress bars in the executed notebooks, paths relative to the repository)."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from pathlib import Path

import ipywidgets as w
import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from IPython.display import HTML
from PIL import Image

from pbip_core.book import build as book
from pbip_core.book import figures as V
from pbip_core.book import widgets as W
from pbip_core.book.chapter import chapter_setup, largest_class, present_classes, shown_path, to_uint8
from pbip_core.book.figures import (MIN_FONT_PT, drawn_texts, effective_font_sizes, overlapping_texts, page_scale,
                                    project_2d)
from pbip_core.book.results import book_grid, shared_run_grid
from pbip_core.book.tables import (bank_frame, cosine_matrix, foreground_share, format_value, show, show_table,
                                   similarity_summary, table_html)
from pbip_core.config import make_config
from pbip_core.engine.bank import Pool, bank_from_steps, pool_prototypes
from pbip_core.experiments import grid as G
from pbip_core.experiments import runner as ex
from pbip_core.experiments.grid import plan


def _pool(seed=0, n_per=(9, 7, 2), d=6):
    g = torch.Generator().manual_seed(seed)
    label = np.concatenate([np.full(n, c) for c, n in enumerate(n_per)])
    feats = torch.randn(len(label), d, generator=g) + 3 * torch.eye(d)[label]
    white = np.linspace(0.9, 0, len(label))
    return Pool([Path(f"t{i}.png") for i in range(len(label))], label, feats, white, white <= 0.8,
                ("A", "B", "C"), 0.8, 40, np.array([20, 15, 10]))


def test_pool_steps_and_bank_agree():
    """The bank a chapter saves is made from the very steps it plots (one implementation)."""
    pool = _pool()
    cfg = make_config("smoke", {"bank.k": 3, "bank.nk": 2, "bank.seed": 4}).bank
    with pytest.warns(UserWarning, match="cyclically"):
        steps = pool_prototypes(pool, cfg)
    bank = bank_from_steps(pool, steps, cfg)
    assert torch.equal(bank.features, steps.prototypes) and bank.features.shape == (3, 3, 6)
    for n, (idx, assign) in enumerate(zip(steps.index, steps.assign)):
        assert len(idx) == len(assign) and (pool.label[idx] == n).all() and pool.eligible[idx].all()
        for k, chosen in enumerate(steps.chosen[n][: len(set(assign.tolist()))]):
            assert len(chosen) <= 2                                          # top-N_K
            assert torch.allclose(bank.features[n, k], pool.features[chosen].mean(0), atol=1e-6)
    counts = pool.counts()
    assert counts["single-class"].tolist() == [9, 7, 2]
    assert (counts["single-class"] - counts["dropped as white"] == counts["eligible for the bank"]).all()
    assert counts["dropped as white"].sum() == int((pool.white > 0.8).sum())
    assert bank.info["stats"]["dropped_white"] == counts["dropped as white"].tolist()


def test_cosine_matrix_summary_and_projection():
    protos = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 1.0]]])     # (N=2, K=2, d=2)
    s = cosine_matrix(protos)
    r = 1 / np.sqrt(2)
    assert np.allclose(s, [[1, r, 0, 0], [r, 1, r, r], [0, r, 1, 1], [0, r, 1, 1]], atol=1e-6)
    summ = similarity_summary(protos, ["A", "B"])
    assert summ.loc["A", "within class (other prototypes)"] == pytest.approx(r)
    assert summ.loc["B", "to other classes"] == pytest.approx(r / 2)
    pool = _pool()
    steps = pool_prototypes(pool, make_config("smoke", {"bank.k": 2, "bank.nk": 3}).bank)     # C has 2 images: K=2
    proj = project_2d(pool.features, steps)
    assert proj["xy"].shape[1] == 2 and proj["proto_xy"].shape == (6, 2)


def test_foreground_share_by_hand():
    m = torch.tensor([0.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)
    m[0, 1] = 1 - m[0, 1]
    present = torch.tensor([[True, False]])                   # only class 0 counts
    t = foreground_share(m, present, [0.0, 0.3, 0.6])
    assert t["foreground share (b)"].tolist() == [1.0, 0.5, 0.25]
    assert t["mean FG weight b·M"].tolist() == pytest.approx([1.7 / 4, 1.5 / 4, 1.0 / 4])
    assert t["mean FG weight without AT (M)"].tolist() == pytest.approx([1.7 / 4] * 3)
    fused = 2 * m - 0.5                                       # M' in [-0.5, 1.5]: cut at delta x 1.5
    t = foreground_share(m, present, [0.3], fused=fused)     # M' = [-.5, -.1, .5, 1.5] >= .45: 2 of 4
    assert t["foreground share (b)"].tolist() == [0.5] and t["foreground share if cut on M"].tolist() == [0.5]
    t = foreground_share(m, present, [0.0], fused=fused)     # tau = 0: only M' >= 0 (2 of 4); on M all 4
    assert t["foreground share (b)"].tolist() == [0.5] and t["foreground share if cut on M"].tolist() == [1.0]


def test_masks_helpers():
    gts = [np.array([[0, 0], [4, 2]]), np.array([[4, 4], [4, 4]])]
    assert present_classes(gts, 4).tolist() == [[True, False, True, False], [False] * 4]
    assert largest_class(gts[0], 4) == 0
    img = to_uint8(torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 0.0]]]]))[0]
    assert img.shape == (1, 2, 3) and img[0, 1].tolist() == [255, 128, 0]


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_shared_run_is_the_ablation_baseline(tmp_path, profile):
    """Chapters 02-05 and the ablation grids of chapters 07/09 ask for one and the same stage-1 run (same hash), with
    the chapter's dataset, encoder and first seed, so `make book` trains it once."""
    ch = chapter_setup(profile, dataset=str(tmp_path / "d"), encoder="pathmnist-densenet121", out_dir=str(tmp_path))
    mine, = plan(shared_run_grid(ch), quiet=True)
    assert mine.dataset == str(tmp_path / "d") and mine.seed == ch.seeds[0]
    assert mine.cfg.bank.encoder == "pathmnist-densenet121"
    theirs = [s for s in plan(book_grid("book-ablation", ch, seeds=[ch.seeds[0]]), quiet=True)
              if s.variant == "baseline"]
    assert [s.hash for s in theirs] == [mine.hash]
    if profile == "demo":                                    # the demo trims of the ablations apply to it
        assert mine.cfg.train.epochs == 2 and mine.cfg.data.max_train == 120
    plt.close("all")


# ---------------------------------------------------------------------------------------------------- tables
def _cells(html: str, table: int = 0) -> list[list[str]]:
    """The text of every body cell of the ``table``-th table of ``html`` (tags removed)."""
    body = re.findall(r"<tbody>(.*?)</tbody>", html, re.S)[table]
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_show_table_formats_numbers_missing_values_and_notes():
    long = "weights not available offline (encoder plip; backbone resnet50 from the hub)"
    df = pd.DataFrame({"K": [3.0, 2.0, np.nan], "N_K": [20.0, 5.0, np.nan], "mIoU (%)": [0.712355, 45.25, np.nan],
                       "p": [0.0012, 0.5, np.nan], "status": [long, "ran", None]},
                      index=pd.Index(["a", "b", "empty"], name="variant"))
    html = table_html(df, main=["K", "mIoU (%)", "status"], digits=1, notes={"mIoU (%)": "mean over seeds"},
                      caption="Table x <ours>")
    main = _cells(html, 0)
    assert main == [["a", "3", "0.7", "weights not…2"], ["b", "2", "45.2", "ran"]]   # the all-empty row is gone
    more = _cells(html, 1)                                    # N_K and p in the collapsible table below
    assert more == [["a", "20", "0.0012"], ["b", "5", "0.5"]]
    assert html.index("<details") > html.index("</table>") and "2 more columns: N_K, p" in html
    notes = re.findall(r'<li value="(\d)">(.*?)</li>', html)
    assert notes == [("1", "mean over seeds"), ("2", long)]
    assert "mIoU (%)<sup>1</sup>" in html                     # the column note's number on its header
    assert "<caption>Table x &lt;ours&gt;</caption>" in html  # text is escaped
    assert "max-width: 100%" in html and "overflow-wrap: anywhere" in html
    kept = table_html(df, drop_empty=False)
    assert _cells(kept)[2] == ["empty", "–", "–", "–", "–", "–"] and "<details" not in kept


def test_show_table_digits_two_level_columns_and_show():
    assert [format_value(v, 2) for v in (3.0, np.int64(20), 0.712355, float("nan"), None, "—", True, 1e-5)] == \
        ["3", "20", "0.71", "–", "–", "–", "yes", "1e-05"]
    cols = pd.MultiIndex.from_tuples([("mIoU", "paper"), ("mIoU", "ours"), ("Dice", "paper"), ("Dice", "ours")])
    t = pd.DataFrame([["45.20±1.30", "40.10", "50.00", "48.00"]], columns=cols, index=["pbip"])
    html = table_html(t, main=["mIoU"], notes=["paper: Table 1"])
    assert _cells(html, 0) == [["pbip", "45.20±1.30", "40.10"]] and _cells(html, 1) == [["pbip", "50.00", "48.00"]]
    assert '<th colspan="2">mIoU</th>' in html and '<td class="pbip-num">45.20±1.30</td>' in html
    assert re.findall(r"<li[^>]*>(.*?)</li>", html) == ["paper: Table 1"]
    with pytest.raises(KeyError, match="nope"):
        table_html(t, main=["nope"])
    out = show(pd.DataFrame({"x": [1.234, 2.0]}, index=["r1", "r2"]).rename_axis("row"), caption="cap")
    assert isinstance(out, HTML) and _cells(out.data) == [["r1", "1.23"], ["r2", "2"]] and "cap" in out.data
    assert isinstance(show_table(t), HTML)


# ---------------------------------------------------------------------------------------------------- figures
PAL = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]
CLASSES = ["TUM", "STR", "LYM", "NEC"]


def assert_readable(fig, name: str) -> None:
    """Every drawn text of ``fig`` is at least MIN_FONT_PT at page width, no two texts overlap, and every panel that
    shows an image has a visible frame."""
    small = [(t, round(s, 1)) for t, s in effective_font_sizes(fig) if s < MIN_FONT_PT - 0.01]
    assert not small, f"{name}: labels below {MIN_FONT_PT} pt at page width (scale {page_scale(fig):.2f}): {small[:6]}"
    overlaps = overlapping_texts(fig)
    assert not overlaps, f"{name}: overlapping texts {overlaps[:4]}"
    for ax in fig.axes:
        if ax.images:
            assert ax.axison and all(sp.get_visible() and sp.get_linewidth() > 0 for sp in ax.spines.values()), \
                f"{name}: an image panel ({ax.get_title()!r}) has no frame"


def test_readability_checks_can_fail():
    fig, ax = plt.subplots(figsize=(14.6, 3))                 # twice the page width: 10 pt shows as 5 pt
    ax.set_title("wide")
    assert page_scale(fig) == pytest.approx(0.5, abs=0.01)
    assert min(s for _, s in effective_font_sizes(fig)) == pytest.approx(5.0, abs=0.2)
    with pytest.raises(AssertionError, match="below"):
        assert_readable(fig, "wide")
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.text(0.5, 0.5, "first label", fontsize=10)
    ax.text(0.52, 0.5, "second label", fontsize=10)
    assert overlapping_texts(fig) == [("first label", "second label")]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(np.ones((4, 4)))
    ax.set_axis_off()                                          # a white image without a frame is invisible
    with pytest.raises(AssertionError, match="no frame"):
        assert_readable(fig, "frameless")
    assert [t.get_text() for t in drawn_texts(fig)] == []     # axis switched off: its tick labels are not drawn
    plt.close("all")


def _tiles(tmp_path, n=12):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"t{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _crowded_pool(paths):
    """Four classes whose features (and so prototypes) nearly coincide: per-point labels would pile up."""
    g = torch.Generator().manual_seed(0)
    label = np.repeat(np.arange(4), 12)
    feats = torch.ones(len(label), 8) + 0.01 * torch.randn(len(label), 8, generator=g)
    return Pool([paths[i % len(paths)] for i in range(len(label))], label, feats, np.zeros(len(label)),
                np.ones(len(label), bool), tuple(CLASSES), 0.7, 40, np.array([12] * 4))


def _figures(tmp_path):
    """Every figure function of pbip_core.book.figures / widgets on small synthetic inputs."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:], m[:8] = 1, 4
    paths = _tiles(tmp_path)
    pool = _crowded_pool(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        steps = pool_prototypes(pool, make_config("smoke", {"bank.k": 3, "bank.nk": 4}).bank)
    proj = project_2d(pool.features, steps)
    steps_df = pd.DataFrame([{"method": mm, "seed": s, "step": i, "total": 1.0 + i, "cls": 1.0, "fgs": 0.5,
                              "bgs": 0.3} for mm in ("pbip", "cam") for s in (0, 1) for i in range(1, 6)])
    epochs = pd.DataFrame([{"method": "pbip", "seed": s, "epoch": e, "val_miou": 0.1 * e, "val_biou": 0.05 * e}
                           for s in (0, 1) for e in (1, 2)])
    ratios = pd.DataFrame({"series": ["beta/alpha", "beta/alpha", "theta2/theta1"], "ratio": [0.1, 0.5, 2.0],
                           "seed": [0, 0, 0], "stage1.test.miou": [0.3, 0.5, 0.4]})
    bank = bank_frame(pd.DataFrame({"variant": ["c", "r", "all"], "seed": [0] * 3,
                                    "bank.selection": ["cluster", "random", "random"],
                                    "bank.nk": [5, 5, 10 ** 6], "stage1.test.miou": [0.5, 0.4, 0.45]}))
    rows = ["PBIP (Ours)", "OEEM", "MLPS", "HAMIL", "TPRO", "PistoSeg", "SIPE", "WSSS-Tissue", "a long extra row name"]
    num = pd.DataFrame(rng.random((len(rows), 4)) * 60, index=rows, columns=pd.MultiIndex.from_tuples(
        [("mIoU (%)", w) for w in ("paper mean", "paper std", "ours mean", "ours std")]))
    deltas = pd.DataFrame({"Δ miou (pp)": [1.0, -2.0, 0.5]},
                          index=["threshold 0.5 x global max", "learnable logit scale 1/0.07", "b"])
    cam = W.demo_cam(m, 1)

    def projection_in_notebook_axes():
        fig, ax = plt.subplots(figsize=(7, 5.6), layout="constrained")      # as chapter 02 calls it
        V.feature_projection(proj, CLASSES, PAL, ax=ax, title="features of the eligible patches (PCA)")
        return fig

    return {
        "image_mask_grid": lambda: V.image_mask_grid([img] * 3, [m] * 3, PAL, ["test_0001.png", "b", "c"]),
        "white_examples": lambda: V.white_examples(paths, np.linspace(0.95, 0.1, 12), 0.7, n=8,
                                                   titles=[CLASSES[i % 4] for i in range(12)]),
        "bank_montage": lambda: V.bank_montage([[paths[:5], paths[5:9], paths[9:]] for _ in CLASSES], CLASSES),
        "feature_projection": lambda: V.feature_projection(proj, CLASSES, PAL).figure,
        "feature_projection in a notebook's axes": projection_in_notebook_axes,
        "similarity_heatmap": lambda: V.similarity_heatmap(cosine_matrix(steps.prototypes), CLASSES, 3,
                                                           title="prototype cosine similarity (K=3, N_K=20)").figure,
        "level_maps_figure": lambda: V.level_maps_figure(
            img, m, [rng.random((4, 8, 8)), rng.random((4, 4, 4)), rng.random((4, 2, 2))], rng.random((4, 32, 32)),
            CLASSES, PAL, [True, True, False, False]),
        "fused_maps_grid": lambda: V.fused_maps_grid([img] * 3, [m] * 3, rng.random((3, 4, 32, 32)), [m] * 3,
                                                     CLASSES, PAL, 4),
        "at_comparison": lambda: V.at_comparison([img] * 3, rng.random((3, 32, 32)), rng.random((3, 32, 32)) > 0.5,
                                                 ["test_0001.png\nTUM"] * 3, 0.15),
        "plot_loss_curves": lambda: V.plot_loss_curves(steps_df),
        "plot_epoch_curves": lambda: V.plot_epoch_curves(epochs, ("val_miou", "val_biou")),
        "plot_ratio_curves": lambda: V.plot_ratio_curves(ratios),
        "plot_bank_ablation": lambda: V.plot_bank_ablation(bank),
        "plot_comparison": lambda: V.plot_comparison(num, "mIoU (%)", "Table 1: stage-2 mIoU on test"),
        "mask_comparison_grid": lambda: V.mask_comparison_grid(
            [img] * 2, [m] * 2, {"pbip": [m, m], "cam": [m, m], "no AT": [m, m]}, PAL, CLASSES, 4,
            titles=["test_0001.png", "test_0002.png"]),
        "foreground_grid": lambda: V.foreground_grid(img, {c: img for c in CLASSES},
                                                     {c: rng.random((32, 32)) for c in CLASSES}),
        "plot_deltas": lambda: V.plot_deltas(deltas, "Δ miou (pp)", "change of test mIoU against the paper's"),
        "delta_figure": lambda: W.delta_figure(img, cam, 0.15, "test_0001.png: STR, eq. 4-5", gt=m == 1),
        "delta_figure without gt, delta 0": lambda: W.delta_figure(img, cam, 0.0),
        "bank_figure": lambda: W.bank_figure(pool, 3, 4, PAL),
    }


FIGURE_NAMES = ["image_mask_grid", "white_examples", "bank_montage", "feature_projection",
                "feature_projection in a notebook's axes", "similarity_heatmap", "level_maps_figure",
                "fused_maps_grid", "at_comparison", "plot_loss_curves", "plot_epoch_curves", "plot_ratio_curves",
                "plot_bank_ablation", "plot_comparison", "mask_comparison_grid", "foreground_grid", "plot_deltas",
                "delta_figure", "delta_figure without gt, delta 0", "bank_figure"]


@pytest.mark.parametrize("name", FIGURE_NAMES)
def test_figure_is_readable_at_page_width(name, tmp_path):
    figs = _figures(tmp_path)
    assert set(figs) == set(FIGURE_NAMES)
    fig = figs[name]()
    assert_readable(fig, name)
    plt.close("all")


def test_delta_figure_frames_b_and_draws_the_ground_truth():
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 1
    img = np.full((32, 32, 3), 200, np.uint8)
    cam = W.demo_cam(m, 1)
    fig = W.delta_figure(img, cam, 0.0)                        # delta 0: b is all foreground (an all-white panel)
    a_m, a_b = fig.axes[:2]
    assert a_b.get_title().startswith("$b$: 100 %")
    assert all(sp.get_visible() for sp in a_b.spines.values()) and a_b.axison
    n_plain = [len(ax.collections) for ax in (a_m, a_b)]
    fig = W.delta_figure(img, cam, 0.3, gt=m == 1)
    a_m, a_b = fig.axes[:2]
    gt_sets = [c for ax in (a_m, a_b) for c in ax.collections if "lime" in str(c.get_edgecolor().tolist()) or
               np.allclose(c.get_edgecolor()[0][:3], (0, 1, 0))]
    assert len(gt_sets) == 2, "the ground-truth boundary on M and on b"
    assert [len(ax.collections) for ax in (a_m, a_b)] > n_plain
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["$M = \\tau$", "ground truth of the class"]
    with pytest.raises(ValueError, match="differ in size"):
        W.delta_figure(img, cam, 0.3, gt=np.ones((8, 8), bool))
    plt.close("all")


# ---------------------------------------------------------------------------------------------------- quiet book builds
class PrintingStep:
    """A fake pipeline step that prints, warns and draws a text progress bar, like a real run."""

    def __call__(self, spec, run_dir):
        print(f"training {spec.label} in {run_dir}")
        print("epoch 1/1: 100%|##########| 3/3 [00:00<00:00, 9.0batch/s]", file=sys.stderr)
        return {"stage1.val.miou": 0.5}


def test_quiet_runner_logs_to_files_and_prints_one_line(tmp_path, monkeypatch, capsys):
    grid = G.load_grid({"name": "book-x", "profile": "smoke", "datasets": [str(tmp_path / "ds")],
                        "methods": ["pbip", "cam"], "variants": {"default": {}}, "seeds": [0, 1], "stage2": False,
                        "splits": ["val"]})
    results = tmp_path / "repo" / "results" / "experiments"
    monkeypatch.setenv("PBIP_QUIET", "1")
    monkeypatch.setenv("PBIP_REPO_ROOT", str(tmp_path / "repo"))
    df = ex.run_grid(grid, results, step=PrintingStep())
    assert (df["status"] == "ok").all() and len(df) == 4
    out = capsys.readouterr()
    assert out.err == "" and out.out.splitlines() == [
        "pbip run: book-x: 4 runs, 0 reused, 4 trained (log: results/experiments/logs/book-x.log)"]
    for h in df["hash"]:
        log = (results / "runs" / h / "run.log").read_text()
        assert "training" in log and "batch/s" in log          # the run's own output, in its folder
    grid_log = (results / "logs" / "book-x.log").read_text()
    assert "4 to run" in grid_log and "[4/4]" in grid_log
    ex.run_grid(grid, results, step=PrintingStep())
    assert capsys.readouterr().out.splitlines() == [
        "pbip run: book-x: 4 runs, 4 reused, 0 trained (log: results/experiments/logs/book-x.log)"]
    monkeypatch.delenv("PBIP_QUIET")                           # a terminal or JupyterLab: everything printed
    ex.run_grid(grid, tmp_path / "loud", step=PrintingStep())
    out = capsys.readouterr()
    assert "training" in out.out and "batch/s" in out.err and "(log:" not in out.out


def test_quiet_mode_switch(monkeypatch):
    for value, quiet in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("PBIP_QUIET", value)
        assert ex.quiet_mode() is quiet
    monkeypatch.delenv("PBIP_QUIET")
    assert ex.quiet_mode() is False


def test_progress_widgets_are_dropped_from_an_executed_notebook():
    """tqdm's notebook bars (real widgets) leave the notebook; the chapter's own slider stays, with its layout."""
    from tqdm.notebook import tqdm as notebook_tqdm

    w.Widget.close_all()
    slider = w.SelectionSlider(options=["0.1", "0.15"], value="0.15")
    with contextlib.redirect_stdout(io.StringIO()):           # outside a kernel tqdm prints the widget's repr
        bar = notebook_tqdm(range(3), desc="epoch 1/1")
        for _ in bar:
            pass
    state = w.Widget.get_manager_state(drop_defaults=False)["state"]
    names = {k: v["model_name"] for k, v in state.items()}
    assert "FloatProgressModel" in names.values() and "HBoxModel" in names.values()
    view = lambda mid: {"output_type": "display_data", "metadata": {},  # noqa: E731
                        "data": {book.WIDGET_VIEW: {"model_id": mid, "version_major": 2, "version_minor": 0},
                                 "text/plain": "..."}}
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {book.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="done\n"), view(bar.container.model_id),
                    view(slider.model_id)]
    nb.cells = [cell]
    assert book.drop_progress_widgets(nb) == 1
    left = nb.metadata["widgets"][book.WIDGET_STATE]["state"]
    assert {v["model_name"] for v in left.values()} >= {"SelectionSliderModel", "LayoutModel"}
    assert not {"FloatProgressModel", "HBoxModel"} & {v["model_name"] for v in left.values()}
    assert slider.layout.model_id in left and slider.model_id in left
    assert [o.get("data", {}).get(book.WIDGET_VIEW, {}).get("model_id") for o in cell.outputs] == \
        [None, slider.model_id]
    assert book.drop_progress_widgets(nb) == 0
    w.Widget.close_all()


def test_summary_paths_are_relative_to_the_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "book").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        (repo / name).write_text("")
    monkeypatch.chdir(repo / "book")
    ch = chapter_setup("smoke", out_dir=str(repo / "results" / "book" / "smoke"))
    line = ch.summary()
    assert "out_dir=results/book/smoke" in line and "dataset=results/book/smoke/kather-mosaic" in line
    assert str(tmp_path) not in line
    beside = chapter_setup("smoke", out_dir=str(tmp_path / "elsewhere"))
    assert "out_dir=../elsewhere" in beside.summary() and str(tmp_path) not in beside.summary()
    assert shown_path(repo / "data" / "x", repo) == "data/x"
