"""The book's helper modules that word and present results: findings (sentences and small tables from the result
tables), publish (published runs and their restore), diagram (Figure 2 as linked SVG) and the book plan's grids with
a dataset of their own (EBHI-Seg).

Expected statistics are computed here from the raw numbers with scipy and numpy, not by the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset
from scipy import stats

from pbip_core.book import diagram as D
from pbip_core.book import findings as F
from pbip_core.book import plan as BP
from pbip_core.book import publish as P
from pbip_core.book.chapter import chapter_setup
from pbip_core.errors import PBIPError
from pbip_core.experiments.identity import METHOD_VERSION
from pbip_core.experiments.report import paper_csv_path

ROOT = Path(__file__).resolve().parents[1]
M = "stage1.test.miou"


# ---------------------------------------------------------------------------------------------------- helpers
def runs(groups: dict[str, list[float]], by: str = "method", metric: str = M, seeds: list[int] | None = None,
         **cols: dict[str, list[float]]) -> pd.DataFrame:
    """A runner-like table: one row per (group, seed); ``groups`` give the metric in percent (stored as fractions)."""
    rows = []
    for g, vals in groups.items():
        for i, v in enumerate(vals):
            row = {"method": "pbip", "variant": "default", "seed": (seeds or list(range(len(vals))))[i],
                   metric: v / 100}
            row[by] = g
            for c, per_group in cols.items():
                row[c] = per_group[g][i]
            rows.append(row)
    return pd.DataFrame(rows)


def number(pattern: str, text: str) -> tuple[float, float]:
    """The number after ``pattern`` in ``text`` and half a unit of its last printed digit (the rounding slack)."""
    m = re.search(pattern + r"\s*([+-]?\d+(?:\.(\d+))?)", text)
    assert m, f"{pattern!r} not in {text!r}"
    return float(m.group(1)), 0.5 * 10 ** -len(m.group(2) or "") + 1e-9


def close(pattern: str, text: str, expected: float) -> None:
    v, slack = number(pattern, text)
    assert abs(v - expected) <= slack, f"{pattern} {v} in {text!r}, expected {expected}"


def paper_cell(table: str, dataset: str, row: str, metric: str = "miou") -> float:
    """The paper's number read straight from the typed-in CSV (not through report.paper_table)."""
    with open(paper_csv_path(), newline="") as f:
        for r in csv.DictReader(f):
            if (r["table"], r["dataset"], r["row"], r["metric"]) == (table, dataset, row, metric):
                return float(r["mean"]) if r["mean"] else math.nan
    return math.nan


A = [60.0, 62.5, 57.0, 61.0]       # percent, seeds 0..3
B = [55.5, 60.0, 54.0, 58.0]


# ---------------------------------------------------------------------------------------------------- contrast
def test_contrast_means_tests_and_ci_match_scipy():
    df = runs({"pbip": A, "cam": B})
    c = F.contrast(df, "pbip", "cam", M)
    a, b = np.array(A), np.array(B)
    assert (c.mean_a, c.mean_b) == pytest.approx((a.mean(), b.mean()))
    assert c.diff == pytest.approx(a.mean() - b.mean())
    assert (c.n_a, c.n_b, c.pairs, c.wins) == (4, 4, 4, int((a > b).sum()))
    welch = stats.ttest_ind(a, b, equal_var=False)
    paired = stats.ttest_rel(a, b)
    assert c.p_welch == pytest.approx(welch.pvalue, rel=1e-9)
    assert c.p_paired == pytest.approx(paired.pvalue, rel=1e-9)
    assert c.p == c.p_paired                                   # the wording uses the paired test when seeds pair
    ci = paired.confidence_interval(0.95)
    assert c.ci == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert c.significant == (paired.pvalue < 0.05)


def test_contrast_pairs_only_shared_seeds_and_reads_other_columns():
    """Seeds run by one group only enter the means and Welch's test but not the pairs; ``by`` may be any column."""
    df = runs({"k4": [60, 61, 63], "k2": [58, 57, 59, 40]}, by="variant", seeds=None)
    c = F.contrast(df, "k4", "k2", M, by="variant")
    assert c.pairs == 3 and c.n_b == 4
    assert c.mean_b == pytest.approx(np.mean([58, 57, 59, 40]))
    assert c.p_paired == pytest.approx(stats.ttest_rel([60, 61, 63], [58, 57, 59]).pvalue)
    assert c.p_welch == pytest.approx(stats.ttest_ind([60, 61, 63], [58, 57, 59, 40], equal_var=False).pvalue)


