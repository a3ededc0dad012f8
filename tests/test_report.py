"""Statistics, the typed-in paper numbers and the comparison renderer (pbip_core.experiments.report)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from pbip_core.experiments import report

PAPER_CELLS = Path(__file__).parent / "fixtures" / "paper_mean_std_cells.txt"


# ------------------------------------------------------------------------------------------ statistics
def test_summarize_mean_std_by_hand():
    df = pd.DataFrame({
        "method": ["a", "a", "a", "b", "b"],
        "seed": [0, 1, 2, 0, 1],
        "m": [0.60, 0.62, 0.64, 0.5, 0.7],
    })
    s = report.summarize(df, by="method", metrics=["m"]).set_index("method")
    # a: mean 0.62, deviations +-0.02 -> var = (0.0004 + 0 + 0.0004) / (3 - 1) = 0.0004 -> std 0.02
    assert s.loc["a", "m.mean"] == pytest.approx(0.62)
    assert s.loc["a", "m.std"] == pytest.approx(0.02)
    # b: mean 0.6, var = (0.01 + 0.01) / 1 -> std sqrt(0.02)
    assert s.loc["b", "m.std"] == pytest.approx(math.sqrt(0.02))
    assert s.loc["a", "n"] == 3 and s.loc["b", "n"] == 2


def test_summarize_single_run_has_nan_std_and_skips_nan_values():
    df = pd.DataFrame({"method": ["a", "b", "b"], "m": [0.5, 0.4, float("nan")]})
    s = report.summarize(df, by=["method"], metrics="m").set_index("method")
    assert math.isnan(s.loc["a", "m.std"])
    assert s.loc["b", "m.n"] == 1 and s.loc["b", "n"] == 2


def _student_t_two_sided_p(t: float, dof: float, steps: int = 20000) -> float:
    """p = 1 - 2 * integral_0^|t| pdf(x; dof) dx, Simpson's rule on the Student-t density (independent of scipy)."""
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    pdf = lambda x: c * (1 + x * x / dof) ** (-(dof + 1) / 2)  # noqa: E731
    a, b = 0.0, abs(t)
    h = (b - a) / steps
    s = pdf(a) + pdf(b) + sum((4 if i % 2 else 2) * pdf(a + i * h) for i in range(1, steps))
    return 1 - 2 * (s * h / 3)


def test_compare_welch_matches_hand_computation():
    df = pd.DataFrame({"method": ["x"] * 5 + ["y"] * 5, "seed": list(range(5)) * 2,
                       "m": [1, 2, 3, 4, 5, 3, 5, 7, 9, 11]})
    r = report.compare(df, "x", "y", "m")
    # x: mean 3, var 2.5; y: mean 7, var 10; se^2 = 2.5/5 + 10/5 = 2.5
    assert r["t"] == pytest.approx(-4 / math.sqrt(2.5))
    # Welch-Satterthwaite: 2.5^2 / ((0.5^2)/4 + (2^2)/4) = 6.25 / 1.0625
    assert r["dof"] == pytest.approx(6.25 / 1.0625)
    assert r["p"] == pytest.approx(_student_t_two_sided_p(-4 / math.sqrt(2.5), 6.25 / 1.0625), abs=1e-6)
    assert r["mean_a"] == 3 and r["mean_b"] == 7 and r["test"].startswith("Welch")


def test_compare_small_samples_by_hand():
    """(Moved from the metrics module's own t-test, now the one t-test of the library.)"""
    df = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 4, "seed": [0, 1, 2, 0, 1, 2, 3],
                       "m": [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 8.0]})
    r = report.compare(df, "a", "b", "m")
    # Welch: means 2 and 5, variances 1 and 20/3; se^2 = 1/3 + 5/3 = 2 -> t = -3/sqrt(2).
    assert r["t"] == pytest.approx(-3 / math.sqrt(2))
    # Welch-Satterthwaite df = 2^2 / ((1/3)^2/2 + (5/3)^2/3) = 4 / (1/18 + 25/27) = 216/53.
    assert r["dof"] == pytest.approx(216 / 53)
    assert 0 < r["p"] < 1 and "Welch" in r["test"]
    paired = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "m": [1.0, 2.0, 4.0, 2.0, 3.0, 4.0]})
    rp = report.compare(paired, "a", "b", "m", paired=True)
    # differences -1, -1, 0: mean -2/3, sd sqrt((1/9 + 1/9 + 4/9) / 2) = sqrt(1/3), t = (-2/3) / (sqrt(1/3)/sqrt(3)) = -2
    assert rp["t"] == pytest.approx(-2.0) and rp["dof"] == 2 and "paired" in rp["test"]
    with pytest.raises(ValueError, match="at least 2"):
        report.compare(df[df["seed"] != 1].iloc[[0, 2, 3]], "a", "b", "m")


