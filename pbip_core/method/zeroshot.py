"""Zero-shot classification with image prompts (prototypes) and text prompts (paper sec. 4.3, Table 6).

A tile ``x`` is classified without any training by comparing its embedding phi_e(x) with one vector set per class:

* **image prompts**: the bank's prototypes P (N, K, d) of the same encoder (sec. 3.2). Score of class n =
  ``1/K sum_k cos(phi_e(x), P(n, k))`` (``reduce="mean"``, the image-level analogue of eq. 2, our default) or
  ``max_k cos(phi_e(x), P(n, k))`` (``reduce="max"``, nearest sub-category). The paper does not say which.
* **text prompts**: ``"a photo of {class name}"`` through the text tower of a CLIP-like model (``clip``, ``plip``);
  score = cosine with the text embedding. Encoders without a text tower, or whose weights are not on this machine,
  give a row with the reason and no numbers.

Prediction = argmax over classes; per-class F1 over the single-class tiles. This module holds the scoring functions;
building the bank, encoding the tiles and the table of every encoder is :mod:`pbip_core.engine.zeroshot`.

Tiles: the paper classifies BCSS-WSSS patches; the splits with masks (val, test) are used here and a tile's class is
read from its ground-truth mask: the classes present (background index ignored); tiles with exactly one class are
kept (:func:`single_class_label`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PROMPT = "a photo of {}"

CLASS_WORDS = {"TUM": "tumor", "STR": "stroma", "LYM": "lymphocytes", "NEC": "necrosis",
               "TE": "tumor epithelium", "TAS": "tumor-associated stroma"}


def single_class_label(mask: np.ndarray, n_classes: int) -> int:
    """The one tissue class of a ground-truth mask, or -1 when it holds none or several.

    mask (H, W) class indices; values >= ``n_classes`` (the background index) are ignored.
    """
    present = np.flatnonzero(np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=n_classes)[:n_classes])
    return int(present[0]) if len(present) == 1 else -1


def prototype_scores(feats: torch.Tensor, protos: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Class scores from image prompts.  feats (M, d), protos P (N, K, d) -> (M, N).

    ``mean``: 1/K sum_k cos(f, P(n, k)); ``max``: max_k cos(f, P(n, k)).
    """
    cos = torch.einsum("md,nkd->mnk", F.normalize(feats.float(), dim=-1), F.normalize(protos.float(), dim=-1))
    if reduce == "mean":
        return cos.mean(dim=2)
    if reduce == "max":
        return cos.amax(dim=2)
    raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")


def text_scores(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Class scores from text prompts: cosine of image and text embeddings.  feats (M, d), text (N, d) -> (M, N)."""
    return F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T


def prompts(classes: Sequence[str], template: str = PROMPT) -> list[str]:
    """``"a photo of {class name}"`` per class, abbreviations spelled out via :data:`CLASS_WORDS`."""
    return [template.format(CLASS_WORDS.get(c, c)) for c in classes]