def test_sentence_states_means_difference_ci_and_p_values():
    df = runs({"pbip": A, "cam": B})
    text = F.sentence(F.contrast(df, "pbip", "cam", M), "PBIP", "CAM")
    a, b = np.array(A), np.array(B)
    close(r"PBIP", text, a.mean())
    close(r"vs CAM", text, b.mean())
    close(r"\(", text, a.mean() - b.mean())
    assert re.search(r"\([+-]\d+\.\d pp;", text), text            # signed difference in pp
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    lo, hi = re.search(r"paired 95 % CI ([+-]\d+\.\d)\.\.([+-]\d+\.\d)", text).groups()
    assert float(lo) == pytest.approx(ci.low, abs=0.05) and float(hi) == pytest.approx(ci.high, abs=0.05)
    close(r"Welch p =", text, stats.ttest_ind(a, b, equal_var=False).pvalue)
    close(r"paired p =", text, stats.ttest_rel(a, b).pvalue)
    assert f"ahead in {int((a > b).sum())} of 4 seeds" in text and text.endswith("4 seeds)")
    assert " % vs " in text and "PBIP " in text


def test_tiny_p_values_read_p_below_not_p_equals():
    df = runs({"pbip": [70.0, 71.0, 72.0, 70.5, 71.5], "cam": [40.0, 41.2, 41.9, 40.4, 41.6]})
    c = F.contrast(df, "pbip", "cam", M)
    assert c.p_paired < 0.001 and c.p_welch < 0.001            # precondition of the data
    text = F.sentence(c) + " " + F.verdict(c)
    assert "Welch p < 0.001" in text and "paired p < 0.001" in text and "p = <" not in text


def test_single_seed_says_no_test_and_does_not_crash():
    df = runs({"pbip": [61.0], "cam": [52.0]})
    c = F.contrast(df, "pbip", "cam", M)
    assert math.isnan(c.p_welch) and math.isnan(c.p_paired) and all(math.isnan(x) for x in c.ci)
    assert not c.significant and c.pairs == 1
    text = F.sentence(c)
    assert text == "pbip 61.0 % vs cam 52.0 % (+9.0 pp; 1 seed)"
    v = F.verdict(c)
    assert "no test possible" in v
    # with the paper's difference: no CI to compare it with, so no claim about "inside our CI"
    vp = F.verdict(c, 4.76)
    assert "no test possible" in vp and "+4.8 pp" in vp and "CI" in vp and "inside our 95 % CI" not in vp
    assert "same direction" in vp
    assert "the opposite direction" in F.verdict(c, -3.0)


def test_missing_group_names_it_and_the_groups_there():
    df = runs({"pbip": A, "cam": B})
    with pytest.raises(ValueError, match=r"'official'.*'method'.*have: cam, pbip"):
        F.contrast(df, "pbip", "official", M)
    with pytest.raises(ValueError, match=r"'nope'"):
        F.claim(df, "nope", "cam")


# ---------------------------------------------------------------------------------------------------- verdicts
def _two(d_pp: list[float], base: float = 60.0) -> pd.DataFrame:
    """Variants SIM+AT and SIM (the paper's Table 5 row names) whose per-seed difference is ``d_pp``."""
    b = [base + 0.7 * i for i in range(len(d_pp))]
    return runs({"SIM+AT": [x + d for x, d in zip(b, d_pp)], "SIM": b}, by="variant")


PAPER5 = (5, "bcss-wsss", "SIM+AT", "SIM")


def _ci(d_pp: list[float]) -> tuple[float, float]:
    r = stats.ttest_1samp(d_pp, 0.0).confidence_interval(0.95)
    return r.low, r.high


def test_paper_diff_and_value_read_the_typed_in_tables():
    expected = paper_cell("table5", "bcss-wsss", "SIM+AT") - paper_cell("table5", "bcss-wsss", "SIM")
    assert F.paper_diff(*PAPER5) == pytest.approx(expected)
    assert F.paper_value(1, "bcss-wsss", "PBIP (Ours)") == pytest.approx(paper_cell("table1", "bcss-wsss",
                                                                                     "PBIP (Ours)"))
    assert F.paper_value(1, "bcss-wsss", "PBIP (Ours)", "dice") == pytest.approx(
        paper_cell("table1", "bcss-wsss", "PBIP (Ours)", "dice"))
    assert math.isnan(F.paper_diff(5, "bcss-wsss", "SIM+AT", "no such row"))
    assert math.isnan(F.paper_value(5, "bcss-wsss", "no such row"))
    assert math.isnan(F.paper_value(1, "bcss-wsss", "TransWS", "biou"))      # '-' in the paper


