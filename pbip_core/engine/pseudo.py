"""Pseudo masks of a dataset split from a stage-1 model (sec. 3.1): iterate, score in memory, or write PNGs.

The per-image steps are :mod:`pbip_core.method.pseudo` (fused CAM, restricted argmax, background rule). Which classes
the argmax may choose: on ``train`` the file-name labels; on val/test ``pseudo.labels`` decides: ``gt`` = the classes
present in the ground-truth mask (the official code and TPRO do this, so pseudo-mask numbers compare with the paper's
tables; the paper itself does not say) or ``predicted`` = the classifier's own prediction (the deployment setting).
Every function here defaults to the run configuration's ``pseudo.labels``; the official options ``pseudo.merge``,
``pseudo.cam_norm`` and (val/test only) ``pseudo.tta`` are read from the same configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import load_config
from ..data import SegDataset, TrainDataset, load_info
from ..data.check import preflight_dataset
from ..data.folder import prediction_name
from ..errors import DataError
from ..io import check_output_dir, read_rgb, save_png
from ..method.model import ClassNet
from ..method.pseudo import fused_cam, gt_present, predicted_present, pseudo_mask
from .checkpoint import load_classnet
from .metrics import SegMetrics
from .runtime import device_for


def iter_pseudo_masks(
    classnet: ClassNet,
    data_root: str | Path,
    split: str,
    cfg: Any,
    labels: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    max_items: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield ``(name, pseudo mask (H, W) uint8, gt mask or None)`` for every image of a split, at original size.

    ``labels`` (val/test): ``gt`` or ``predicted``; None = ``cfg.pseudo.labels``."""
    labels = labels or cfg.pseudo.labels
    pc = cfg.pseudo
    info = load_info(data_root)
    size = cfg.data.image_size
    if split == "train":
        ds = TrainDataset(data_root, image_size=size, augment=False, max_items=max_items, info=info)
    else:
        ds = SegDataset(data_root, split, image_size=size, info=info, max_items=max_items)
    white = cfg.pseudo.white_threshold if cfg.pseudo.white_background else None
    classnet.eval()
    bar = tqdm(total=len(ds), desc=f"pseudo masks ({split})", disable=not progress, unit="img")
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        if split == "train":
            present = torch.stack([it["label"] > 0.5 for it in items]).to(device)
        elif labels == "gt":
            present = torch.stack([gt_present(it["mask"], info.n_classes) for it in items]).to(device)
        else:
            with torch.no_grad():
                present = predicted_present(classnet(x).logits.mean(dim=0), pc.predict_threshold)
        cam, _ = fused_cam(classnet, x, pc.level_weights or None, merge=pc.merge, cam_norm=pc.cam_norm,
                           present=present, tta=pc.tta and split != "train")               # eq. 3, (B, N, S, S)
        for j, it in enumerate(items):
            path = ds.items[it["index"]][0] if split == "train" else ds.pairs[it["index"]][0]
            pred = pseudo_mask(cam[j:j + 1], present[j:j + 1], read_rgb(path), info.background_index, white)
            gt = it.get("mask")
            yield it["name"], pred, (gt.numpy() if isinstance(gt, torch.Tensor) else gt)
        bar.update(len(items))
    bar.close()


def evaluate_pseudo(classnet: ClassNet, data_root: str | Path, split: str, cfg: Any, labels: str | None = None,
                    device: str = "cpu", max_items: int = 0, progress: bool = False) -> dict:
    """Score pseudo masks of a val/test split in memory (no files): the ``pbip evaluate`` keys."""
    info = load_info(data_root)
    met = SegMetrics(info.n_classes, info.background_index, info.classes)
    for _, pred, gt in iter_pseudo_masks(classnet, data_root, split, cfg, labels, device, max_items=max_items,
                                         progress=progress):
        met.update(pred, gt)
    return met.compute()


def default_checkpoint(run_dir: str | Path, split: str) -> str:
    """The weights a split's pseudo masks come from: ``best.pt``, or ``last.pt`` on val/test when the run's
    ``pseudo.test_checkpoint`` is ``last``."""
    cfg_path = Path(run_dir) / "config.yaml"
    last = split != "train" and cfg_path.is_file() and load_config(cfg_path).pseudo.test_checkpoint == "last"
    return "last.pt" if last else "best.pt"


def write_pseudo_masks(run_dir: str | Path, data_root: str | Path, split: str, out_dir: str | Path,
                       labels: str | None = None, device: str = "auto", checkpoint: str | None = None,
                       progress: bool = True) -> Path:
    """Write pseudo masks of ``split`` from a stage-1 run's checkpoint into ``out_dir`` (PNG, dataset palette).

    The output folder, the split's files (image modes, every mask of val/test) and the checkpoint are checked before
    the first mask is written. ``labels`` None = the run configuration's ``pseudo.labels``; ``checkpoint`` None =
    ``best.pt``, or ``last.pt`` on val/test when the run configuration's ``pseudo.test_checkpoint`` is ``last`` (the
    official code). ``device``: ``auto`` = the GPU when there is one (the paper profile refuses a CPU, as training
    does)."""
    if checkpoint is None:
        checkpoint = default_checkpoint(run_dir, split)
    out = check_output_dir(out_dir)
    info = preflight_dataset(data_root, splits=() if split == "train" else (split,), train=split == "train")
    classnet, cfg = load_classnet(run_dir, checkpoint, "cpu")
    device = device_for(cfg, device)
    classnet = classnet.to(device)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, pred, _ in iter_pseudo_masks(classnet, data_root, split, cfg, labels, device, progress=progress):
        save_png(pred, out / prediction_name(name), list(info.palette))
        n += 1
    if n == 0:
        raise DataError(f"{data_root}/{split}: no images to write pseudo masks for")
    return out
