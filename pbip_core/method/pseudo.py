"""Pseudo masks from a stage-1 run (sec. 3.1): CAMs -> fused map -> restricted argmax -> PNG.

For each image:

1. the ClassNet's per-level maps M_i are upsampled to the image and fused, M' = sum_i w_i Up(M_i) (eq. 3; w_i = 1
   unless ``pseudo.level_weights`` says otherwise; official: 0.3 CAM2 + 0.3 CAM3 + 0.4 CAM4);
2. the argmax runs over the image's classes only: on ``train`` the file-name labels; on val/test by default the
   classes present in the ground-truth mask (``labels="gt"``, as the official code and TPRO do, so numbers compare
   with the paper's pseudo-mask tables), or the classifier's own prediction (``labels="predicted"``: sigmoid of the
   level-averaged image logits > ``pseudo.predict_threshold``, at least the top class), the honest deployment setting;
3. background rule (a reading: the paper names none): a pixel whose 3x3-median of min(R, G, B) is above
   ``pseudo.white_threshold`` * 255 is white glass and becomes ``background_index`` (``pseudo.white_background=false``
   turns it off, as in the official code, which never predicts background).

The official code's variants (``pseudo.*`` keys): the K sub-maps of a class merged by a softmax-weighted sum instead
of the mean (``merge="softmax"``), each level's map passed through ReLU and a per-channel min-max with absent classes
zeroed before the fusion (``cam_norm="relu_minmax"``), and on val/test a mean over horizontal flips and input scalings
0.9 / 1.0 / 1.1 (``tta``), as its ``utils/validate.py`` (``get_seg_label``, ``validate``).

This module holds the per-batch functions; running them over a dataset split and writing the PNGs (P mode, dataset
palette, the images' file names, atomically) is :mod:`pbip_core.engine.pseudo`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .model import ClassNet, aggregate


#: The official test-time augmentation: ttach HorizontalFlip x Multiply(0.9, 1.0, 1.1) of the normalised input.
TTA = tuple((flip, gain) for flip in (False, True) for gain in (0.9, 1.0, 1.1))


# ---------------------------------------------------------------------- pure functions
def merge_submaps(sub: torch.Tensor, scale: float | torch.Tensor = 1.0, merge: str = "mean") -> torch.Tensor:
    """A class map from its K prototype maps.  sub (B, N, K, h, w) cosines -> (B, N, h, w).

    ``"mean"``: the mean over K (eq. 2). ``"softmax"``: sum_k softmax_k(s * sub) * sub per pixel, s the level's logit
    scale: the official ``merge_subclass_cams_to_parent(method="max")`` on its CAM logits s * sub, divided by s.
    """
    if merge == "mean":
        return sub.mean(dim=2)
    return (torch.softmax(sub * scale, dim=2) * sub).sum(dim=2)


def relu_minmax(cam: torch.Tensor, present: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The official per-level CAM normalisation: ReLU, min-max per (image, class) channel, absent classes set to 0.
    cam (B, N, h, w), present (B, N) bool or None -> (B, N, h, w) in [0, 1]."""
    c = cam.clamp_min(0)
    lo, hi = c.amin(dim=(2, 3), keepdim=True), c.amax(dim=(2, 3), keepdim=True)
    c = (c - lo) / (hi - lo + eps)
    return c if present is None else c * present[:, :, None, None].to(c.dtype)


def level_cams(out: Any, merge: str = "mean", cam_norm: str = "none",
               present: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-level class maps of a ClassNet output for pseudo masks: merged over K (:func:`merge_submaps`), optionally
    normalised (:func:`relu_minmax`).  -> list of (B, N, h_i, w_i)."""
    cams = [out.maps[i] if merge == "mean" else merge_submaps(out.submaps[i], out.scale[i], merge)
            for i in range(len(out.maps))]
    if cam_norm == "relu_minmax":
        cams = [relu_minmax(c, present) for c in cams]
    return cams


@torch.no_grad()
def fused_cam(classnet: ClassNet, x: torch.Tensor, level_weights: Sequence[float] | None = None,
              size: tuple[int, int] | None = None, merge: str = "mean", cam_norm: str = "none",
              present: torch.Tensor | None = None, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused class maps (eq. 3) and image logits.  x (B, 3, H, W) -> cam (B, N, H', W'), logits (B, N).

    ``size`` = output size (default: the input's). ``merge``, ``cam_norm`` (with ``present`` (B, N) bool, the classes
    kept by the normalisation) and ``tta`` (mean of the fused maps over :data:`TTA`, flips undone) are the official
    code's options; the logits are those of the plain forward.
    """
    size = size or tuple(x.shape[-2:])
    out = classnet(x)
    logits = out.logits.mean(dim=0)
    views = TTA if tta else ((False, 1.0),)
    cams = []
    for flip, gain in views:
        o = out if (not flip and gain == 1.0) else classnet(x.flip(-1) if flip else x, gain=gain)
        cam = aggregate(level_cams(o, merge, cam_norm, present), size, level_weights)
        cams.append(cam.flip(-1) if flip else cam)
    return torch.stack(cams).mean(dim=0), logits


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


def pseudo_mask(cam: torch.Tensor, present: torch.Tensor, image: np.ndarray, background_index: int,
                white_threshold: float | None = 0.85) -> np.ndarray:
    """One image's pseudo mask: restricted argmax of its fused CAM at the image's size, then the background rule.

    cam (1, N, h, w) fused maps; present (1, N) bool; image (H, W, 3) uint8. ``white_threshold=None`` turns the
    white-glass rule off (the official code). Returns (H, W) uint8 class indices (``background_index`` for white).
    """
    h, w = image.shape[:2]
    c = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
    pred = restricted_argmax(c, present)[0].cpu().numpy().astype(np.uint8)
    if white_threshold is not None:
        pred[white_mask(image, white_threshold)] = background_index
    return pred