def test_verdict_agrees_with_the_paper_inside_the_ci():
    d = [4.0, 5.0, 5.0, 4.5]
    paper = F.paper_diff(*PAPER5)
    lo, hi = _ci(d)
    assert paper > 0 and lo <= paper <= hi and stats.ttest_1samp(d, 0).pvalue < 0.05    # the case this tests
    text = F.claim(_two(d), "SIM+AT", "SIM", by="variant", paper=PAPER5)
    assert "significant (p" in text and "not significant" not in text
    assert f"the same direction as the paper: {paper:+.1f} pp" in text and "outside" not in text


def test_verdict_same_direction_but_a_smaller_effect_says_the_size_is_outside():
    d = [1.0, 1.2, 0.9, 1.1]
    paper = F.paper_diff(*PAPER5)
    assert _ci(d)[1] < paper and stats.ttest_1samp(d, 0).pvalue < 0.05
    text = F.claim(_two(d), "SIM+AT", "SIM", by="variant", paper=PAPER5)
    assert "the same direction as the paper" in text and "whose size lies outside our 95 % CI" in text


def test_verdict_contradicting_the_paper_says_opposite_direction():
    d = [-4.0, -5.0, -5.5, -4.5]
    assert stats.ttest_1samp(d, 0).pvalue < 0.05
    text = F.claim(_two(d), "SIM+AT", "SIM", by="variant", paper=PAPER5)
    assert f"the opposite direction to the paper: {F.paper_diff(*PAPER5):+.1f} pp" in text
    assert "same direction" not in text


def test_not_significant_verdicts_set_the_paper_against_the_ci():
    wide, narrow = [3.0, -2.0, 4.0, -1.0], [0.5, -0.5, 0.3, -0.2]
    paper = F.paper_diff(*PAPER5)
    assert _ci(wide)[0] <= paper <= _ci(wide)[1] and not _ci(narrow)[0] <= paper <= _ci(narrow)[1]
    assert stats.ttest_1samp(wide, 0).pvalue >= 0.05 and stats.ttest_1samp(narrow, 0).pvalue >= 0.05
    inside = F.claim(_two(wide), "SIM+AT", "SIM", by="variant", paper=PAPER5)
    outside = F.claim(_two(narrow), "SIM+AT", "SIM", by="variant", paper=PAPER5)
    assert "not significant at 4 seeds" in inside and "within seed noise" in inside
    assert "inside our 95 % CI: we neither confirm nor contradict it" in inside
    assert "outside our 95 % CI: the paper's effect is not reproduced here" in outside
    # without the paper: the core only
    assert F.verdict(F.contrast(_two(wide), "SIM+AT", "SIM", by="variant")).startswith("not significant")


def test_against_sets_each_variant_against_the_reference_and_the_paper():
    base = [60.0, 61.0, 59.0]
    df = runs({"full": base, "sim": [b - 5 + 0.3 * i for i, b in enumerate(base)],
               "odd": [b + 0.2 * (-1) ** i for i, b in enumerate(base)]}, by="variant")
    lines = F.against(df, "full", by="variant", paper=(5, "bcss-wsss"), row_map={"full": "SIM+AT", "sim": "SIM"})
    assert len(lines) == 2 and lines[0].startswith("sim ") and lines[1].startswith("odd ")
    sim_paper = paper_cell("table5", "bcss-wsss", "SIM") - paper_cell("table5", "bcss-wsss", "SIM+AT")
    assert f"the paper: {sim_paper:+.1f} pp" in lines[0] and "the same direction" in lines[0]
    assert "the paper" not in lines[1]                         # no paper row called "odd": no comparison


# ---------------------------------------------------------------------------------------------------- small tables
def test_best_spread_ranking_and_report():
    g = {"a": [60.0, 62.0, 61.0], "b": [65.0, 64.0, 69.0], "c": [50.0, 58.0, 51.0]}
    df = runs(g, by="variant")
    name, val = F.best(df)
    assert name == "b" and val == pytest.approx(np.mean(g["b"]))
    assert F.spread(df) == pytest.approx(np.mean([np.std(v, ddof=1) for v in g.values()]))
    order = sorted(g, key=lambda k: -np.mean(g[k]))
    assert F.ranking(df) == " > ".join(f"{k} ({np.mean(g[k]):.1f})" for k in order)
    md = F.report("What we found", ["one", "two"], closing="So.", notes=["n1"])
    assert md.data == "**What we found**\n\n- one\n- two\n\nSo.\n\n<small>n1</small>  "
    assert F.report("T", ["x"]).data == "**T**\n\n- x"


