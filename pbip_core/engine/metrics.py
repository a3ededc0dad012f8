"""Segmentation metrics of the paper (sec. 4.1): mIoU, FwIoU, bIoU, Dice (statistics over seeds and t-tests:
:mod:`pbip_core.experiments.report`).

Conventions (tests pin each one):

* **Ignored pixels.** Pixels whose ground truth is ``background_index`` are ignored by every metric.
* **Accumulation.** A confusion matrix over the N tissue classes is accumulated over the whole split (pixels of
  all images together), never averaged per image.

  - ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; ``mIoU`` = mean of IoU_c over classes.
  - ``FwIoU = sum_c freq_c * IoU_c`` with ``freq_c`` the share of class c among the evaluated ground-truth pixels.
  - ``Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``; ``dice`` = mean of Dice_c over classes.
* **Invalid predictions.** A prediction equal to ``background_index`` (or any value outside ``0..N-1``) on an
  evaluated pixel is wrong: a false negative for the ground-truth class and a false positive for no tissue class.
* **bIoU** (Cheng et al., Boundary IoU, CVPR 2021). For each image and class c the binary masks are
  ``G = (gt == c) & ~ignored`` and ``P = (pred == c) & ~ignored``. The boundary band of a binary mask M is
  ``M & ~erode(M)``, where ``erode`` applies d iterations of a 3x3 square structuring element with the image border
  treated as *outside* (so mask pixels on the border are boundary), and ``d = max(1, round(0.02 * diagonal))``
  with ``diagonal = sqrt(H^2 + W^2)`` and Python's ``round`` (as in the Boundary IoU reference code).
  ``|band(G) & band(P)|`` and ``|band(G) | band(P)|`` are summed over the split per class;
  ``bIoU_c`` = their ratio and ``biou`` = mean over classes.
* **Absent classes.** A class absent from both the ground truth and the prediction (on evaluated pixels) in the
  whole split is left out of every mean (its per-class values are ``None``). For bIoU, a class whose band union
  is 0 over the split is left out, which is the same condition (every non-empty mask has a non-empty band).
  FwIoU needs no rule: an absent class has ``freq_c = 0``.

All values are fractions in [0, 1]; the book prints them as percentages like the paper's tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from ..data.folder import list_pairs, load_info, prediction_name, validate_mask
from ..errors import DataError
from ..io import read_mask


# ---------------------------------------------------------------------------------------------- pure pieces
def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion(pred: np.ndarray, gt: np.ndarray, n_classes: int, background_index: int) -> np.ndarray:
    """Confusion counts over the evaluated pixels -> (N, N+1) int64.

    Row = ground-truth class ``0..N-1`` (pixels with ``gt == background_index`` are dropped); column = predicted
    class, with column N collecting predictions outside ``0..N-1`` (background or invalid: FN only).
    """
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = gt != background_index
    if np.any((gt[keep] < 0) | (gt[keep] >= n_classes)):
        bad = np.unique(gt[keep][(gt[keep] < 0) | (gt[keep] >= n_classes)]).tolist()
        raise ValueError(f"ground-truth values {bad} are neither classes 0..{n_classes - 1} nor background "
                         f"{background_index}")
    g, p = gt[keep], pred[keep]
    p = np.where((p >= 0) & (p < n_classes), p, n_classes)
    return np.bincount(g * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1)).reshape(
        n_classes, n_classes + 1)


def boundary_width(height: int, width: int, ratio: float = 0.02) -> int:
    """d = max(1, round(ratio * image diagonal)) (Boundary IoU, Cheng et al. 2021)."""
    return max(1, int(round(ratio * math.sqrt(height * height + width * width))))


def boundary_bands(masks: np.ndarray, d: int) -> np.ndarray:
    """Boundary bands of binary masks (C, H, W) bool -> (C, H, W) bool: ``M & ~erode_d(M)``.

    d iterations of a 3x3 square erosion with the border as outside equal one erosion by a (2d+1)x(2d+1)
    square with zero padding, i.e. a minimum filter with ``cval=0``.
    """
    eroded = ndimage.minimum_filter(masks.astype(np.uint8), size=(1, 2 * d + 1, 2 * d + 1), mode="constant", cval=0)
    return masks & ~eroded.astype(bool)


def label_interior(labels: np.ndarray, d: int) -> np.ndarray:
    """(H, W) int label image -> (H, W) bool: the (2d+1)x(2d+1) window lies inside the image and holds one label.

    For a pixel of class c this is exactly "survives the erosion of the class-c mask" (:func:`boundary_bands`), for
    all classes at once: two separable filters on one image instead of one per class. Labels must be >= 0 for
    the classes; the padding value -1 makes windows that reach past the border non-uniform.
    """
    size = 2 * d + 1
    lo = ndimage.minimum_filter(labels, size=size, mode="constant", cval=-1)
    hi = ndimage.maximum_filter(labels, size=size, mode="constant", cval=-1)
    return lo == hi


def boundary_counts(pred: np.ndarray, gt: np.ndarray, n_classes: int, background_index: int,
                    d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class band intersection and union of one image (H, W) -> two (N,) int64 arrays.

    Binary masks ``G_c = (gt == c) & ~ignored`` and ``P_c = (pred == c) & ~ignored`` are the classes of two label
    images: ``gt`` itself and ``pred`` with ignored or invalid pixels relabelled -1 (never a class).
    """
    h, w = gt.shape
    d = boundary_width(h, w) if d is None else d
    g = gt.astype(np.int32)
    valid = g != background_index
    p = np.where(valid & (pred >= 0) & (pred < n_classes), pred, -1).astype(np.int32)
    gb = valid & ~label_interior(g, d)              # pixel in band(G_c) for its class c = gt
    pb = (p >= 0) & ~label_interior(p, d)           # pixel in band(P_c) for its class c = p
    both = gb & pb & (g == p)                       # in band(G_c) and band(P_c) for the same c
    n_g = np.bincount(g[gb], minlength=n_classes)[:n_classes]
    n_p = np.bincount(p[pb], minlength=n_classes)[:n_classes]
    inter = np.bincount(g[both], minlength=n_classes)[:n_classes]
    return inter.astype(np.int64), (n_g + n_p - inter).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(n) / float(m) if m > 0 else None for n, m in zip(num, den)]


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def scores_from_counts(conf: np.ndarray, band_inter: np.ndarray, band_union: np.ndarray) -> dict[str, Any]:
    """Metrics from accumulated counts (see the module docstring): conf (N, N+1), band counts (N,)."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt_count = conf.sum(1).astype(np.float64)          # TP + FN (FN includes invalid predictions)
    pred_count = conf[:, :n].sum(0).astype(np.float64)  # TP + FP
    fp, fn = pred_count - tp, gt_count - tp
    iou = _ratio(tp, tp + fp + fn)                      # None where absent from both GT and prediction
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    biou = _ratio(band_inter, band_union)
    total = gt_count.sum()
    fwiou = float(sum((gt_count[c] / total) * iou[c] for c in range(n) if iou[c] is not None)) if total else float("nan")
    return {"miou": _mean(iou), "fwiou": fwiou, "biou": _mean(biou), "dice": _mean(dice),
            "iou": iou, "dice_c": dice, "biou_c": biou}


# ---------------------------------------------------------------------------------------------- accumulator
class SegMetrics:
    """Accumulates confusion counts and boundary-band counts over a split; :meth:`compute` gives the metrics."""

    def __init__(self, n_classes: int, background_index: int, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
        self.n_classes = n_classes
        self.background_index = background_index
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
        self.reset()

    def reset(self) -> None:
        n = self.n_classes
        self.conf = np.zeros((n, n + 1), dtype=np.int64)
        self.band_inter = np.zeros(n, dtype=np.int64)
        self.band_union = np.zeros(n, dtype=np.int64)
        self.n_images = 0

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """Add predictions and ground truth, (H, W) or (B, H, W) integer class indices of the same shape."""
        p, g = _as_numpy(pred), _as_numpy(gt)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
        if g.ndim == 2:
            p, g = p[None], g[None]
        if g.ndim != 3:
            raise ValueError(f"expected (H, W) or (B, H, W) masks, got shape {g.shape}")
        p, g = p.astype(np.int64), g.astype(np.int64)
        for pi, gi in zip(p, g):
            self.conf += confusion(pi, gi, self.n_classes, self.background_index)
            inter, union = boundary_counts(pi, gi, self.n_classes, self.background_index)
            self.band_inter += inter
            self.band_union += union
            self.n_images += 1

    def compute(self) -> dict[str, Any]:
        s = scores_from_counts(self.conf, self.band_inter, self.band_union)
        names = self.class_names
        return {
            "miou": s["miou"], "fwiou": s["fwiou"], "biou": s["biou"], "dice": s["dice"],
            "per_class_iou": dict(zip(names, s["iou"])),
            "per_class_dice": dict(zip(names, s["dice_c"])),
            "per_class_biou": dict(zip(names, s["biou_c"])),
            "n_images": self.n_images,
            "n_pixels": int(self.conf.sum()),
            "confusion": self.conf.tolist(),
        }


# ---------------------------------------------------------------------------------------------- folders
def evaluate_dir(pred_dir: str | Path, data_root: str | Path, split: str, progress: bool = False,
                 ignore_extra: bool = False) -> dict[str, Any]:
    """Score prediction PNGs in ``pred_dir`` (same names as ``data_root/<split>/mask``) against the masks.

    Every mask needs its prediction. A file in ``pred_dir`` that is not the prediction of one of the split's masks
    (hidden files aside) is an error unless ``ignore_extra``: it usually means the folder holds another split's
    predictions, or a mix of runs.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    info = load_info(data_root)
    pairs = list_pairs(data_root, split)
    missing = [m for _, m in pairs if not (pred_dir / prediction_name(m)).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{pred_dir / prediction_name(missing[0])}: missing prediction for the {split} mask "
                        f"{missing[0].name}{more}")
    expected = {prediction_name(m) for _, m in pairs}
    extra = sorted(p.name for p in pred_dir.iterdir() if p.name not in expected and not p.name.startswith("."))
    if extra and not ignore_extra:
        raise DataError(f"{pred_dir / extra[0]}: not the prediction of a {split} mask of {data_root} ({len(extra)} "
                        f"such file{'s' if len(extra) > 1 else ''} in {pred_dir}); pass --ignore-extra to score "
                        "the split's predictions anyway")
    metrics = SegMetrics(info.n_classes, info.background_index, info.classes)
    for _, mask_path in tqdm(pairs, desc=f"evaluate {split}", disable=not progress, leave=False):
        gt = read_mask(mask_path)
        validate_mask(gt, mask_path, info)
        pred_path = pred_dir / prediction_name(mask_path)
        pred = read_mask(pred_path)
        if pred.shape != gt.shape:
            raise DataError(f"{pred_path}: prediction size {pred.shape[1]}x{pred.shape[0]} differs from the mask "
                            f"{mask_path} ({gt.shape[1]}x{gt.shape[0]})")
        metrics.update(pred, gt)
    out = metrics.compute()
    out.update({"split": split, "data": str(Path(data_root)), "pred": str(pred_dir), "dataset": info.name,
                "classes": list(info.classes), "background_index": info.background_index})
    return out


def format_table(result: dict[str, Any]) -> str:
    """A readable table of a metrics dict, in percent like the paper."""
    def pct(v: float | None) -> str:
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    names = list(result["per_class_iou"])
    width = max([5] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  IoU(%)  Dice(%)  bIoU(%)"]
    for n in names:
        lines.append(f"{n:<{width}}  {pct(result['per_class_iou'][n])}  {pct(result['per_class_dice'][n])}   "
                     f"{pct(result['per_class_biou'][n])}")
    lines.append(f"mIoU {pct(result['miou'])}  FwIoU {pct(result['fwiou'])}  bIoU {pct(result['biou'])}  "
                 f"Dice {pct(result['dice'])}  ({result['n_images']} images)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- Table 6
def f1_per_class(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class F1 of single-label predictions (Table 6, zero-shot classification) -> (N,) float64."""
    return np.asarray(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=list(range(n_classes)),
                               average=None, zero_division=0), dtype=np.float64)
