"""Table 6 on a dataset folder: zero-shot classification of single-class tiles with image prompts (the bank's
prototypes) and text prompts, per encoder (:mod:`pbip_core.method.zeroshot` holds the scoring)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..data import list_pairs, load_info
from ..errors import DataError, PBIPError
from ..io import read_mask
from ..method.zeroshot import PROMPT, prompts, prototype_scores, single_class_label, text_scores
from ..nets.encoders import available_encoders, get_encoder, get_text_encoder
from .bank import build_bank, encode_images
from .metrics import f1_per_class

TEXT_ENCODERS = ("clip", "plip")

PAPER_ENCODERS = {"CLIP": "clip", "PLIP": "plip", "MedCLIP": "medclip"}


def single_class_tiles(data_root: str | Path, splits: Sequence[str] = ("val", "test")) -> list[tuple[Path, int]]:
    """``(image path, class index)`` of every tile of ``splits`` whose mask holds exactly one tissue class."""
    info = load_info(data_root)
    out = []
    for split in splits:
        for img, mask in list_pairs(data_root, split):
            c = single_class_label(read_mask(mask), info.n_classes)
            if c >= 0:
                out.append((img, c))
    return out


def text_tower_reason(encoder: str, status: str | None = None) -> str | None:
    """Why ``encoder`` gives no text-prompt row here (None when it can): no text tower, or weights not available.

    ``status``: the encoder's entry of :func:`pbip_core.nets.encoders.available_encoders` (looked up when None).
    """
    if encoder not in TEXT_ENCODERS:
        if encoder == "medclip":
            return "the MedCLIP text tower is not implemented in pbip_core (the method only uses its image tower)"
        return f"{encoder} is an image-only encoder (no text tower)"
    if status is None:
        status = available_encoders().get(encoder, "unknown encoder")
    return None if status == "available" else f"weights not available: {status}"


def f1_row(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """``f1_<class>`` (lower case) per class, their mean ``f1_mean`` and the accuracy.

    A class absent from both the truth and the predictions has no F1 (NaN) and is left out of the mean (the
    metric convention of docs/DESIGN.md); small synthetic splits can lack a class.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    f1 = f1_per_class(y_true, y_pred, len(classes))
    seen = np.isin(np.arange(len(classes)), np.concatenate([y_true, y_pred]))
    f1 = np.where(seen, f1, np.nan)
    row = {f"f1_{c.lower()}": float(v) for c, v in zip(classes, f1)}
    row["f1_mean"] = float(np.nanmean(f1)) if seen.any() else float("nan")
    row["accuracy"] = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else float("nan")
    return row


def zero_shot_encoder(data_root: str | Path, encoder: str, bank_cfg: Any, tiles: Sequence[tuple[Path, int]],
                      cache_dir: str | Path | None = None, reduces: Sequence[str] = ("mean", "max"),
                      text: bool = True, device: str = "cpu", progress: bool = False) -> list[dict[str, Any]]:
    """Rows of Table 6 for one (available) encoder: image prompts for each rule in ``reduces``, then text prompts.

    The bank is built with ``bank_cfg`` (its encoder replaced by ``encoder``) from the training set of
    ``data_root``; tiles are encoded with the same encoder at the same input size.
    """
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
    :func:`pbip_core.nets.encoders.available_encoders`, available or not).

    One row per (prompt, encoder, rule): per-class F1 ``f1_<class>``, ``f1_mean``, ``accuracy``, ``n_tiles``; an
    encoder that cannot run gives rows with the reason in ``note`` and no numbers. Index: ``"<prompt> / <encoder>"``
    (image rows other than the first rule get `` (<rule>)``).
    """
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