def test_per_seed_table():
    df = runs({"pbip": [60.0, 62.0, 61.0], "cam": [50.0, 52.0]}, wall_time_s={"pbip": [120, 60, 180],
                                                                              "cam": [30, 90]})
    t = F.per_seed(df)
    assert list(t.columns) == ["seed 0", "seed 1", "seed 2", "mean", "std", "min/run"]
    assert list(t.index) == ["pbip", "cam"] and t.index.name == "method"
    assert t.loc["pbip", "seed 1"] == pytest.approx(62.0) and math.isnan(t.loc["cam", "seed 2"])
    assert t.loc["pbip", "std"] == pytest.approx(np.std([60, 62, 61], ddof=1))
    assert t.loc["cam", "mean"] == pytest.approx(51.0) and t.loc["cam", "std"] == pytest.approx(np.std([50, 52], ddof=1))
    assert t.loc["pbip", "min/run"] == pytest.approx(2.0) and t.loc["cam", "min/run"] == pytest.approx(1.0)
    assert "min/run" not in F.per_seed(df, minutes=None).columns


STAGE_COLS = ("stage1.test.miou", "stage1_predicted.test.miou", "stage2.test.miou")


def _stages() -> pd.DataFrame:
    vals = {"pbip": ([60, 61, 62], [55, 54, 57], [58, 58.5, 60.5]), "cam": ([50, 52, 51], [45, 47, 46], [44, 47, 45])}
    rows = [{"method": m, "seed": s, **{c: v[k][s] / 100 for k, c in enumerate(STAGE_COLS)}}
            for m, v in vals.items() for s in range(3)]
    return pd.DataFrame(rows), vals


def test_stage_table_and_sentences():
    df, vals = _stages()
    t = F.stage_table(df)
    assert list(t.index) == ["pbip", "cam"]
    s1, s1p, s2 = (np.mean(x) for x in vals["pbip"])
    assert t.loc["pbip", "stage 1, ground-truth classes"] == pytest.approx(s1)
    assert t.loc["pbip", "stage 1, predicted classes"] == pytest.approx(s1p)
    assert t.loc["pbip", "stage 2"] == pytest.approx(s2)
    assert t.loc["pbip", "stage 2 - ground-truth classes (pp)"] == pytest.approx(s2 - s1)
    assert t.loc["pbip", "stage 2 - predicted classes (pp)"] == pytest.approx(s2 - s1p)
    # a table without stage 2 has no gains (and no KeyError)
    t1 = F.stage_table(df.drop(columns="stage2.test.miou"))
    assert list(t1.columns) == ["stage 1, ground-truth classes", "stage 1, predicted classes"]
    lines = F.stage_sentences(df)
    assert len(lines) == 2 and lines[0].startswith("pbip: stage 2 ") and lines[1].startswith("cam: stage 2 ")
    p = stats.ttest_rel(vals["pbip"][2], vals["pbip"][1]).pvalue
    close(r"paired p =", lines[0], p)
    assert "stage 1 with predicted classes" in lines[0]
    close(r"\(", lines[0], np.mean(vals["pbip"][2]) - np.mean(vals["pbip"][1]))


def test_curve_shape_peak_and_ends():
    g = {"k1": [55.0, 58.0, 54.5], "k3": [62.0, 63.0, 61.0], "k9": [61.5, 63.1, 61.2]}
    df = runs(g, by="variant", **{"bank.k": {"k1": [1] * 3, "k3": [3] * 3, "k9": [9] * 3}})
    text = F.curve_shape(df, "bank.k", label="k")
    assert text.startswith(f"peak at k = 3 ({np.mean(g['k3']):.1f} %)")
    p1 = stats.ttest_rel(g["k1"], g["k3"]).pvalue
    p9 = stats.ttest_rel(g["k9"], g["k3"]).pvalue
    assert 0.001 < p1 < 0.05 <= p9                                  # precondition of the data
    assert f"k = 1 is {np.mean(g['k1']) - np.mean(g['k3']):+.1f} pp from the peak" in text
    first, last = text.split("; ")[1:]
    close(r"p =", first, p1)
    assert "significant" in first and "within seed noise" in last
    close(r"p =", last, p9)


