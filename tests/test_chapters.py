"""Grids in one dialect (extends, per-profile blocks), the book's runs and tables (pbip_core.book.results / tables, chapters
05-07 and 09) and their figures (pbip_core.book.figures).

Expected numbers are derived by hand in the tests (means, differences, moving averages, eq. 4-5 on a map), never
copied from the functions' own output.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from scipy import stats  # noqa: E402

import json  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402

import pbip_core.book.tables as T  # noqa: E402
from pbip_core.book import figures as V  # noqa: E402
from pbip_core.book import results as R  # noqa: E402
from pbip_core.config import make_config  # noqa: E402
from pbip_core.errors import ConfigError  # noqa: E402
from pbip_core.experiments import grid as G  # noqa: E402
from pbip_core.experiments.grid import load_grid, plan  # noqa: E402
from pbip_core.experiments.report import paper_table  # noqa: E402
from pbip_core.method.model import ClassNet  # noqa: E402
from pbip_core.nets.backbones import get_backbone  # noqa: E402

ABLATIONS = ["book-table2", "book-table3", "book-table4", "book-table5", "book-fig3", "book-fig4", "book-official",
             "book-readings"]


def _ch(tmp_path: Path, profile: str = "demo", encoder: str | None = None) -> SimpleNamespace:
    ds = tmp_path / "synth"
    ds.mkdir(exist_ok=True)
    (ds / "dataset.yaml").write_text(yaml.safe_dump({
        "name": "synth", "classes": ["TUM", "STR", "LYM", "NEC"], "background_index": 4,
        "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [153, 0, 255], [255, 255, 255]]}))
    return SimpleNamespace(profile=profile, dataset=ds, out_dir=tmp_path / "out", synthetic=True, builtin="synth",
                           encoder=encoder or make_config(profile).bank.encoder)


# ---------------------------------------------------------------------------------------------------- book grids
def test_extends_merges_keys_and_profiles(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "BOOK_GRIDS_DIR", tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "methods": ["pbip"], "stage2": False, "splits": ["test"],
        "profiles": {"demo": {"seeds": [0], "overrides": {"train.epochs": 2}}, "paper": {"seeds": [0, 1]}}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "name": "child", "extends": "base", "variants": {"a": {}, "b": {"bank.k": 1}},
        "profiles": {"demo": {"only": ["b"]}}}))
    d = G.read_grid("child")
    assert d["name"] == "child" and d["methods"] == ["pbip"] and d["splits"] == ["test"]
    assert d["profiles"]["demo"] == {"seeds": [0], "overrides": {"train.epochs": 2}, "only": ["b"]}
    assert d["profiles"]["paper"] == {"seeds": [0, 1]}
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"name": "loop", "extends": "loop"}))
    with pytest.raises(ConfigError, match="cycle"):
        G.read_grid("loop")
    with pytest.raises(ConfigError, match="grid file not found"):
        G.read_grid("nope")


def test_resolve_profile_block():
    data = {"name": "g", "methods": ["pbip"], "variants": {"a": {}, "b": {"bank.k": 1}, "c": {"bank.k": 5}},
            "overrides": {"model.delta": 0.2},
            "profiles": {"demo": {"seeds": [0, 1], "overrides": {"train.epochs": 2}, "only": ["c", "a"]}}}
    g = G.resolve(data, "demo", "/d", encoder="enc")
    assert list(g["variants"]) == ["a", "c"]                     # the grid's order, not the only-list's
    assert g["overrides"] == {"model.delta": 0.2, "train.epochs": 2, "bank.encoder": "enc"}
    assert g["seeds"] == [0, 1] and g["profile"] == "demo" and g["datasets"] == ["/d"]
    assert "profiles" not in g
    assert G.resolve(data, "demo", "/d", seeds=[7])["seeds"] == [7]
    assert G.resolve(data, "smoke", "/d")["seeds"] == [0]   # no block: seed 0, every variant
    assert len(G.resolve(data, "smoke", "/d")["variants"]) == 3
    with pytest.raises(ConfigError, match="unknown variants"):
        G.resolve({**data, "profiles": {"demo": {"only": ["zzz"]}}}, "demo", "/d")
    with pytest.raises(ConfigError, match="unknown keys"):
        G.resolve({**data, "profiles": {"demo": {"sedes": [1]}}}, "demo", "/d")


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_shipped_book_grids_plan_and_share_the_baseline(tmp_path, profile):
    """Every book grid plans for every profile, and each ablation's unchanged variant is the baseline run."""
    ch = _ch(tmp_path, profile)
    base = plan(R.book_grid("book-ablation", ch), quiet=True)
    assert len(base) == len(G.resolve(G.read_grid("book-ablation"), profile, "d")["seeds"])
    base_hashes = {s.hash for s in base}
    for name in ["book-table1", *ABLATIONS]:
        specs = plan(R.book_grid(name, ch), quiet=True)
        assert specs, name
        if name == "book-table1":
            assert {s.method for s in specs} == {"pbip", "cam", "official"} and all(s.stage2 for s in specs)
            continue
        assert not any(s.stage2 for s in specs) and all(s.splits == ["test"] for s in specs), name
        assert base_hashes & {s.hash for s in specs}, f"{name} ({profile}): no run shared with the baseline"
    k = make_config(profile).bank.k
    t4 = {s.variant: s.hash for s in plan(R.book_grid("book-table4", ch), quiet=True)}
    if f"K={k}" in t4:
        assert t4[f"K={k}"] in base_hashes                      # K equal to the profile's is the baseline run