def test_compare_paired_by_seed():
    df = pd.DataFrame({"method": ["x"] * 5 + ["y"] * 5, "seed": [0, 1, 2, 3, 4, 4, 3, 2, 1, 0],
                       "m": [1, 2, 3, 4, 5, 8, 5, 5, 2, 2]})  # y by seed 0..4: 2, 2, 5, 5, 8
    r = report.compare(df, {"method": "x"}, {"method": "y"}, "m", paired=True)
    # differences -1, 0, -2, -1, -3: mean -1.4, var 5.2/4 = 1.3 -> t = -1.4 / sqrt(1.3/5), dof 4
    t = -1.4 / math.sqrt(1.3 / 5)
    assert r["t"] == pytest.approx(t)
    assert r["dof"] == 4
    assert r["p"] == pytest.approx(_student_t_two_sided_p(t, 4), abs=1e-6)


# ------------------------------------------------------------------------------------------ paper numbers
def _cell(table, dataset, row, metric):
    df = report.paper_table(table, dataset)
    r = df[(df["row"] == row) & (df["metric"] == metric)]
    assert len(r) == 1, (table, dataset, row, metric)
    return float(r["mean"].iloc[0]), float(r["std"].iloc[0])


def test_paper_table_spot_checks():
    # numbers read off the paper text by hand
    assert _cell(1, "bcss-wsss", "PBIP (Ours)", "miou") == (69.54, 0.6)
    assert _cell(1, "luad-histoseg", "Proto2Seg", "dice") == (85.97, 1.2)
    assert _cell(1, "bcss", "QA-CLIMS", "dice") == (37.39, 12.2)
    assert _cell(1, "gcss", "SAM2-Path", "biou") == (22.32, 0.4)
    assert _cell("table3", "bcss-wsss", "PLIP / SegFormer", "biou") == (37.21, 0.4)
    assert _cell(4, "gcss", "K=4", "miou") == (53.91, 1.0)
    assert _cell(5, "bcss-wsss", "SIM", "miou") == (63.25, 0.5)
    m, s = _cell(6, "bcss-wsss", "Image / PLIP", "f1_mean")
    assert m == 0.874 and math.isnan(s)
    assert _cell("fig4", "bcss-wsss", "100 clustering", "miou")[0] == 69.60
    assert _cell("fig4", "bcss-wsss", "all images", "miou")[0] == 69.15
    transws = report.paper_table(1, "bcss-wsss")
    assert transws[(transws["row"] == "TransWS") & (transws["metric"] == "fwiou")]["mean"].isna().all()


def test_paper_table1_margins_quoted_in_text():
    # sec. 4.2: "outperforms Proto2Seg by 1.68%, 1.53% and 1.87% in mIoU" on BCSS-WSSS, LUAD-HistoSeg, GCSS
    for ds, margin in (("bcss-wsss", 1.68), ("luad-histoseg", 1.53), ("gcss", 1.87)):
        ours = _cell(1, ds, "PBIP (Ours)", "miou")[0]
        proto = _cell(1, ds, "Proto2Seg", "miou")[0]
        assert ours - proto == pytest.approx(margin, abs=1e-9)


def test_paper_table2_five_rows_and_ambiguity_flagged():
    t2 = report.paper_table(2)
    rows = list(pd.unique(t2["row"]))
    assert len(rows) == 5
    # sec. 4.3: excluding L_FGS -> 50.23, excluding L_BGS -> 55.01, full -> 67.54
    assert _cell(2, "bcss-wsss", "CLS+BGS", "miou")[0] == 50.23
    assert _cell(2, "bcss-wsss", "CLS+FGS", "miou")[0] == 55.01
    assert _cell(2, "bcss-wsss", "CLS+FGS+BGS", "miou")[0] == 67.54
    assert t2[t2["row"] == rows[3]]["note"].str.contains("AMBIGUOUS").all()