def test_not_run_groups_rows_by_reason_with_the_paper_value():
    status = pd.DataFrame({"status": ["available", "weights missing", "weights missing", "no code"]},
                          index=["MedCLIP", "CONCH", "UNI", "Other"])
    paper = pd.DataFrame({"row": ["CONCH", "UNI", "Other"], "metric": ["miou", "miou", "miou"],
                          "mean": [66.25, math.nan, 60.0]})
    text = F.not_run(status, paper)
    assert text.splitlines() == ["- *weights missing*: CONCH (paper 66.2), UNI.", "- *no code*: Other (paper 60.0)."]
    assert "MedCLIP" not in F.not_run(status)


def test_gap_sentences_largest_first():
    diff = pd.DataFrame({"Δ (pp)": [1.5, -3.0, 0.2, 0.4], "p (Welch)": [0.004, 0.0001, 0.6, 0.3],
                         "explains part of the gap": ["yes", "against", "no (n.s.)", "no (n.s.)"]},
                        index=["threshold", "loss", "lr", "crop"])
    out = F.gap_sentences(diff)
    assert out[0] == "loss: -3.0 pp (p < 0.001; against the official preset)"
    assert out[1] == "threshold: +1.5 pp (p = 0.004; the direction of the official preset)"
    assert out[2].startswith("2 other switch(es)") and len(out) == 3


def test_per_class_sentence():
    df = pd.DataFrame({"method": ["pbip", "pbip", "cam", "cam"], "seed": [0, 1, 0, 1],
                       "stage1.test.iou.TUM": [0.70, 0.72, 0.60, 0.64],
                       "stage1.test.iou.STR": [0.50, 0.52, 0.55, 0.57]})
    text = F.per_class_sentence(df, "pbip", "cam")
    assert text == f"Per class (test IoU, pbip minus cam): STR {51 - 56:+.1f}, TUM {71 - 62:+.1f} pp."
    assert F.per_class_sentence(df, "pbip", "cam", split="val") == ""


# ---------------------------------------------------------------------------------------------------- headline
def test_headline_one_row_per_set_with_the_paper_beside_ours():
    t1 = runs({"pbip": A, "cam": B, "official": [50.0, 51.0, 49.0, 50.5]})
    eb = runs({"pbip": [48.0], "cam": [41.0]})
    paper = paper_cell("table5", "bcss-wsss", "SIM+AT")
    out = F.headline([("stage 1", t1, M, "toy", paper), ("stage 1 on EBHI", eb, M, "ebhi-seg", math.nan)])
    assert list(out.index) == ["stage 1", "stage 1 on EBHI"] and out.index.name == "result"
    r = out.loc["stage 1"]
    assert r["dataset"] == "toy" and r["seeds"] == 4
    assert r["pbip"] == f"{np.mean(A):.1f} ± {np.std(A, ddof=1):.1f}"
    assert r["cam"] == f"{np.mean(B):.1f} ± {np.std(B, ddof=1):.1f}"
    assert r["pbip - cam (pp)"] == f"{np.mean(A) - np.mean(B):+.1f}"
    close("", r["paired p"], stats.ttest_rel(A, B).pvalue)
    assert r["paper (PBIP)"] == f"{paper:.1f}"
    e = out.loc["stage 1 on EBHI"]
    assert (e["pbip"], e["cam"], e["official"], e["seeds"]) == ("48.0", "41.0", "—", 1)
    assert e["paired p"] == "—" and e["pbip - cam (pp)"] == "+7.0" and e["paper (PBIP)"] == "—"


# ---------------------------------------------------------------------------------------------------- split sizes
def test_split_sizes_of_a_folder_with_img_subfolders(tmp_path):
    root = tmp_path / "ds"
    for rel, n in (("train", 5), ("val/img", 2), ("val/mask", 2), ("test/img", 3), ("test/mask", 3)):
        (root / rel).mkdir(parents=True)
        for i in range(n):
            (root / rel / f"x{i}.png").write_bytes(b"")
    (root / "train" / "labels.txt").write_text("not an image")
    (root / "test" / "img" / "y.JPG").write_bytes(b"")
    assert F.split_sizes(root) == {"train": 5, "val": 2, "test": 4}
    assert F.train_size(root) == 5
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "val" / "a.png").write_bytes(b"")
    assert F.split_sizes(flat) == {"train": 0, "val": 1}


# ---------------------------------------------------------------------------------------------------- publish
def _run(root: Path, h: str, status: str = "ok", seed: int = 0, masks: bool = True, row: bool = True) -> Path:
    run = root / "runs" / h
    (run / "stage1").mkdir(parents=True)
    if row:
        (run / "row.json").write_text(json.dumps({"status": status, "grid": "book-table1", "method": "pbip",
                                                  "variant": "default", "seed": seed, "code": "abc"}))
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    (run / "stage1" / "config.yaml").write_text("x: 1\n")
    (run / "stage1" / "history.json").write_text("[]")
    (run / "stage1" / "best.pt").write_bytes(b"\0" * 64)
    (run / "stage1" / "last.pt").write_bytes(b"\0" * 64)
    if masks:
        for d, names in (("pseudo_test", ["a.png", "b.png"]), ("pseudo_val", ["c.png"])):
            (run / d).mkdir()
            for n in names:
                (run / d / n).write_bytes(n.encode())
    return run