def test_variant_names_of_tables_are_the_papers_rows():
    for name, table in (("book-table2", 2), ("book-table5", 5), ("book-table4", 4)):
        rows = set(paper_table(table, "bcss-wsss")["row"])
        assert set(G.read_grid(name)["variants"]) <= rows, name


def test_write_grid_round_trips_through_load_grid(tmp_path):
    g = R.book_grid("book-official", _ch(tmp_path))
    path = G.write_grid(g, tmp_path / "grids" / "x.yaml")
    again = load_grid(path)
    assert [s.hash for s in plan(again, quiet=True)] == [s.hash for s in plan(g, quiet=True)]


# ---------------------------------------------------------------------------------------------------- tables
def _runs(tmp_path) -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["pbip", "pbip", "cam", "cam"], "variant": ["default"] * 4, "seed": [0, 1, 0, 1],
        "hash": ["a", "b", "c", "d"], "status": ["ok"] * 4,
        "stage1.test.miou": [0.50, 0.60, 0.40, 0.44], "stage2.test.miou": [0.55, 0.65, 0.41, 0.47],
    })


def test_paper_comparison_puts_the_papers_row_beside_ours(tmp_path):
    ch = _ch(tmp_path)
    grid = R.book_grid("book-table1", ch)
    df = _runs(tmp_path)
    df.attrs["grid"] = grid
    t = T.paper_comparison(df, 1, ch, key="method", stage="stage2", metrics=("miou",),
                           row_map={"pbip": "PBIP (Ours)"})
    num = t.attrs["numeric"]
    paper = paper_table(1, "bcss-wsss")
    expect = float(paper[(paper["row"] == "PBIP (Ours)") & (paper["metric"] == "miou")]["mean"].iloc[0])
    assert num.loc["PBIP (Ours)", ("mIoU (%)", "paper mean")] == pytest.approx(expect)
    assert num.loc["PBIP (Ours)", ("mIoU (%)", "ours mean")] == pytest.approx(60.0)           # (55 + 65) / 2
    assert num.loc["cam", ("mIoU (%)", "ours std")] == pytest.approx(100 * math.sqrt(0.0018))  # sd of .41, .47
    cap = t.attrs["caption"]
    assert "profile demo" in cap and "seeds [0, 1, 2, 3, 4]" in cap and "stage-2 predictions on test" in cap
    # book-table1 runs at the profile's full size at demo (no trims of the grid)
    assert "synthetic stand-in for BCSS-WSSS" in cap and "book-grid trims: none" in cap


def test_stage_gain_and_ttests(tmp_path):
    df = _runs(tmp_path)
    g = T.stage_gain(df)
    assert g.loc["pbip", "gain (pp)"] == pytest.approx(5.0) and g.loc["cam", "gain (pp)"] == pytest.approx(2.0)
    t = T.ttests(df, "pbip", ["cam"], "stage1.test.miou")
    ref = stats.ttest_ind([0.5, 0.6], [0.4, 0.44], equal_var=False)
    assert t.loc[0, "p"] == pytest.approx(ref.pvalue) and t.loc[0, "mean a (%)"] == pytest.approx(55.0)
    one = T.ttests(df[df["seed"] == 0], "pbip", ["cam"], "stage1.test.miou")
    assert math.isnan(one.loc[0, "p"]) and "2 seeds" in one.loc[0, "test"]


def test_ours_table_formats_percent():
    df = pd.DataFrame({"variant": ["a", "a", "b"], "stage1.test.miou": [0.5, 0.7, 0.25], "seed": [0, 1, 0]})
    t = T.ours_table(df, metrics=("miou",))
    assert t.loc["a", "miou (%)"] == f"{60:.2f}±{100 * math.sqrt(0.02):.2f}" and t.loc["b", "miou (%)"] == "25.00"


