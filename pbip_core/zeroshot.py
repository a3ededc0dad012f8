"""Zero-shot classification with image prompts (prototypes) and text prompts (paper sec. 4.3, Table 6).

A tile ``x`` is classified without any training by comparing its embedding phi_e(x) with one vector set per class:

* **image prompts**: the bank's prototypes P (N, K, d) of the same encoder (sec. 3.2). Score of class n =
  ``1/K sum_k cos(phi_e(x), P(n, k))`` (``reduce="mean"``, the image-level analogue of eq. 2, our default) or
  ``max_k cos(phi_e(x), P(n, k))`` (``reduce="max"``, nearest sub-category). The paper does not say which.
* **text prompts**: ``"a photo of {class name}"`` through the text tower of a CLIP-like model (``clip``, ``plip``);
  score = cosine with the text embedding. Encoders without a text tower, or whose weights are not on this machine,
  give a row with the reason and no numbers.

Prediction = argmax over classes; per-class F1 (:func:`pbip_core.metrics.f1_per_class`) over the single-class tiles.

Tiles: the paper classifies BCSS-WSSS patches; the splits with masks (val, test) are used here and a tile's class is
read from its ground-truth mask: the classes present (background index ignored); tiles with exactly one class are
kept (:func:`single_class_label`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import DataError, PBIPError

PROMPT = "a photo of {}"
#: Words put into the prompt for the known datasets' class abbreviations (the paper does not list its wording).
CLASS_WORDS = {"TUM": "tumor", "STR": "stroma", "LYM": "lymphocytes", "NEC": "necrosis",
               "TE": "tumor epithelium", "TAS": "tumor-associated stroma"}
#: Encoders that have a text tower in pbip_core (encoders.get_text_encoder).
TEXT_ENCODERS = ("clip", "plip")
#: The paper's encoder names in Table 6 -> ours.
PAPER_ENCODERS = {"CLIP": "clip", "PLIP": "plip", "MedCLIP": "medclip"}


# ---------------------------------------------------------------------------------------------------- tiles
def single_class_label(mask: np.ndarray, n_classes: int) -> int:
    """The one tissue class of a ground-truth mask, or -1 when it holds none or several.

    mask (H, W) class indices; values >= ``n_classes`` (the background index) are ignored.
    """
    present = np.flatnonzero(np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=n_classes)[:n_classes])
    return int(present[0]) if len(present) == 1 else -1


def single_class_tiles(data_root: str | Path, splits: Sequence[str] = ("val", "test")) -> list[tuple[Path, int]]:
    """``(image path, class index)`` of every tile of ``splits`` whose mask holds exactly one tissue class."""
    from .data import list_pairs, load_info
    from .io import read_mask

    info = load_info(data_root)
    out = []
    for split in splits:
        for img, mask in list_pairs(data_root, split):
            c = single_class_label(read_mask(mask), info.n_classes)
            if c >= 0:
                out.append((img, c))
    return out


# ---------------------------------------------------------------------------------------------------- scoring
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


def text_tower_reason(encoder: str, status: str | None = None) -> str | None:
    """Why ``encoder`` gives no text-prompt row here (None when it can): no text tower, or weights not available.

    ``status``: the encoder's entry of :func:`pbip_core.encoders.available_encoders` (looked up when None).
    """
    if encoder not in TEXT_ENCODERS:
        if encoder == "medclip":
            return "the MedCLIP text tower is not implemented in pbip_core (the method only uses its image tower)"
        return f"{encoder} is an image-only encoder (no text tower)"
    if status is None:
        from .encoders import available_encoders

        status = available_encoders().get(encoder, "unknown encoder")
    return None if status == "available" else f"weights not available: {status}"


def f1_row(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """``f1_<class>`` (lower case) per class, their mean ``f1_mean`` and the accuracy.

    A class absent from both the truth and the predictions has no F1 (NaN) and is left out of the mean (the
    metric convention of DESIGN.md); small synthetic splits can lack a class.
    """
    from .metrics import f1_per_class

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    f1 = f1_per_class(y_true, y_pred, len(classes))
    seen = np.isin(np.arange(len(classes)), np.concatenate([y_true, y_pred]))
    f1 = np.where(seen, f1, np.nan)
    row = {f"f1_{c.lower()}": float(v) for c, v in zip(classes, f1)}
    row["f1_mean"] = float(np.nanmean(f1)) if seen.any() else float("nan")
    row["accuracy"] = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else float("nan")
    return row


# ---------------------------------------------------------------------------------------------------- the table
def zero_shot_encoder(data_root: str | Path, encoder: str, bank_cfg: Any, tiles: Sequence[tuple[Path, int]],
                      cache_dir: str | Path | None = None, reduces: Sequence[str] = ("mean", "max"),
                      text: bool = True, device: str = "cpu", progress: bool = False) -> list[dict[str, Any]]:
    """Rows of Table 6 for one (available) encoder: image prompts for each rule in ``reduces``, then text prompts.

    The bank is built with ``bank_cfg`` (its encoder replaced by ``encoder``) from the training set of
    ``data_root``; tiles are encoded with the same encoder at the same input size.
    """
    from .bank import build_bank, encode_images
    from .data import load_info
    from .encoders import get_encoder, get_text_encoder

    info = load_info(data_root)
    cfg = copy.deepcopy(bank_cfg)
    cfg.encoder = encoder
    enc = get_encoder(encoder, device=device, input_size=cfg.encoder_size or None)
    bank = build_bank(data_root, cfg, cache_dir=cache_dir, device=device, encoder=enc, progress=progress)
    feats, _ = encode_images([p for p, _ in tiles], enc, cfg.batch_size, cache_dir, device, progress)
    y = np.array([c for _, c in tiles], dtype=int)
    base = {"encoder": encoder, "n_tiles": len(tiles), "K": bank.k, "N_K": cfg.nk}
    rows = []
    for r in reduces:
        pred = prototype_scores(feats, bank.features, r).argmax(dim=1).numpy()
        rows.append({"prompt": "Image", **base, "rule": f"{r} over K", **f1_row(y, pred, info.classes), "note": ""})
    reason = text_tower_reason(encoder, "available")
    if text and reason is None:
        try:
            t = get_text_encoder(encoder).encode_text(prompts(info.classes))
            pred = text_scores(feats, t).argmax(dim=1).numpy()
            rows.append({"prompt": "Text", **base, "rule": PROMPT, **f1_row(y, pred, info.classes), "note": ""})
        except PBIPError as e:
            rows.append({"prompt": "Text", **base, "rule": PROMPT, "note": str(e)})
    return rows


def zero_shot_table(data_root: str | Path, bank_cfg: Any, encoders: Sequence[str] | None = None,
                    splits: Sequence[str] = ("val", "test"), cache_dir: str | Path | None = None,
                    reduces: Sequence[str] = ("mean", "max"), device: str = "cpu",
                    progress: bool = False) -> pd.DataFrame:
    """Table 6 on a dataset folder for ``encoders`` (default: every encoder of
    :func:`pbip_core.encoders.available_encoders`, available or not).

    One row per (prompt, encoder, rule): per-class F1 ``f1_<class>``, ``f1_mean``, ``accuracy``, ``n_tiles``; an
    encoder that cannot run gives rows with the reason in ``note`` and no numbers. Index: ``"<prompt> / <encoder>"``
    (image rows other than the first rule get `` (<rule>)``).
    """
    from .encoders import available_encoders

    status = available_encoders()
    names = list(encoders) if encoders is not None else list(status)
    tiles = single_class_tiles(data_root, splits)
    if not tiles:
        raise DataError(f"{data_root}: no single-class tile in the splits {list(splits)} (classes read from masks)")
    rows: list[dict[str, Any]] = []
    for name in names:
        st = status.get(name, "unknown encoder")
        if st == "available":
            rows += zero_shot_encoder(data_root, name, bank_cfg, tiles, cache_dir, reduces, device=device,
                                      progress=progress)
        else:
            rows.append({"prompt": "Image", "encoder": name, "rule": f"{reduces[0]} over K",
                         "note": f"weights not available: {st}"})
        if name in (*TEXT_ENCODERS, "medclip") and (st != "available" or name == "medclip"):
            rows.append({"prompt": "Text", "encoder": name, "rule": PROMPT, "note": text_tower_reason(name, st)})
    df = pd.DataFrame(rows)
    first = f"{reduces[0]} over K"
    df.index = pd.Index([f"{r.prompt} / {r.encoder}" + ("" if r.prompt == "Text" or r.rule == first else f" ({r.rule})")
                         for r in df.itertuples()], name="row")
    return df


def table6_comparison(ours: pd.DataFrame, classes: Sequence[str], provenance: str) -> pd.DataFrame:
    """The paper's Table 6 rows (BCSS-WSSS) above ours, same columns (per-class F1 and the mean, fractions).

    ``ours``: :func:`zero_shot_table`'s result. Returns a table indexed by (source, row) with columns
    ``F1 <class>`` and ``F1 mean`` (3 decimals as in the paper, "—" where there is no number) and ``note``;
    ``.attrs["caption"]`` says where each part comes from.
    """
    from .report import PAPER, paper_table

    if not provenance.strip():
        raise ValueError("table6_comparison: a provenance string is mandatory")
    metrics = [f"f1_{c.lower()}" for c in classes] + ["f1_mean"]
    labels = {m: f"F1 {m[3:].upper() if m != 'f1_mean' else 'mean'}" for m in metrics}
    paper = paper_table("6", "bcss-wsss")
    prow = paper.pivot(index="row", columns="metric", values="mean").reindex(pd.unique(paper["row"]))
    prow = prow.reindex(columns=metrics)
    prow["note"] = ""
    mine = ours.reindex(columns=[*metrics, "note"]).copy()
    both = pd.concat({f"Paper ({PAPER}, Table 6, BCSS-WSSS)": prow, "This book": mine}, names=["source", "row"])
    out = both[metrics].apply(lambda col: col.map(lambda v: "—" if pd.isna(v) else f"{v:.3f}")).rename(columns=labels)
    out["note"] = both["note"].fillna("")
    out.attrs["caption"] = (f"Zero-shot classification F1 (fractions, as the paper prints them). Paper: "
                            f"{PAPER}, Table 6 (BCSS-WSSS). This book: {provenance.strip()}.")
    return out