def _results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    _run(res, "aaa", seed=0)
    _run(res, "bbb", seed=1)
    _run(res, "ccc", status="failed", seed=2)
    _run(res, "ddd", row=False)                                   # unfinished: no row.json
    return res


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_publish_copies_small_files_of_ok_runs_and_masks_of_chosen_runs(tmp_path):
    res = _results(tmp_path)
    dest = tmp_path / "published" / "demo"
    (dest / "runs" / "zzz").mkdir(parents=True)
    (dest / "old.txt").write_text("from an earlier publish")
    (dest / "runs" / "zzz" / "row.json").write_text("{}")
    idx = P.publish(res, dest, masks=["aaa", "not-a-run"], command="pbip book --publish --profile demo")
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["aaa", "bbb"]
    assert not (dest / "old.txt").exists(), "dest is replaced wholesale"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo"], "no temporary folder left beside dest"
    files = _files(dest)
    assert not any(f.endswith(".pt") for f in files), "checkpoints are never published"
    assert _files(dest / "runs" / "aaa") == {"row.json", "config.yaml", "stage1/config.yaml", "stage1/history.json",
                                             "pseudo_test/a.png", "pseudo_test/b.png", "pseudo_val/c.png"}
    assert _files(dest / "runs" / "bbb") == {"row.json", "config.yaml", "stage1/config.yaml", "stage1/history.json"}
    assert (dest / "runs" / "aaa" / "pseudo_test" / "b.png").read_bytes() == b"b.png"
    assert (dest / "runs" / "bbb" / "row.json").read_text() == (res / "runs" / "bbb" / "row.json").read_text()
    on_disk = json.loads((dest / P.INDEX).read_text())
    assert on_disk == idx == P.index(dest)
    assert set(idx["runs"]) == {"aaa", "bbb"}
    assert idx["runs"]["bbb"] == {"grid": "book-table1", "method": "pbip", "variant": "default", "seed": 1,
                                  "code": "abc", "files": 4}
    assert idx["runs"]["aaa"]["files"] == 7
    assert idx["command"] == "pbip book --publish --profile demo" and idx["method_version"] == METHOD_VERSION
    assert re.fullmatch(r"[0-9a-f]{16}", idx["code_now"]) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d",
                                                                         idx["published"])