def test_delta_and_differences_tables():
    df = pd.DataFrame({"variant": ["paper (this book)", "temperature 0.07", "temperature 0.07"],
                       "stage1.test.miou": [0.50, 0.40, 0.46], "seed": [0, 0, 1]})
    d = T.delta_table(df, "paper (this book)", metrics=("miou",), seconds={"temperature 0.07": 12.0})
    assert d.loc["temperature 0.07", "Δ miou (pp)"] == pytest.approx(-7.0)        # 43 - 50
    assert d.loc["temperature 0.07", "stage-1 training (s)"] == 12.0
    assert math.isnan(d.loc["paper (this book)", "stage-1 training (s)"])
    diff = T.differences_table(df)
    tau = diff.loc["temperature of eq. 9, 11"]
    assert tau["paper (profile paper)"] == "tau=1" and tau["official code"] == "tau=0.07" and tau["config switch"] == "loss.tau"
    assert tau["Δ (pp)"] == pytest.approx(-7.0) and tau["seeds"] == "0,1"
    assert math.isnan(tau["p (Welch)"]) and tau["explains part of the gap"].startswith("untested")   # 1 baseline run
    thr = diff.loc["mask threshold (eq. 4)"]
    assert thr["paper (profile paper)"] == "delta=0.15; threshold_scope=class" and thr["official code"] == "delta=0.5; threshold_scope=global"
    assert math.isnan(diff.loc["backbone levels", "mIoU (%)"])                     # not in the measured frame
    assert diff.loc["prototype encoder", "measured as"].startswith("not measurable here: ")


def test_differences_table_t_test_and_the_gap():
    """Three seeds per row: a Welch t-test against the paper's settings, and "explains part of the gap" when the switch
    moves mIoU the way the whole official preset does, significantly."""
    rows = {"paper (this book)": [0.50, 0.51, 0.52], "official preset": [0.40, 0.41, 0.42],
            "temperature 0.07": [0.44, 0.45, 0.46], "levels 1-4": [0.60, 0.61, 0.62], "batch InfoNCE": [0.50, 0.52, 0.51],
            "output stride 16": [0.58, 0.59, 0.60]}
    df = pd.DataFrame([{"variant": v, "seed": i, "stage1.test.miou": x} for v, xs in rows.items()
                       for i, x in enumerate(xs)])
    diff = T.differences_table(df)
    assert diff.attrs["gap_pp"] == pytest.approx(-10.0)
    tau = diff.loc["temperature of eq. 9, 11"]
    want_p = stats.ttest_ind([0.50, 0.51, 0.52], [0.44, 0.45, 0.46], equal_var=False).pvalue
    assert tau["p (Welch)"] == pytest.approx(want_p) and tau["explains part of the gap"] == "yes"
    assert tau["std (pp)"] == pytest.approx(1.0)
    assert diff.loc["backbone levels", "explains part of the gap"] == "against"    # +10 pp, the gap is -10 pp
    assert diff.loc["InfoNCE reduction", "explains part of the gap"] == "no (n.s.)"
    # a stage-4-only switch is compared with "levels 1-4": 59 - 61 = -2 pp
    stride = diff.loc["last-stage stride"]
    assert stride["compared with"] == "levels 1-4" and stride["Δ (pp)"] == pytest.approx(-2.0)


def test_every_difference_names_existing_keys_variants_and_sources():
    """Each DIFFERENCES row: its keys are config keys, its variant exists in book-official.yaml and flips (among its
    overrides) only keys of that row, and it runs with three seeds on the demo profile; unmeasured rows say why."""
    from pbip_core.config import get_key

    raw = G.read_grid("book-official")
    variants = raw["variants"]
    cfg = make_config("paper")
    for d in T.DIFFERENCES:
        for k in d["keys"]:
            get_key(cfg, k)                                                    # ConfigError if unknown
        assert d.get("source"), d["difference"]
        if not d["variant"]:
            assert d.get("reason"), d["difference"]
            continue
        assert d["variant"] in variants, d["variant"]
        ref = variants.get(d.get("against", "paper (this book)"))
        changed = {k for k, v in variants[d["variant"]].items() if ref.get(k) != v}
        assert changed and changed <= set(d["keys"]), (d["difference"], changed)
    grid = load_grid("book-official", "demo", "data/x")
    assert grid.seeds == [0] and {d["variant"] for d in T.DIFFERENCES if d["variant"]} <= set(grid.variants)
    # the official preset switches every key a difference row names (and the paper profile does not)
    official = make_config("paper", {"method": "official"})
    for d in T.DIFFERENCES:
        if d["variant"]:
            assert any(get_key(official, k) != get_key(cfg, k) for k in d["keys"]), d["difference"]