def test_paper_table6_means_are_row_averages():
    t6 = report.paper_table(6)
    for row, g in t6.groupby("row"):
        v = g.set_index("metric")["mean"]
        avg = v[["f1_tum", "f1_str", "f1_lym", "f1_nec"]].mean()
        assert v["f1_mean"] == pytest.approx(avg, abs=0.0011), row


def test_paper_table1_shape():
    t1 = report.paper_table(1)
    assert set(t1["dataset"]) == set(report.DATASETS)
    # 9 weakly supervised rows on BCSS-WSSS / LUAD; 3 F&S + 8 W on GCSS / BCSS; 4 metrics each
    assert len(t1) == (9 * 2 + 11 * 2) * 4
    assert t1["note"].str.contains("PBLP").any()


def test_every_mean_std_cell_in_order_of_the_paper_text():
    """The typed-in table equals the cells extracted mechanically from the paper's text (tests/fixtures)."""
    cells = [tuple(line.split()) for line in PAPER_CELLS.read_text().splitlines() if line and not line.startswith("#")]
    raw = pd.read_csv(report.paper_csv_path(), dtype=str, keep_default_na=False)
    ours = [(r.mean, r.std) for r in raw.itertuples() if r.std]
    assert ours == cells


def test_paper_table_errors():
    with pytest.raises(KeyError):
        report.paper_table(7)
    with pytest.raises(KeyError):
        report.paper_table(2, "gcss")


# ------------------------------------------------------------------------------------------ renderer
def _ours():
    return pd.DataFrame({
        "method": ["pbip", "pbip", "pbip", "cam", "cam"],
        "seed": [0, 1, 2, 0, 1],
        "stage2.test.miou": [0.70, 0.71, 0.72, 0.40, 0.42],
        "stage2.test.dice": [0.80, 0.80, 0.80, 0.50, 0.52],
    })


def test_render_comparison_layout_and_delta_sign():
    out = report.render_comparison(
        _ours(), 1, "bcss-wsss", key="method", metrics=["miou", "dice"], columns="stage2.test.",
        row_map={"pbip": "PBIP (Ours)"}, provenance="profile=demo, dataset=synth, encoder=effnet, seeds=[0, 1, 2]",
    )
    p_label = "Paper (Tang et al. 2025, Table 1) mean±std"
    assert ("mIoU (%)", p_label) in out.columns
    assert ("mIoU (%)", "This book mean±std") in out.columns
    assert ("mIoU (%)", "Δ (ours − paper)") in out.columns
    # ours: 71.00 ± 1.00 (values 70, 71, 72); paper 69.54 ± 0.6 -> delta +1.46
    assert out.loc["PBIP (Ours)", ("mIoU (%)", "This book mean±std")] == "71.00±1.00"
    assert out.loc["PBIP (Ours)", ("mIoU (%)", p_label)] == "69.54±0.60"
    assert out.loc["PBIP (Ours)", ("mIoU (%)", "Δ (ours − paper)")] == "+1.46"
    # dice: 80.00 vs 82.03 -> negative delta
    assert out.loc["PBIP (Ours)", ("Dice (%)", "Δ (ours − paper)")] == "-2.03"
    # paper rows without our runs: placeholder; our rows the paper lacks: appended with no paper value
    assert out.loc["MLPS", ("mIoU (%)", "This book mean±std")] == "—"
    assert out.index[-1] == "cam"
    assert out.loc["cam", ("mIoU (%)", p_label)] == "—"
    assert out.loc["PBIP (Ours)", ("", "n (ours)")] == "3"
    cap = out.attrs["caption"]
    assert cap.startswith("Paper (Tang et al. 2025, Table 1, dataset bcss-wsss) vs This book: profile=demo")
    assert "seeds=[0, 1, 2]" in cap
    assert out.attrs["numeric"].loc["PBIP (Ours)", ("mIoU (%)", "delta")] == pytest.approx(71.0 - 69.54)