def test_publish_refuses_results_without_finished_runs_and_keeps_dest(tmp_path):
    dest = tmp_path / "pub"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(PBIPError, match="no runs folder"):
        P.publish(tmp_path / "empty", dest)
    res = tmp_path / "res"
    _run(res, "fff", status="failed")
    with pytest.raises(PBIPError, match="no finished"):
        P.publish(res, dest)
    assert (dest / "keep.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["pub", "res"]


def test_restore_copies_only_missing_runs_and_never_overwrites(tmp_path):
    pub = tmp_path / "pub"
    P.publish(_results(tmp_path), pub, masks=["aaa"])
    target = tmp_path / "book" / "experiments"
    mine = target / "runs" / "aaa"
    mine.mkdir(parents=True)
    (mine / "row.json").write_text('{"status": "ok", "mine": true}')
    unfinished = target / "runs" / "bbb"
    unfinished.mkdir()
    (unfinished / "partial.log").write_text("killed")
    assert P.restore(pub, target) == 1
    assert (mine / "row.json").read_text() == '{"status": "ok", "mine": true}', "an existing run is never replaced"
    assert not (mine / "pseudo_test").exists()
    assert _files(unfinished) == _files(pub / "runs" / "bbb"), "an unfinished folder is replaced by the published run"
    assert sorted(p.name for p in (target / "runs").iterdir()) == ["aaa", "bbb"], "no temporary folder left"
    assert P.restore(pub, target) == 0                           # everything there now
    fresh = tmp_path / "fresh"
    assert P.restore(pub, fresh) == 2
    assert _files(fresh / "runs") == _files(pub / "runs")


def test_restore_and_index_without_published_runs(tmp_path):
    (tmp_path / "pub").mkdir()
    assert P.restore(tmp_path / "pub", tmp_path / "res") == 0
    assert P.restore(tmp_path / "nowhere", tmp_path / "res") == 0
    (tmp_path / "pub" / "runs").mkdir()
    (tmp_path / "pub" / "runs" / ".DS_Store").write_text("a stray file, not a run")
    assert P.restore(tmp_path / "pub", tmp_path / "res") == 0
    assert not (tmp_path / "res").exists()
    assert P.index(tmp_path / "pub") == {}
    assert P.published_dir(tmp_path, "demo") == tmp_path / "published" / "demo"


# ---------------------------------------------------------------------------------------------------- diagram
SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def test_pipeline_svg_is_well_formed_and_links_every_block_to_a_chapter():
    root = _parse(D.pipeline_svg())
    assert root.tag == f"{SVG}svg"
    links = root.findall(f"{SVG}a")
    blocks = [a for a in links if a.find(f"{SVG}rect") is not None]
    assert len(blocks) == len(D.FIGURE2) and len(links) == len(D.FIGURE2) + len(D.SIDE)
    notebooks = {p.stem for p in (ROOT / "book").glob("*.ipynb")}
    for a, b in zip(blocks, D.FIGURE2):
        href = a.get("href")
        assert href.endswith(".html"), href
        page = href[: -len(".html")]
        assert page in notebooks, f"{href}: no book/{page}.ipynb"
        assert page.split("_")[0] == b.chapter
        assert f"({b.chapter})" in "".join(a.itertext())
    for a in links:
        assert (ROOT / "book" / a.get("href").replace(".html", ".ipynb")).is_file()
    assert D.pipeline_svg(suffix=".ipynb").count('.ipynb"') == len(links)


def _on_border(x: float, y: float, r: tuple[float, float, float, float], tol: float = 0.51) -> bool:
    rx, ry, w, h = r
    inside = rx - tol <= x <= rx + w + tol and ry - tol <= y <= ry + h + tol
    near = min(abs(x - rx), abs(x - rx - w), abs(y - ry), abs(y - ry - h)) <= tol
    return inside and near


def test_every_arrow_runs_from_the_border_of_its_block_to_the_border_of_the_next():
    root = _parse(D.pipeline_svg())
    rects = [tuple(float(r.get(k)) for k in ("x", "y", "width", "height")) for r in root.iter(f"{SVG}rect")]
    lines = list(root.iter(f"{SVG}line"))
    assert len(lines) == len(D.ARROWS)
    for line, (i, j) in zip(lines, D.ARROWS):
        x1, y1, x2, y2 = (float(line.get(k)) for k in ("x1", "y1", "x2", "y2"))
        assert _on_border(x1, y1, rects[i]), f"arrow {i}->{j} starts at ({x1}, {y1}), not on block {i} {rects[i]}"
        assert _on_border(x2, y2, rects[j]), f"arrow {i}->{j} ends at ({x2}, {y2}), not on block {j} {rects[j]}"
        assert line.get("marker-end") == "url(#pbip-arrow)"
    assert root.find(f".//{SVG}marker[@id='pbip-arrow']") is not None


@pytest.mark.parametrize("kw", [{}, {"box_w": 150, "gap_x": 20}])
def test_svg_width_is_the_grid_and_everything_fits(kw):
    root = _parse(D.pipeline_svg(**kw))
    box_w, gap_x = kw.get("box_w", 210), kw.get("gap_x", 40)
    cols = max(b.col for b in D.FIGURE2) + 1
    width = 10 + cols * box_w + (cols - 1) * gap_x + 10
    if not kw:
        assert width == 730                                    # the page's figure width the intro was laid out for
    x0, y0, w, h = (float(v) for v in root.get("viewBox").split())
    assert (x0, y0, w) == (0, 0, width) and f"max-width:{width}px" in root.get("style")
    for r in root.iter(f"{SVG}rect"):
        assert float(r.get("x")) >= 0 and float(r.get("x")) + float(r.get("width")) <= w
        assert float(r.get("y")) >= 0 and float(r.get("y")) + float(r.get("height")) <= h
    for t in root.iter(f"{SVG}text"):
        assert 0 <= float(t.get("x")) <= w and 0 <= float(t.get("y")) <= h
    assert _parse(D.pipeline_svg(width=900)).get("viewBox").split()[2] == "900"


# ---------------------------------------------------------------------------------------------------- plan
def _book_root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "_config.yml").write_text("title: x\n")
    (root / "_toc.yml").write_text("root: intro\n")
    return root


