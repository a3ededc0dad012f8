"""Pseudo masks from a stage-1 run (sec. 3.1): CAMs -> fused map -> restricted argmax -> PNG.

For each image:

1. the ClassNet's per-level maps M_i are upsampled to the image and fused, M' = sum_i w_i Up(M_i) (eq. 3; w_i = 1
   unless ``pseudo.level_weights`` says otherwise; official: 0.3 CAM2 + 0.3 CAM3 + 0.4 CAM4);
2. the argmax runs over the image's classes only: on ``train`` the file-name labels; on val/test by default the
   classes present in the ground-truth mask (``labels="gt"``, as the official code and TPRO do, so numbers compare
   with the paper's pseudo-mask tables), or the classifier's own prediction (``labels="predicted"``: sigmoid of the
   level-averaged image logits > ``pseudo.predict_threshold``, at least the top class), the honest deployment setting;
3. background rule: a pixel whose 3x3-median of min(R, G, B) is above ``pseudo.white_threshold`` * 255 is white glass
   and becomes ``background_index`` (``pseudo.white_background=false`` turns it off, as in the official code, which
   never predicts background).

Masks are written as P-mode PNGs with the dataset palette, with the same file names as the images (atomically).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import DataError
from .model import ClassNet, aggregate


# ---------------------------------------------------------------------- pure functions
@torch.no_grad()
def fused_cam(classnet: ClassNet, x: torch.Tensor, level_weights: Sequence[float] | None = None,
              size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused class maps (eq. 3) and image logits.  x (B, 3, H, W) -> cam (B, N, H', W'), logits (B, N).

    ``size`` = output size (default: the input's).
    """
    out = classnet(x)
    cam = aggregate(out.maps, size or tuple(x.shape[-2:]), level_weights)
    return cam, out.logits.mean(dim=0)


def white_mask(image: np.ndarray, threshold: float = 0.85) -> np.ndarray:
    """White glass: 3x3 median of min(R, G, B) above threshold*255.  image (H, W, 3) uint8 -> (H, W) bool."""
    m = ndimage.median_filter(image.min(axis=2), size=3)
    return m > threshold * 255


def restricted_argmax(cam: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Argmax over the present classes only.  cam (B, N, H, W), present (B, N) bool -> (B, H, W) long.

    An image with no present class falls back to all classes.
    """
    present = present.clone()
    present[present.sum(dim=1) == 0] = True
    masked = cam.masked_fill(~present[:, :, None, None], float("-inf"))
    return masked.argmax(dim=1)


def predicted_present(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Classes the classifier believes present: sigmoid > threshold, and always the top class.  (B, N) -> (B, N) bool."""
    present = torch.sigmoid(logits) > threshold
    present[torch.arange(logits.shape[0]), logits.argmax(dim=1)] = True
    return present


def gt_present(mask: np.ndarray | torch.Tensor, n_classes: int) -> torch.Tensor:
    """Classes present in a GT mask (background ignored).  (H, W) -> (N,) bool."""
    m = torch.as_tensor(np.asarray(mask))
    return torch.bincount(m.flatten().long().clamp(max=n_classes), minlength=n_classes + 1)[:n_classes] > 0


# ---------------------------------------------------------------------- datasets -> masks
def iter_pseudo_masks(
    classnet: ClassNet,
    data_root: str | Path,
    split: str,
    cfg: Any,
    labels: str = "gt",
    device: str = "cpu",
    batch_size: int = 16,
    max_items: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield ``(name, pseudo mask (H, W) uint8, gt mask or None)`` for every image of a split, at original size."""
    from tqdm.auto import tqdm

    from .data import SegDataset, TrainDataset, load_info
    from .io import read_rgb

    info = load_info(data_root)
    size = cfg.data.image_size
    if split == "train":
        ds = TrainDataset(data_root, image_size=size, augment=False, max_items=max_items, info=info)
    else:
        ds = SegDataset(data_root, split, image_size=size, info=info, max_items=max_items)
    classnet.eval()
    bar = tqdm(total=len(ds), desc=f"pseudo masks ({split})", disable=not progress, unit="img")
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        cam, logits = fused_cam(classnet, x, cfg.pseudo.level_weights or None)
        if split == "train":
            present = torch.stack([it["label"] > 0.5 for it in items]).to(device)
        elif labels == "gt":
            present = torch.stack([gt_present(it["mask"], info.n_classes) for it in items]).to(device)
        else:
            present = predicted_present(logits, cfg.pseudo.predict_threshold)
        for j, it in enumerate(items):
            path = ds.items[it["index"]][0] if split == "train" else ds.pairs[it["index"]][0]
            rgb = read_rgb(path)
            h, w = rgb.shape[:2]
            c = F.interpolate(cam[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
            pred = restricted_argmax(c, present[j:j + 1])[0].cpu().numpy().astype(np.uint8)
            if cfg.pseudo.white_background:
                pred[white_mask(rgb, cfg.pseudo.white_threshold)] = info.background_index
            gt = it.get("mask")
            yield it["name"], pred, (gt.numpy() if isinstance(gt, torch.Tensor) else gt)
        bar.update(len(items))
    bar.close()


def evaluate_pseudo(classnet: ClassNet, data_root, split: str, cfg: Any, labels: str = "gt", device: str = "cpu",
                    max_items: int = 0, progress: bool = False) -> dict:
    """Score pseudo masks of a val/test split in memory (no files): the evaluate keys of DESIGN.md."""
    from .data import load_info
    from .metrics import SegMetrics

    info = load_info(data_root)
    met = SegMetrics(info.n_classes, info.background_index, info.classes)
    for _, pred, gt in iter_pseudo_masks(classnet, data_root, split, cfg, labels, device, max_items=max_items,
                                         progress=progress):
        met.update(pred, gt)
    return met.compute()


def write_pseudo_masks(run_dir: str | Path, data_root: str | Path, split: str, out_dir: str | Path,
                       labels: str = "gt", device: str = "auto", checkpoint: str = "best.pt",
                       progress: bool = True) -> Path:
    """Write pseudo masks of ``split`` from a stage-1 run's checkpoint into ``out_dir`` (PNG, dataset palette)."""
    from .bank import resolve_device
    from .data import load_info
    from .io import save_png
    from .train import load_classnet

    device = resolve_device(device)
    classnet, cfg = load_classnet(run_dir, checkpoint, device)
    info = load_info(data_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, pred, _ in iter_pseudo_masks(classnet, data_root, split, cfg, labels, device, progress=progress):
        save_png(pred, out / name, list(info.palette))
        n += 1
    if n == 0:
        raise DataError(f"{data_root}/{split}: no images to write pseudo masks for")
    return out


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="stage-1 run folder (from `pbip train`)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="output folder for the PNG masks")
    p.add_argument("--labels", default="gt", choices=["gt", "predicted"],
                   help="val/test: restrict to GT classes (paper's protocol) or the classifier's predicted classes")
    p.add_argument("--checkpoint", default="best.pt")
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> int:
    out = write_pseudo_masks(args.run, args.data, args.split, args.out, args.labels, args.device, args.checkpoint)
    print(f"pseudo masks ({args.split}, labels={args.labels}) -> {out}")
    return 0
