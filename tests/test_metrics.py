"""Metrics of sec. 4.1, pinned on cases worked by hand and against a brute-force reference."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction as Fr
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import make_dataset
from pbip_core.cli import main as cli_main
from pbip_core.errors import DataError
from pbip_core.io import read_mask
from pbip_core.io import save_png as _save_png

# A full palette: pbip_core.io.save_png without one writes a low-bit-depth PNG that truncates index values.
_GREY = [(i, i, i) for i in range(256)]


def save_png(array: np.ndarray, path: Path) -> None:
    _save_png(array, path, palette=_GREY)
from pbip_core.engine.metrics import (
    SegMetrics, boundary_bands, boundary_width, evaluate_dir, f1_per_class, label_interior,
)


def A(rows: str) -> np.ndarray:
    """'001 112' -> 2-D int array, one string per row."""
    return np.array([[int(c) for c in r] for r in rows.split()], dtype=np.int64)


def approx(x: float | Fr) -> object:
    return pytest.approx(float(x), abs=1e-12)


# ------------------------------------------------------------------------------------------ confusion metrics
def test_iou_fwiou_dice_by_hand_with_ignored_background_and_invalid_prediction():
    # N = 2 classes, background_index = 2. The last row is background: ignored whatever is predicted there.
    gt = A("0001 0011 0011 2222")
    pred = A("0111 0011 0002 0101")
    # Evaluated: 12 pixels; GT class 0: 7 pixels, class 1: 5 pixels.
    # class 0: TP = (0,0) (1,0) (1,1) (2,0) (2,1) = 5; FN = (0,1) (0,2) -> 1 = 2; FP = (2,2) GT 1 -> 0 = 1.
    # class 1: TP = (0,3) (1,2) (1,3) = 3; FP = (0,1) (0,2) = 2; FN = (2,2) -> 0 and (2,3) -> background = 2.
    # The background prediction at (2,3) is an FN of class 1 and an FP of no class.
    iou0, iou1 = Fr(5, 8), Fr(3, 7)
    dice0, dice1 = Fr(10, 13), Fr(6, 10)
    m = SegMetrics(2, 2, ["A", "B"])
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_iou"] == {"A": approx(iou0), "B": approx(iou1)}
    assert r["per_class_dice"] == {"A": approx(dice0), "B": approx(dice1)}
    assert r["miou"] == approx((iou0 + iou1) / 2)
    assert r["fwiou"] == approx(Fr(7, 12) * iou0 + Fr(5, 12) * iou1)
    assert r["dice"] == approx((dice0 + dice1) / 2)
    assert r["n_images"] == 1 and r["n_pixels"] == 12

    # Predictions on ignored pixels change nothing (IoU/Dice; bIoU also masks them out).
    pred2 = pred.copy()
    pred2[3] = [1, 1, 2, 0]
    m2 = SegMetrics(2, 2, ["A", "B"])
    m2.update(pred2, gt)
    r2 = m2.compute()
    for key in ("miou", "fwiou", "dice", "biou"):
        assert r2[key] == pytest.approx(r[key], abs=1e-12)


def test_class_absent_from_both_is_left_out_but_predicted_only_class_counts_zero():
    # N = 4, background 4. GT uses classes 0 and 1; prediction also uses class 2 (IoU 0); class 3 absent from both.
    gt = A("0011 0011")
    pred = A("0012 0011")
    # class 0: TP 4 -> IoU 1. class 1: TP 3, FN 1 -> 3/4. class 2: FP 1 -> 0. class 3: left out.
    m = SegMetrics(4, 4)
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_iou"] == {"0": 1.0, "1": approx(Fr(3, 4)), "2": 0.0, "3": None}
    assert r["miou"] == approx((1 + Fr(3, 4) + 0) / 3)
    assert r["dice"] == approx((1 + Fr(6, 7) + 0) / 3)
    assert r["per_class_biou"]["3"] is None
    # FwIoU: freq 0 = 4/8, freq 1 = 4/8, class 2 has no GT pixels.
    assert r["fwiou"] == approx(Fr(1, 2) * 1 + Fr(1, 2) * Fr(3, 4))


def test_accumulated_over_the_split_not_averaged_per_image():
    # Image A: all class 0, predicted right. Image B: one class-0 pixel and three class-1 pixels, all predicted 1.
    m = SegMetrics(2, 2)
    m.update(A("00 00"), A("00 00"))
    m.update(A("11 11"), A("01 11"))
    r = m.compute()
    # Split totals: class 0 TP 4, FN 1 -> 4/5; class 1 TP 3, FP 1 -> 3/4. mIoU = 31/40.
    assert r["miou"] == approx(Fr(31, 40))
    # Per-image averaging would give ((1) + (0 + 3/4)/2) / 2 = 0.6875: a different number.
    assert abs(r["miou"] - 0.6875) > 0.05
    assert r["n_images"] == 2


def test_batched_and_torch_inputs_equal_one_by_one():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(3, 9, 11))
    pred = rng.integers(0, 5, size=(3, 9, 11))
    a, b = SegMetrics(3, 3), SegMetrics(3, 3)
    a.update(torch.from_numpy(pred), torch.from_numpy(gt))
    for p, g in zip(pred, gt):
        b.update(p, g)
    ra, rb = a.compute(), b.compute()
    for k in ("miou", "fwiou", "biou", "dice"):
        assert ra[k] == rb[k]
    assert ra["n_images"] == 3
    with pytest.raises(ValueError, match="shape"):
        a.update(pred[0], gt[0, :5])


# ------------------------------------------------------------------------------------------ boundary IoU
def test_boundary_width():
    # d = max(1, round(0.02 * sqrt(H^2 + W^2)))
    assert boundary_width(4, 4) == 1            # 0.113 -> 0 -> at least 1
    assert boundary_width(64, 64) == 2          # 0.02 * 90.51 = 1.81
    assert boundary_width(224, 224) == 6        # 0.02 * 316.78 = 6.34
    assert boundary_width(512, 512) == 14       # 0.02 * 724.08 = 14.48
    assert boundary_width(100, 100) == 3        # 0.02 * 141.42 = 2.83


def test_biou_border_counts_as_outside():
    # 4x4, d = 1. GT: all class 0. Prediction: class 1 at (0,0), class 0 elsewhere.
    gt = np.zeros((4, 4), dtype=np.int64)
    pred = gt.copy()
    pred[0, 0] = 1
    # Border outside: band(G0) = the 12 ring pixels (the full mask erodes to the inner 2x2).
    # P0 = all but (0,0); its erosion keeps (1,2) (2,1) (2,2) ((1,1) touches (0,0)) -> band(P0) = 12 pixels:
    # the ring without (0,0), plus (1,1). Intersection = 11, union = 13 -> bIoU_0 = 11/13.
    # Class 1: G1 empty, band(P1) = {(0,0)} -> 0/1 = 0.
    # (With the border treated as inside, band(G0) would be empty and bIoU_0 = 0.)
    m = SegMetrics(2, 2)
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_biou"] == {"0": approx(Fr(11, 13)), "1": 0.0}
    assert r["biou"] == approx(Fr(11, 13) / 2)


def test_biou_width_two_on_64px_shifted_square():
    # 64x64 -> d = 2. GT: class 0 on rows 10..29 x cols 10..29 (20x20), class 1 elsewhere; prediction: the
    # square shifted right by one column (cols 11..30).
    gt = np.ones((64, 64), dtype=np.int64)
    gt[10:30, 10:30] = 0
    pred = np.ones_like(gt)
    pred[10:30, 11:31] = 0
    # Class 0: each band = 20x20 - 16x16 = 144. The bands meet on rows 10..29 x cols 11..29 (380 pixels) minus
    # the two inner squares (rows 12..27 x cols 12..28: 272) = 108. Union = 288 - 108 = 180 -> 0.6.
    # (d = 1 would give 38 / 114 = 1/3.)
    # Class 1: band = image border ring of width 2 (64^2 - 60^2 = 496) + a 2-pixel ring around the square
    # (24^2 - 20^2 = 176) = 672 for each. Shared: 496 + (rows 8..31 x cols 9..31 = 552, minus the union of the
    # squares rows 10..29 x cols 10..30 = 420) = 628. Union = 1344 - 628 = 716.
    m = SegMetrics(2, 2)
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_biou"]["0"] == approx(Fr(108, 180))
    assert r["per_class_biou"]["1"] == approx(Fr(628, 716))


def test_biou_ignores_background_pixels_in_prediction():
    # Left half class 0, right half background (index 2). Predicting class 0 everywhere is perfect: predictions
    # on ignored pixels are masked out, so both bands are the same.
    gt = A("0022 0022 0022 0022")
    pred = np.zeros_like(gt)
    m = SegMetrics(2, 2)
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_biou"] == {"0": 1.0, "1": None}
    assert r["miou"] == 1.0 and r["biou"] == 1.0 and r["dice"] == 1.0


def test_min_filter_bands_equal_iterated_binary_erosion():
    rng = np.random.default_rng(0)
    for shape, d in (((30, 40), 1), ((50, 37), 2), ((64, 64), 5)):
        masks = ndimage.binary_opening(rng.random((3,) + shape) > 0.4, structure=np.ones((1, 3, 3)))
        masks[0, :5] = True  # touch the border
        want = np.stack([m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), iterations=d, border_value=0)
                         for m in masks])
        assert np.array_equal(boundary_bands(masks, d), want)
        # The label-image shortcut used by SegMetrics gives the same bands for every class at once.
        labels = _blobby(rng, shape, 4, 6).astype(np.int32)
        interior = label_interior(labels, d)
        for c in range(4):
            m = labels == c
            band = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), iterations=d, border_value=0)
            assert np.array_equal(m & ~interior, band)


# ------------------------------------------------------------------------------------------ brute-force reference
def _reference(preds: list[np.ndarray], gts: list[np.ndarray], n: int, bg: int) -> dict[str, float]:
    """The conventions re-implemented with plain loops over pixels (independent of metrics.py)."""
    tp, fp, fn, gtc = [0] * n, [0] * n, [0] * n, [0] * n
    b_inter, b_union = [0] * n, [0] * n
    for pred, gt in zip(preds, gts):
        h, w = len(gt), len(gt[0])
        for i in range(h):
            for j in range(w):
                g, p = int(gt[i][j]), int(pred[i][j])
                if g == bg:
                    continue
                gtc[g] += 1
                if p == g:
                    tp[g] += 1
                else:
                    fn[g] += 1
                    if 0 <= p < n:
                        fp[p] += 1
        d = max(1, round(0.02 * math.hypot(h, w)))

        def band(mask: list[list[bool]]) -> set[tuple[int, int]]:
            cur = [row[:] for row in mask]
            for _ in range(d):  # one 3x3 erosion per iteration; outside the image counts as False
                nxt = [[False] * w for _ in range(h)]
                for i in range(h):
                    for j in range(w):
                        ok = cur[i][j]
                        for di in (-1, 0, 1):
                            for dj in (-1, 0, 1):
                                ii, jj = i + di, j + dj
                                if not (0 <= ii < h and 0 <= jj < w) or not cur[ii][jj]:
                                    ok = False
                        nxt[i][j] = ok
                cur = nxt
            return {(i, j) for i in range(h) for j in range(w) if mask[i][j] and not cur[i][j]}

        for c in range(n):
            gm = [[gt[i][j] == c for j in range(w)] for i in range(h)]
            pm = [[pred[i][j] == c and gt[i][j] != bg for j in range(w)] for i in range(h)]
            bgd, bpd = band(gm), band(pm)
            b_inter[c] += len(bgd & bpd)
            b_union[c] += len(bgd | bpd)
    iou, dice, biou = [], [], []
    for c in range(n):
        if tp[c] + fp[c] + fn[c] > 0:
            iou.append(tp[c] / (tp[c] + fp[c] + fn[c]))
            dice.append(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
        if b_union[c] > 0:
            biou.append(b_inter[c] / b_union[c])
    total = sum(gtc)
    fw = sum(gtc[c] / total * tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(n) if gtc[c] > 0)
    return {"miou": sum(iou) / len(iou), "dice": sum(dice) / len(dice), "biou": sum(biou) / len(biou), "fwiou": fw}


def _blobby(rng: np.random.Generator, shape: tuple[int, int], values: int, block: int) -> np.ndarray:
    nb = (-(-shape[0] // block), -(-shape[1] // block))
    m = np.kron(rng.integers(0, values, size=nb), np.ones((block, block), dtype=np.int64))[: shape[0], : shape[1]]
    noise = rng.random(shape) < 0.05
    m[noise] = rng.integers(0, values, size=int(noise.sum()))
    return m


def test_matches_brute_force_reference_on_random_masks():
    rng = np.random.default_rng(42)
    n, bg = 3, 3
    shapes = [(20, 30), (60, 50), (33, 17), (75, 80)]    # d = 1, 2, 1, 2
    gts = [_blobby(rng, s, n + 1, 7) for s in shapes]                 # classes 0..2 and background 3
    preds = [np.where(rng.random(g.shape) < 0.7, g, _blobby(rng, g.shape, n + 2, 5)) for g in gts]  # 4 = invalid
    m = SegMetrics(n, bg)
    for p, g in zip(preds, gts):
        m.update(p, g)
    got = m.compute()
    want = _reference([p.tolist() for p in preds], [g.tolist() for g in gts], n, bg)
    for k in ("miou", "fwiou", "biou", "dice"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


# ------------------------------------------------------------------------------------------ Table 6
def test_f1_per_class():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 2, FP 1, FN 0 -> 0.8; class 2: 0; class 3: absent -> 0.
    assert f1_per_class(y_true, y_pred, 4) == pytest.approx([0.5, 0.8, 0.0, 0.0])


# ------------------------------------------------------------------------------------------ folders and CLI
def _write_preds(root: Path, split: str, out: Path, fn=lambda m: m) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for mp in sorted((root / split / "mask").glob("*.png")):
        save_png(fn(read_mask(mp)), out / mp.name)
    return out


def test_evaluate_cli_perfect_and_constant_predictions(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=2, n_val=3, n_test=2, size=24)
    perfect = _write_preds(root, "val", tmp_path / "perfect")
    out_json = tmp_path / "res" / "val.json"
    assert cli_main(["evaluate", "--pred", str(perfect), "--data", str(root), "--split", "val",
                     "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert {"miou", "fwiou", "biou", "dice", "per_class_iou", "n_images"} <= set(res)
    assert res["miou"] == res["fwiou"] == res["biou"] == res["dice"] == 1.0
    assert res["n_images"] == 3 and list(res["per_class_iou"]) == ["C0", "C1", "C2", "C3"]
    assert "mIoU 100.00" in capsys.readouterr().out
    assert [p.name for p in out_json.parent.iterdir()] == ["val.json"]  # atomic write leaves no temp file

    # Everything predicted as class 0: IoU_0 = n_0 / n_eval, other classes 0 (FP-free, all FN).
    const = _write_preds(root, "val", tmp_path / "const", lambda m: np.zeros_like(m))
    gts = [read_mask(p) for p in sorted((root / "val" / "mask").glob("*.png"))]
    counts = np.bincount(np.concatenate([g.ravel() for g in gts]), minlength=5)[:4]
    n_eval = counts.sum()
    res = evaluate_dir(const, root, "val")
    assert res["per_class_iou"]["C0"] == pytest.approx(counts[0] / n_eval)
    assert res["miou"] == pytest.approx(counts[0] / n_eval / 4)
    assert res["fwiou"] == pytest.approx((counts[0] / n_eval) ** 2)
    assert res["dice"] == pytest.approx(2 * counts[0] / (counts[0] + n_eval) / 4)


@pytest.mark.parametrize("case", ["missing_dir", "missing_pred", "size", "corrupt", "rgb", "bad_gt"])
def test_evaluate_bad_inputs_name_the_file(tmp_path, capsys, case):
    root = make_dataset(tmp_path, n_train=2, n_val=2, n_test=2, size=16)
    pred = _write_preds(root, "test", tmp_path / "pred")
    target = pred / "test001.png"
    expect = [str(target)]
    if case == "missing_dir":
        pred = tmp_path / "nope"
        expect = [str(pred), "not found"]
    elif case == "missing_pred":
        target.unlink()
        expect += ["missing prediction"]
    elif case == "size":
        save_png(np.zeros((8, 16), np.uint8), target)
        expect += ["16x8", "differs"]
    elif case == "corrupt":
        target.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        expect += ["corrupt"]
    elif case == "rgb":
        Image.new("RGB", (16, 16)).save(target)
        expect += ["single-channel"]
    elif case == "bad_gt":
        gt_path = root / "test" / "mask" / "test001.png"
        save_png(np.full((16, 16), 9, np.uint8), gt_path)
        expect = [str(gt_path), "[9]"]
    rc = cli_main(["evaluate", "--pred", str(pred), "--data", str(root), "--split", "test"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.startswith("pbip ")]  # skip progress-bar output
    assert len(lines) == 1 and lines[0].startswith("pbip evaluate: error: ")
    for text in expect:
        assert text in lines[0]
    with pytest.raises(DataError):
        evaluate_dir(pred, root, "test")


def test_evaluate_pairs_predictions_by_stem_with_tiff_masks(tmp_path):
    """Predictions are `<stem>.png` whatever the image and mask formats (here JPEG images and TIFF masks)."""
    from PIL import Image

    root = make_dataset(tmp_path, n_train=2, n_val=2, n_test=2, size=16)
    pred = _write_preds(root, "val", tmp_path / "pred")
    for p in sorted((root / "val" / "img").glob("*.png")):
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    for p in sorted((root / "val" / "mask").glob("*.png")):
        Image.open(p).save(p.with_suffix(".tif"))
        p.unlink()
    assert evaluate_dir(pred, root, "val")["miou"] == 1.0
    (pred / "val001.png").unlink()
    with pytest.raises(DataError, match="val001.png: missing prediction for the val mask val001.tif"):
        evaluate_dir(pred, root, "val")