def test_a_grid_with_its_own_dataset_resolves_to_the_manifest_folder(tmp_path, monkeypatch):
    assert BP.GRID_DATASETS["book-ebhi"] == "ebhi-seg" and "book-ebhi" in BP.BOOK_GRIDS
    monkeypatch.chdir(_book_root(tmp_path))                        # repo_root(): the book root above the cwd
    assert BP.dataset_folder("ebhi-seg") == (tmp_path / "repo" / "data" / "ebhi-seg").resolve()
    ch = chapter_setup("smoke", str(make_dataset(tmp_path, n_train=4, n_val=1, n_test=1)),
                       out_dir=str(tmp_path / "out"))
    assert BP.on_grid_dataset(ch, "book-table1") is ch
    on = BP.on_grid_dataset(ch, "book-ebhi")
    assert on.dataset == (tmp_path / "repo" / "data" / "ebhi-seg").resolve() and on.builtin is None
    assert on.profile == ch.profile and on.out_dir == ch.out_dir and ch.dataset == (tmp_path / "toy").resolve()


def test_book_plan_runs_the_ebhi_grid_on_its_folder_when_present(tmp_path, monkeypatch):
    root = _book_root(tmp_path)
    ebhi = make_dataset(root / "data", n_train=4, n_val=1, n_test=1, name="ebhi-seg")
    monkeypatch.chdir(root)
    ch = chapter_setup("smoke", str(make_dataset(tmp_path, n_train=4, n_val=1, n_test=1)),
                       out_dir=str(tmp_path / "out"))
    bp = BP.book_plan(ch, ["10"])
    assert bp.not_runnable == [] and bp.chapters == {"10": ["book-ebhi"]}
    assert [g.name for g in bp.grids] == ["book-ebhi"]
    assert [Path(d).resolve() for d in bp.grids[0].datasets] == [ebhi.resolve()]
    assert bp.specs and all(Path(s.cfg.data.root).resolve() == ebhi.resolve() for s in bp.specs)


def test_book_plan_lists_ebhi_as_not_runnable_without_its_folder(tmp_path, monkeypatch):
    absent = tmp_path / "no-data" / "ebhi-seg"
    monkeypatch.setattr(BP, "dataset_folder", lambda name: absent)
    ch = chapter_setup("smoke", str(make_dataset(tmp_path, n_train=4, n_val=1, n_test=1)),
                       out_dir=str(tmp_path / "out"))
    bp = BP.book_plan(ch, ["10"])
    assert bp.grids == [] and bp.specs == [] and bp.chapters == {"10": []}
    assert len(bp.not_runnable) == 1
    r = bp.not_runnable[0]
    assert (r["grid"], r["variant"]) == ("book-ebhi", "*")
    assert "`pbip data fetch ebhi-seg`" in r["reason"] and "data/ebhi-seg" in r["reason"]
    # the intro reads book-table1 and book-ebhi: the first is planned, the second listed once
    both = BP.book_plan(ch, ["00", "10"])
    assert [g.name for g in both.grids] == ["book-table1"] and both.chapters == {"00": ["book-table1"], "10": []}
    assert [x["grid"] for x in both.not_runnable] == ["book-ebhi"]
    assert all(Path(s.cfg.data.root).resolve() == ch.dataset for s in both.specs)


@pytest.mark.slow
def test_published_shared_run_is_trained_again_and_reproduces_its_row(tmp_path):
    """A fresh clone restores the shared stage-1 run without weights; the chapters needing them train it again
    (the published row is not lost to a refused overwrite) and, on a CPU, get the published numbers back."""
    from pbip_core.book import results as R
    from pbip_core.book.chapter import ensure_dataset

    first = chapter_setup("smoke", out_dir=str(tmp_path / "first"))
    data = ensure_dataset(first)
    trained = R.stage1_run(first)
    assert (trained / "best.pt").is_file()
    P.publish(R.results_dir(first), tmp_path / "pub")
    assert not list((tmp_path / "pub").rglob("*.pt"))

    clone = chapter_setup("smoke", dataset=str(data), out_dir=str(tmp_path / "clone"))
    assert P.restore(tmp_path / "pub", R.results_dir(clone)) == 1
    again = R.stage1_run(clone)
    assert again.relative_to(R.results_dir(clone)) == trained.relative_to(R.results_dir(first)), "same run hash"
    assert (again / "best.pt").is_file()
    row_a = json.loads((trained.parent / "row.json").read_text())
    row_b = json.loads((again.parent / "row.json").read_text())
    assert row_b["status"] == "ok"
    scores = [k for k in row_a if k.endswith(".miou")]
    assert scores and all(row_a[k] == row_b[k] for k in scores), "the same seed and profile give the same numbers"