def test_render_comparison_requires_provenance_and_only_ours():
    with pytest.raises(ValueError, match="provenance"):
        report.render_comparison(_ours(), 1, "bcss-wsss", key="method", provenance=" ")
    out = report.render_comparison(_ours(), 1, "bcss-wsss", key="method", metrics=["miou"], columns="stage2.test.",
                                   row_map={"pbip": "PBIP (Ours)"}, provenance="x", only_ours=True)
    assert list(out.index) == ["PBIP (Ours)", "cam"]


def test_to_markdown_has_caption_header_and_rows():
    out = report.render_comparison(_ours(), 1, "bcss-wsss", key="method", metrics=["miou"], columns="stage2.test.",
                                   row_map={"pbip": "PBIP (Ours)"}, provenance="profile=smoke", only_ours=True)
    md = report.to_markdown(out)
    lines = md.strip().splitlines()
    assert lines[0].startswith("*Paper (Tang et al. 2025, Table 1") and "profile=smoke" in lines[0]
    assert lines[2].startswith("| method | mIoU (%) · Paper")
    assert lines[3].startswith("|---|")
    assert any(line.startswith("| PBIP (Ours) | 69.54±0.60 | 71.00±1.00 | +1.46 | 3 |") for line in lines)
    assert len(lines) == 6  # caption, blank, header, rule, 2 rows


def test_report_command_prints_mean_std_and_ttest(tmp_path, capsys):
    from pbip_core.cli import main as cli

    rows = [{"method": m, "variant": "default", "seed": s, "status": "ok", "stage1.test.miou": v}
            for m, vals in (("pbip", (0.80, 0.82, 0.84)), ("cam", (0.70, 0.71, 0.72))) for s, v in enumerate(vals)]
    rows.append({"method": "cam", "variant": "default", "seed": 9, "status": "failed", "stage1.test.miou": 0.0})
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    assert cli(["report", str(path), "--metrics", "stage1.test.miou", "--compare", "pbip", "cam"]) == 0
    out = capsys.readouterr().out
    # pbip: mean 82.00, sample std 2.00; cam: 71.00 +- 1.00 (the failed run is left out)
    assert "82.00" in out and "2.00" in out and "71.00" in out and "1.00" in out
    assert "Welch t-test" in out and "n=3/3" in out
    assert cli(["report", str(tmp_path / "missing.csv")]) == 2


def test_report_compare_selects_method_and_variant(tmp_path, capsys):
    """`--compare pbip:pooled pbip` tells apart two groups that share the method name."""
    from pbip_core.cli import main as cli

    rows = [{"method": "pbip", "variant": v, "seed": s, "status": "ok", "model.fgbg": v2, "stage1.test.miou": x}
            for v, v2, vals in (("default", "exact", (0.80, 0.82, 0.84)), ("pooled", "pooled", (0.60, 0.61, 0.62)))
            for s, x in enumerate(vals)]
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    assert report.parse_selector("pbip:pooled") == {"method": "pbip", "variant": "pooled"}
    assert report.parse_selector("pbip") == {"method": "pbip"}
    assert report.parse_selector("method=pbip,model.fgbg=exact") == {"method": "pbip", "model.fgbg": "exact"}
    assert cli(["report", str(path), "--metrics", "stage1.test.miou", "--compare", "pbip:default", "pbip:pooled"]) == 0
    out = capsys.readouterr().out
    assert "pbip:default 82.00 vs pbip:pooled 61.00 (n=3/3)" in out
    assert cli(["report", str(path), "--metrics", "stage1.test.miou",
                "--compare", "model.fgbg=exact", "model.fgbg=pooled"]) == 0
    assert "n=3/3" in capsys.readouterr().out
    # an empty group or an unknown column: exit 2 with the groups that do exist
    assert cli(["report", str(path), "--compare", "pbip:nope", "pbip"]) == 2
    err = capsys.readouterr().err
    assert "pbip:nope" in err and "pbip:default" in err and "pbip:pooled" in err
    assert cli(["report", str(path), "--compare", "nocol=1", "pbip"]) == 2
    assert "nocol" in capsys.readouterr().err