def test_ratio_frame_reads_ratios_and_aliases():
    df = pd.DataFrame({
        "variant": ["beta/alpha=0.1", "beta/alpha=0.5", "theta2/theta1=2"],
        "aliases": ["", "pbip/theta2/theta1=0.5", ""],
        "seed": [0, 0, 0], "loss.alpha": [1.0, 1.0, 1.0], "loss.beta": [0.1, 0.5, 0.5],
        "loss.theta1": [1.0, 1.0, 1.0], "loss.theta2": [0.5, 0.5, 2.0], "stage1.test.miou": [0.3, 0.5, 0.4]})
    r = T.ratio_frame(df)
    beta = r[r["series"] == "beta/alpha"]
    theta = r[r["series"] == "theta2/theta1"]
    assert beta["ratio"].tolist() == [0.1, 0.5] and beta["stage1.test.miou"].tolist() == [0.3, 0.5]
    assert theta["ratio"].tolist() == [0.5, 2.0] and theta["stage1.test.miou"].tolist() == [0.5, 0.4]


def test_bank_frame_flags_all_images():
    df = pd.DataFrame({"variant": ["cluster", "random all"], "seed": [0, 0], "bank.selection": ["cluster", "random"],
                       "bank.nk": [20, 1_000_000], "stage1.test.miou": [0.5, 0.4]})
    b = T.bank_frame(df)
    assert b.set_index("variant")["all_images"].to_dict() == {"cluster": False, "random all": True}


def test_weights_status_and_labels():
    st = T.weights_status({"a / b": {"bank.encoder": "clip", "model.backbone": "mit_b1"},
                           "c / d": {"bank.encoder": "x", "model.backbone": "y"}},
                          {"clip": "no local weights", "x": "available"}, {"mit_b1": "available", "y": "available"})
    assert st["c / d"] == "available"
    assert st["a / b"] == "weights not available offline (encoder clip)"
    assert T.label_of("medclip / mit_b1") == "MedCLIP / SegFormer"
    assert T.label_of("pathmnist-densenet121 / densenet121") == "pathmnist-densenet121 / densenet121"
    paper_rows = set(paper_table(3, "bcss-wsss")["row"])
    labels = {T.label_of(v) for v in G.read_grid("book-table3")["variants"]}
    assert {"MedCLIP / SegFormer", "PLIP / ResNet50", "CLIP / ResNet18", "DINOv2 / SegFormer"} <= labels & paper_rows


def test_table3_plan_lists_unavailable_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "available_encoders", lambda: {"imagenet-efficientnet-lite0": "available",
                                                          "pathmnist-densenet121": "available"})
    monkeypatch.setattr(T, "available_backbones", lambda: {"efficientnet_lite0": "available",
                                                           "densenet121": "available"})
    runnable, status = T.table3_plan(_ch(tmp_path, "smoke"))
    assert runnable == ["imagenet-efficientnet-lite0 / efficientnet_lite0"]       # smoke's selection
    assert status.loc["MedCLIP / SegFormer", "status"].startswith("weights not available offline")
    assert "not in the smoke profile" in status.loc["pathmnist-densenet121 / densenet121", "status"]
    assert status.loc["CLIP / TransUNet", "status"].startswith("not implemented")


# ---------------------------------------------------------------------------------------------------- runs on disk
def _fake_run(root: Path, h: str, steps: list[dict], epochs: list[dict]) -> None:
    d = root / "experiments" / "runs" / h / "stage1"
    d.mkdir(parents=True)
    (d / "history.json").write_text(json.dumps({"steps": steps, "epochs": epochs}))


def test_histories_to_frames_and_training_time(tmp_path):
    ch = SimpleNamespace(out_dir=tmp_path)
    st = [{"epoch": 1, "step": i, "total": 1.0 / i, "cls": 0.5, "fgs": 0.1, "bgs": 0.2} for i in (1, 2)]
    _fake_run(tmp_path, "a", st, [{"epoch": 1, "seconds": 3.0, "val_miou": 0.4, "val_confusion": [[1]]},
                                  {"epoch": 2, "seconds": 5.0, "val_miou": 0.5, "val_confusion": [[1]]}])
    _fake_run(tmp_path, "b", st, [{"epoch": 1, "seconds": 7.0, "val_miou": 0.3}])
    df = pd.DataFrame({"method": ["pbip", "cam"], "variant": ["v", "w"], "seed": [0, 0], "hash": ["a", "b"]})
    steps = R.step_frame(df, ch)
    assert len(steps) == 4 and set(steps["method"]) == {"pbip", "cam"} and steps["total"].iloc[1] == 0.5
    ep = R.epoch_frame(df, ch)
    assert "val_confusion" not in ep.columns and ep["val_miou"].tolist() == [0.4, 0.5, 0.3]
    assert R.train_seconds(df, ch).to_dict() == {"v": 8.0, "w": 7.0}
    with pytest.raises(Exception, match="no training history"):
        R.load_history(tmp_path / "missing")


def test_foreground_images_follow_eq_4_and_5(tmp_path):
    cfg = make_config("smoke", {"model.threshold_map": "minmax"})      # eq. 4 on M, checkable from the returned M
    torch.manual_seed(0)
    net = ClassNet(get_backbone(cfg.model.backbone, pretrained=False), torch.randn(4, 2, 16), cfg.model.levels)
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    cfg.save(run / "stage1" / "config.yaml")
    torch.save({"classnet": net.state_dict()}, run / "stage1" / "best.pt")
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    maps, fg = R.foreground_images(run, img, [0, 2])
    assert set(maps) == set(fg) == {0, 2}
    for c in (0, 2):
        m = maps[c]
        assert m.shape == (64, 64) and m.min() >= 0 and m.max() <= 1 and m.max() > 0.99   # min-max scaled
        b = m >= cfg.model.delta * m.max()                                                # eq. 4, per class
        expect = np.clip(img.astype(float) / 255 * (b * m)[..., None], 0, 1) * 255        # eq. 5
        assert np.abs(fg[c].astype(float) - expect).max() <= 1.0
        assert (fg[c][~b] == 0).all()


# ---------------------------------------------------------------------------------------------------- figures
def test_smooth_is_a_trailing_mean():
    y = np.array([1.0, 3.0, 5.0, 7.0])
    assert V.smooth(y, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert V.smooth(y, 1).tolist() == y.tolist() and V.smooth(y, 10).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_figures_draw_one_line_per_group():
    steps = pd.DataFrame([{"method": m, "seed": s, "step": i, "total": 1.0, "cls": 1.0, "fgs": 0.0, "bgs": 0.0}
                          for m in ("pbip", "cam") for s in (0, 1) for i in range(1, 6)])
    fig = V.plot_loss_curves(steps)
    assert len(fig.axes) == 4 and all(len(ax.lines) == 2 for ax in fig.axes)
    ep = pd.DataFrame([{"method": "pbip", "seed": s, "epoch": e, "val_miou": 0.1 * e} for s in (0, 1) for e in (1, 2)])
    fig = V.plot_epoch_curves(ep)
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx([10.0, 20.0])
    pts = pd.DataFrame({"series": ["beta/alpha", "beta/alpha", "theta2/theta1"], "ratio": [0.1, 0.5, 2.0],
                        "seed": [0, 0, 0], "stage1.test.miou": [0.3, 0.5, 0.4]})
    fig = V.plot_ratio_curves(pts)
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx([30.0, 50.0])
    bank = T.bank_frame(pd.DataFrame({"variant": ["c", "r", "all"], "seed": [0] * 3,
                                      "bank.selection": ["cluster", "random", "random"],
                                      "bank.nk": [5, 5, 10 ** 6], "stage1.test.miou": [0.5, 0.4, 0.45]}))
    fig = V.plot_bank_ablation(bank)
    assert len(fig.axes[0].lines) == 3                              # two selections + the "all images" line
    d = pd.DataFrame({"Δ miou (pp)": [1.0, -2.0]}, index=["a", "b"])
    fig = V.plot_deltas(d)
    assert [p.get_width() for p in fig.axes[0].patches] == [1.0, -2.0]
    plt.close("all")


def test_mask_grid_and_foreground_grid_layout():
    img = np.zeros((8, 8, 3), np.uint8)
    m = np.zeros((8, 8), np.uint8)
    pal = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]
    fig = V.mask_comparison_grid([img, img], [m, m], {"pbip": [m, m], "cam": [m, m]}, pal,
                                 ["TUM", "STR", "LYM", "NEC"], 4)
    main = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert [ax.get_title() for ax in main[:4]] == ["image", "ground truth", "pbip", "cam"]
    fig = V.foreground_grid(img, {"TUM": img, "LYM": img}, {"TUM": m.astype(float), "LYM": m.astype(float)})
    assert len(fig.axes) == 6
    plt.close("all")
