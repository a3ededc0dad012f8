"""Synthetic H&E-like tissue tiles in the dataset-folder format (the book's built-in dataset).

``pbip synth --out DIR`` writes a small, seeded stand-in for BCSS-WSSS (sec. 4.1 of the paper) with the same
classes ``[TUM, STR, LYM, NEC]``, palette and folder layout (DESIGN.md, "Dataset folder format")::

    DIR/train/train_00012-[1 0 1 0].png    image-level label in the name (order = classes)
    DIR/train_mask/train_00012-[1 0 1 0].png   pixel masks of the train tiles (see below)
    DIR/val/img/val_0003.png   DIR/val/mask/val_0003.png   DIR/test/img/...   DIR/test/mask/...
    DIR/meta.csv               per tile: split, classes, sub-style per class, area shares
    DIR/dataset.yaml           name, classes, background_index 4, palette, description, generator settings

``train_mask/`` is NOT part of weak supervision: training code reads only ``train/`` (names carry the labels).
It is there so the book can measure the quality of stage-1 pseudo masks on the training split, which real
datasets cannot do. ``dataset.yaml`` is written last, so a folder holding it is complete.

How a tile is made (:func:`render_tile`)
----------------------------------------
1. Layout: 1-3 classes in smooth irregular regions (a Voronoi diagram of a few seeds whose coordinates are
   warped by smooth noise), optionally some white glass (a thresholded smooth field). Classes covering less than
   ``MIN_AREA_SHARE`` (2 %) of the tile are merged into their neighbours, so the label vector of a tile is exactly
   the set of classes in its mask. About 38 % of tiles are single-class (the paper's image bank, sec. 3.2, uses
   single-class tiles only), and about 6 % are single-class and mostly (> 60 %) white so the bank's white filter
   has something to drop.
2. Appearance: each class is rendered as per-pixel stain concentrations ``C_H`` (haematoxylin) and ``C_E``
   (eosin), composited through the mask and turned into colour by the Beer-Lambert law (Ruifrok & Johnston 2001)::

       OD(x) = C_H(x) v_H + C_E(x) v_E + r(x),    RGB(x) = 255 exp(-OD(x))

   with unit optical-density vectors ``v_H``, ``v_E`` drawn per tile between Ruifrok-Johnston's
   (H 0.65 0.70 0.29, E 0.07 0.99 0.11) and Macenko et al.'s (2009) reference vectors
   (H 0.56 0.72 0.41, E 0.22 0.80 0.56): slide-to-slide stain variation. ``r`` is a faint grey residual
   (glass reads 240-250). Nuclei are ellipses with irregular contours, chromatin grain and, for vesicular nuclei,
   a dark rim and a nucleolus; they are drawn for all nuclei at once from a nearest-centre map
   (``scipy.ndimage.distance_transform_edt``), never with per-pixel Python loops.

The paper's two difficulties, built in on purpose
-------------------------------------------------
* Intra-class heterogeneity: every class has four visibly different sub-styles (stain intensity, nuclear
  density and scale, texture), listed in :data:`STYLES`, e.g. TUM ``solid`` (crowded hyperchromatic nuclei),
  ``vesicular`` (pale nuclei with nucleoli, pink cytoplasm), ``sparse-large`` (few giant nuclei), ``small-dense``.
* Inter-class homogeneity: some sub-styles of different classes share colour and texture statistics on purpose
  (:data:`CONFUSABLE`): TUM ``small-dense`` ~ LYM ``dense``/``pale``; NEC ``pale`` ~ STR ``loose``;
  NEC ``dirty`` (nuclear dust) ~ LYM ``sparse``; LYM ``crushed`` (smeared spindle-like nuclei) ~ STR ``cellular``.

The sub-style of every class in every tile is recorded in ``meta.csv`` so chapters can show which sub-styles the
prototype clusters (sec. 3.2) recover. Every tile has its own ``numpy`` generator seeded from
``(seed, split, index)``, so the bytes written depend on the seed only, not on ``--workers``.
"""

from __future__ import annotations

import csv
import functools
import io
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage
from tqdm.auto import tqdm

from ..errors import PBIPError
from ..io import atomic_path, atomic_write_text, save_png

GENERATOR_VERSION = "1.0"
CLASSES: tuple[str, ...] = ("TUM", "STR", "LYM", "NEC")
BACKGROUND_INDEX = 4
PALETTE: list[tuple[int, int, int]] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]
MIN_AREA_SHARE = 0.02          # a class is in a tile's label iff it covers >= 2 % of the tile
CLASS_WEIGHTS = np.array([0.30, 0.30, 0.20, 0.20])  # TUM and STR dominate, as in BCSS-WSSS
N_CLASSES_P = np.array([0.36, 0.39, 0.25])          # P(1, 2, 3 classes) before the forced mostly-white tiles
P_MOSTLY_WHITE = 0.06          # single-class tiles with 60-85 % glass (dropped by the bank's white filter)
P_WHITE = 0.30                 # other tiles with a 5-40 % glass region
SPLITS = {"train": 0, "val": 1, "test": 2}
MARKER = ".pbip-synth"         # written first; lets --overwrite recognise our own (possibly partial) output
REFERENCE_SIZE = 224           # all lengths in STYLES are pixels at 224 px; tiles of other sizes are scaled

# Optical-density stain vectors (rows: H, E); normalised in _stain_vectors.
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
MACENKO = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])

# ----------------------------------------------------------------------------------------------------------------
# Sub-styles. Each is a recipe for the matrix (E/H background, fibres, holes, granularity, cell borders) and a list
# of blob populations (nuclei, nuclear fragments, red cells). Ranges (lo, hi) are sampled per tile.
#   place: "grid" (jittered grid, crowded without overlap) | "random" | "cluster" (random around a few foci)
#   spacing: grid step (px) for "grid"; count: number of blobs per 224x224 tile for "random"/"cluster"
#   r: semi-major axis (px); elong: minor/major ratio; irr: contour irregularity; inten: stain concentration
#   ves: vesicular (pale centre, dark rim, nucleolus); orient: "random" | "flow" (along the fibres); stain: H | E
# ----------------------------------------------------------------------------------------------------------------
_NUC = dict(place="random", spacing=10.0, count=0, drop=0.0, r=(4.0, 5.0), elong=(0.8, 1.0), irr=0.15,
            inten=(1.0, 1.3), ves=(0.0, 0.0), orient="random", stain="H")


def _pop(**kw: Any) -> dict[str, Any]:
    return {**_NUC, **kw}


STYLES: dict[str, dict[str, dict[str, Any]]] = {
    "TUM": {
        "solid": dict(E=(0.35, 0.5), H0=(0.30, 0.45), E_var=0.25, borders=0.0, holes=0.0,
                      nuclei=[_pop(place="grid", spacing=15, drop=0.05, r=(6.0, 9.0), elong=(0.6, 0.95), irr=0.35,
                                   inten=(1.3, 1.8), ves=(0.0, 0.15))]),
        "vesicular": dict(E=(0.55, 0.75), H0=(0.12, 0.22), E_var=0.2, borders=0.25, holes=0.08,
                          nuclei=[_pop(place="grid", spacing=19, drop=0.15, r=(6.0, 8.5), elong=(0.65, 0.95),
                                       irr=0.25, inten=(0.9, 1.2), ves=(0.6, 0.85))]),
        "sparse-large": dict(E=(0.45, 0.65), H0=(0.15, 0.25), E_var=0.3, borders=0.15, holes=0.04,
                             nuclei=[_pop(place="grid", spacing=34, drop=0.25, r=(10.0, 15.0), elong=(0.55, 0.9),
                                          irr=0.4, inten=(1.1, 1.6), ves=(0.2, 0.6))]),
        # inter-class homogeneity: small round crowded dark nuclei, close to LYM "dense"/"pale"
        "small-dense": dict(E=(0.25, 0.4), H0=(0.2, 0.3), E_var=0.2, borders=0.0, holes=0.0,
                            nuclei=[_pop(place="grid", spacing=9.5, drop=0.08, r=(3.8, 5.2), elong=(0.75, 1.0),
                                         irr=0.2, inten=(1.2, 1.6), ves=(0.0, 0.2))]),
    },
    "STR": {
        "dense-collagen": dict(E=(0.75, 1.0), H0=(0.08, 0.15), E_var=0.15, fibres=(0.6, 1.8, 1.0), holes=0.03,
                               nuclei=[_pop(count=14, r=(7.0, 11.0), elong=(0.18, 0.3), irr=0.15, inten=(1.2, 1.6),
                                            orient="flow")]),
        "cellular": dict(E=(0.5, 0.7), H0=(0.2, 0.3), E_var=0.2, fibres=(0.45, 1.6, 0.8), holes=0.02,
                         nuclei=[_pop(count=70, r=(7.0, 12.0), elong=(0.2, 0.35), irr=0.2, inten=(1.1, 1.5),
                                      orient="flow")]),
        # inter-class homogeneity: pale loose stroma, close to NEC "pale"
        "loose": dict(E=(0.25, 0.4), H0=(0.05, 0.1), E_var=0.35, fibres=(0.7, 1.5, 1.2), holes=0.3,
                      nuclei=[_pop(count=10, r=(5.0, 9.0), elong=(0.25, 0.45), irr=0.2, inten=(0.9, 1.3),
                                   orient="flow")]),
        # inflamed stroma: fibres with scattered lymphocytes (shares texture with LYM "sparse")
        "inflamed": dict(E=(0.6, 0.8), H0=(0.12, 0.2), E_var=0.2, fibres=(0.5, 1.8, 0.9), holes=0.04,
                         nuclei=[_pop(count=18, r=(7.0, 10.0), elong=(0.2, 0.3), inten=(1.1, 1.5), orient="flow"),
                                 _pop(place="cluster", count=60, r=(3.2, 4.2), elong=(0.85, 1.0), inten=(1.4, 1.8))]),
    },
    "LYM": {
        "dense": dict(E=(0.2, 0.35), H0=(0.15, 0.25), E_var=0.2, holes=0.0,
                      nuclei=[_pop(place="grid", spacing=9.0, drop=0.05, r=(3.4, 4.4), elong=(0.85, 1.0), irr=0.1,
                                   inten=(1.5, 1.9))]),
        "sparse": dict(E=(0.45, 0.65), H0=(0.1, 0.18), E_var=0.3, holes=0.05,
                       nuclei=[_pop(place="grid", spacing=12.0, drop=0.45, r=(3.2, 4.2), elong=(0.85, 1.0), irr=0.1,
                                    inten=(1.4, 1.8))]),
        # faded stain, slightly larger nuclei: close to TUM "small-dense"
        "pale": dict(E=(0.2, 0.32), H0=(0.1, 0.18), E_var=0.2, holes=0.0,
                     nuclei=[_pop(place="grid", spacing=10.0, drop=0.08, r=(3.8, 5.0), elong=(0.8, 1.0), irr=0.15,
                                  inten=(0.9, 1.2), ves=(0.1, 0.3))]),
        # crush artefact: smeared, elongated dark nuclei along a direction (close to STR "cellular")
        "crushed": dict(E=(0.25, 0.4), H0=(0.25, 0.35), E_var=0.25, fibres=(0.15, 4.0, 0.5), holes=0.0,
                        nuclei=[_pop(place="grid", spacing=9.0, drop=0.1, r=(4.5, 7.0), elong=(0.35, 0.6), irr=0.3,
                                     inten=(1.3, 1.7), orient="flow")]),
    },
    "NEC": {
        "granular": dict(E=(0.6, 0.85), H0=(0.08, 0.15), E_var=0.35, grain=0.35, holes=0.03,
                         nuclei=[_pop(place="cluster", count=90, r=(1.2, 2.4), elong=(0.5, 1.0), irr=0.45,
                                      inten=(1.2, 1.8)),
                                 _pop(count=18, r=(5.0, 8.0), elong=(0.7, 1.0), irr=0.3, inten=(0.15, 0.3),
                                      ves=(0.5, 0.8))]),  # ghost cells
        # inter-class homogeneity: pale, washed out, few fragments, close to STR "loose"
        "pale": dict(E=(0.25, 0.4), H0=(0.04, 0.08), E_var=0.4, grain=0.3, holes=0.15,
                     nuclei=[_pop(place="cluster", count=25, r=(1.2, 2.2), elong=(0.5, 1.0), irr=0.4,
                                  inten=(0.7, 1.1))]),
        # dirty necrosis: abundant nuclear dust; dark speckle close to LYM "sparse"
        "dirty": dict(E=(0.45, 0.65), H0=(0.15, 0.25), E_var=0.3, grain=0.3, holes=0.02,
                      nuclei=[_pop(place="random", count=320, r=(1.3, 2.8), elong=(0.5, 1.0), irr=0.45,
                                   inten=(1.2, 1.8))]),
        # haemorrhagic: red cells (eosin discs with pale centres) and some debris
        "haemorrhagic": dict(E=(0.3, 0.45), H0=(0.03, 0.06), E_var=0.3, grain=0.2, holes=0.05,
                             nuclei=[_pop(place="grid", spacing=7.5, drop=0.2, r=(2.8, 3.6), elong=(0.75, 1.0),
                                          irr=0.1, inten=(0.8, 1.1), ves=(0.35, 0.5), stain="E"),
                                     _pop(place="cluster", count=30, r=(1.2, 2.2), irr=0.4, inten=(1.0, 1.5))]),
    },
}

# Pairs of sub-styles of different classes that look alike on purpose (inter-class homogeneity).
CONFUSABLE: list[tuple[str, str]] = [
    ("TUM/small-dense", "LYM/dense"),
    ("TUM/small-dense", "LYM/pale"),
    ("NEC/pale", "STR/loose"),
    ("NEC/dirty", "LYM/sparse"),
    ("LYM/crushed", "STR/cellular"),
]

DESCRIPTION = (
    "Synthetic H&E-like tissue tiles (pbip_core.data.synth), a seeded stand-in for BCSS-WSSS with the same classes "
    "and palette. Colour follows the Beer-Lambert law from haematoxylin and eosin concentration maps. Built-in "
    "intra-class heterogeneity: four sub-styles per class (stain intensity, nuclear density and scale, texture). "
    "Built-in inter-class homogeneity: some sub-styles of different classes look alike on purpose (see "
    "'confusable'). Tiles hold 1-3 classes in smooth irregular regions plus optional white glass (index 4); a class "
    "is in a tile's label iff it covers >= 2% of the tile. train_mask/ holds pixel masks of the train tiles: hidden "
    "from weak supervision, only for measuring pseudo-mask quality. meta.csv lists split, classes, sub-style per "
    "class and area shares of every tile."
)


# ----------------------------------------------------------------------------------------------------------------
# Random fields
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _transfer(size: int, su: float, sv: float, angle: float) -> np.ndarray:
    """Fourier transfer function (size, size//2+1) of a Gaussian filter with std ``su`` along ``angle`` and ``sv``
    across it (pixels), for ``rfft2`` of a (size, size) image."""
    ky, kx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    ku = kx * np.cos(angle) + ky * np.sin(angle)
    kv = -kx * np.sin(angle) + ky * np.cos(angle)
    return np.exp(-2.0 * np.pi**2 * ((su * ku) ** 2 + (sv * kv) ** 2)).astype(np.float32)


def _filtered_noise(rng: np.random.Generator, size: int, su: float, sv: float, angle: float) -> np.ndarray:
    """(size, size) float32 periodic white noise filtered by ``_transfer``; zero mean, unit std."""
    white = rng.random((size, size), dtype=np.float32)  # uniform: cheaper; Gaussian after filtering anyway
    field = sfft.irfft2(sfft.rfft2(white) * _transfer(size, su, sv, angle), s=(size, size))
    field -= field.mean()
    std = field.std()
    return field / (std if std > 0 else np.float32(1.0))


@functools.lru_cache(maxsize=64)
def _noise_bank(size: int, sigma: float) -> np.ndarray:
    """(6, size, size) isotropic fields from a fixed seed; :func:`smooth_noise` draws random symmetries of them."""
    rng = np.random.default_rng(np.random.SeedSequence([size, int(round(sigma * 1000))]))
    return np.stack([_filtered_noise(rng, size, sigma, sigma, 0.0) for _ in range(6)])


def smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float], angle: float = 0.0
                 ) -> np.ndarray:
    """(size, size) float32 periodic Gaussian-filtered white noise, zero mean, unit std.

    ``sigma`` = (sigma_along, sigma_across) filters anisotropically: streaks along ``angle`` (radians, from the
    x axis); filtering is a product in the Fourier domain. Isotropic fields are a random cyclic shift, transpose
    and sign of one of six cached fields per (size, sigma) (about 6 * 2 * 2 * size^2 distinct fields, and ~20x
    faster than filtering fresh noise); they are textures, not signal, so this costs no realism.
    """
    su, sv = (float(sigma), float(sigma)) if np.isscalar(sigma) else (float(sigma[0]), float(sigma[1]))
    if su != sv:
        angle = round(float(angle) % np.pi, 2)  # quantised so the transfer cache stays small (0.6 degree steps)
        return _filtered_noise(rng, size, su, sv, angle)
    bank = _noise_bank(size, round(su, 3))
    j, dy, dx, flip, sign = rng.integers(0, [len(bank), size, size, 2, 2])
    field = np.roll(bank[j], (int(dy), int(dx)), axis=(0, 1))
    field = field.T if flip else field
    return -field if sign else field


def _quantile_mask(field: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the ``share`` largest values of ``field``."""
    if share <= 0:
        return np.zeros(field.shape, bool)
    return field >= np.quantile(field, 1.0 - share)


# ----------------------------------------------------------------------------------------------------------------
# Blobs (nuclei, fragments, red cells), all at once
# ----------------------------------------------------------------------------------------------------------------
def _centres(rng: np.random.Generator, pop: dict[str, Any], size: int, sc: float) -> np.ndarray:
    """Blob centres (n, 2) as (row, col) floats for one population."""
    if pop["place"] == "grid":
        step = pop["spacing"] * sc
        g = np.arange(-step / 2, size + step / 2, step)
        rr, cc = np.meshgrid(g, g, indexing="ij")
        rr = rr + (np.arange(rr.shape[1]) % 2)[None, :] * step / 2     # hexagonal-ish rows
        pts = np.stack([rr.ravel(), cc.ravel()], 1) + rng.uniform(-0.35, 0.35, (rr.size, 2)) * step
        pts = pts[rng.random(len(pts)) >= pop["drop"]]
    else:
        n = int(rng.poisson(pop["count"]))  # per tile: the field of view is the same at every size
        if pop["place"] == "cluster":
            foci = rng.uniform(0, size, (int(rng.integers(2, 5)), 2))
            pts = foci[rng.integers(0, len(foci), n)] + rng.normal(0, size * 0.12, (n, 2))
        else:
            pts = rng.uniform(0, size, (n, 2))
    return pts[(pts >= -2).all(1) & (pts < size + 2).all(1)]


def render_blobs(rng: np.random.Generator, size: int, centres: np.ndarray, a: np.ndarray, b: np.ndarray,
                 angle: np.ndarray, inten: np.ndarray, ves: np.ndarray, irr: float) -> np.ndarray:
    """Stain concentration (size, size) of n elliptic blobs drawn at once.

    centres (n, 2) (row, col); a, b (n,) semi-axes in px; angle (n,) major-axis direction; inten (n,) peak
    concentration; ves (n,) in [0, 1] vesicular: pale centre, dark rim, central nucleolus; irr: contour noise.
    Every pixel belongs to its nearest centre (Euclidean distance transform); centres are split into two
    interleaved groups rendered separately and max-combined, so touching blobs are not cut by Voronoi edges.
    """
    out = np.zeros(size * size, np.float32)
    if len(centres) == 0:
        return out.reshape(size, size)
    ci = np.clip(np.round(centres).astype(int), 0, size - 1)
    wobble = smooth_noise(rng, size, max(2.0, 0.5 * float(np.median(b)))).ravel()  # irregular contours
    grain = smooth_noise(rng, size, 0.7).ravel()                                     # chromatin texture
    rr, cc = _grid(size)
    a, b, angle = a.astype(np.float32), b.astype(np.float32), angle.astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    inten, ves = inten.astype(np.float32), ves.astype(np.float32)
    cy, cx = centres[:, 0].astype(np.float32), centres[:, 1].astype(np.float32)
    order = np.argsort(ci[:, 0] * size + ci[:, 1], kind="stable")
    for group in (order[0::2], order[1::2]):
        if len(group) == 0:
            continue
        lab = np.full((size, size), -1)
        lab[ci[group, 0], ci[group, 1]] = group
        dist, (ir, ic) = ndimage.distance_transform_edt(lab < 0, return_indices=True)
        px = np.flatnonzero(dist.ravel() <= a[group].max() * (1 + irr) + 2)   # only pixels a blob can reach
        k = lab[ir.ravel()[px], ic.ravel()[px]]                                 # nearest blob index per pixel
        dy, dx = rr[px] - cy[k], cc[px] - cx[k]
        u, v = dx * cos[k] + dy * sin[k], -dx * sin[k] + dy * cos[k]
        rho = np.sqrt((u / a[k]) ** 2 + (v / b[k]) ** 2) * (1.0 + irr * 0.5 * wobble[px])
        edge = np.clip((1.0 - rho) * b[k] + 0.5, 0.0, 1.0)     # ~1 px anti-aliased border
        rim = 1.0 - ves[k] * 0.75 * np.clip(1.0 - rho**2, 0, 1) ** 2
        nucleolus = ves[k] * np.clip(1.0 - rho / 0.22, 0, 1) * 1.5
        val = inten[k] * (rim + nucleolus) * (0.85 + 0.15 * grain[px]) * edge
        out[px] = np.maximum(out[px], val)
    return out.reshape(size, size)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 row and column coordinates of a (size, size) image."""
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    return rr.ravel(), cc.ravel()


# ----------------------------------------------------------------------------------------------------------------
# One class in one sub-style
# ----------------------------------------------------------------------------------------------------------------
def render_class(rng: np.random.Generator, size: int, cls: str, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Stain concentrations (C_H, C_E), each (size, size), of a full tile of ``cls`` in sub-style ``style``."""
    p = STYLES[cls][style]
    sc = size / REFERENCE_SIZE
    u = lambda lo_hi: rng.uniform(*lo_hi)  # noqa: E731
    e_level, h0 = u(p["E"]), u(p["H0"])
    c_e = e_level * (1.0 + p["E_var"] * smooth_noise(rng, size, 12 * sc) + 0.1 * smooth_noise(rng, size, 2 * sc))
    c_h = h0 * (1.0 + 0.3 * smooth_noise(rng, size, 6 * sc))

    flow = rng.uniform(0, np.pi)                                # main fibre direction
    wave_amp, wave_len = rng.uniform(2, 6) * sc, rng.uniform(45, 110) * sc
    if "fibres" in p:
        strength, across, wave = p["fibres"]
        streaks = smooth_noise(rng, size, (28 * sc, across * sc), flow)
        # waviness: sample the streaks at positions displaced across the fibres by a slow sinusoid
        rr, cc = (g.reshape(size, size) for g in _grid(size))
        along = cc * np.cos(flow) + rr * np.sin(flow)
        shift = wave * wave_amp * np.sin(2 * np.pi * along / wave_len) + 6 * sc * smooth_noise(rng, size, 12 * sc)
        streaks = ndimage.map_coordinates(streaks, [rr + shift * np.cos(flow), cc - shift * np.sin(flow)],
                                          order=1, mode="grid-wrap")
        c_e = c_e * np.clip(1.0 + strength * np.tanh(1.2 * streaks), 0.05, None)
    if p.get("grain"):
        speckle = smooth_noise(rng, size, 1.0 * sc)
        c_e = c_e * np.clip(1.0 + p["grain"] * speckle, 0.2, None)
        c_h = c_h + 0.04 * np.clip(speckle, 0, None)
    if p.get("holes"):
        # clefts: elongated along the fibres where there are fibres, round otherwise
        hole_sigma = (9 * sc, 2.5 * sc) if "fibres" in p else 5 * sc
        holes = _quantile_mask(smooth_noise(rng, size, hole_sigma, flow), p["holes"])
        soft = ndimage.gaussian_filter(holes.astype(float), 1.2 * sc)
        c_e, c_h = c_e * (1 - 0.85 * soft), c_h * (1 - 0.85 * soft)

    for pop in p["nuclei"]:
        centres = _centres(rng, pop, size, sc)
        n = len(centres)
        a = rng.uniform(*pop["r"], n) * sc
        b = a * rng.uniform(*pop["elong"], n)
        if pop["orient"] == "flow":  # along the local fibre direction (derivative of the sinusoidal wave)
            along = centres[:, 1] * np.cos(flow) + centres[:, 0] * np.sin(flow)
            slope = 2 * np.pi * wave_amp / wave_len * np.cos(2 * np.pi * along / wave_len) * p.get("fibres", (0, 0, 1))[2]
            angle = flow - np.arctan(slope) + rng.normal(0, 0.12, n)
        else:
            angle = rng.uniform(0, np.pi, n)
        blobs = render_blobs(rng, size, centres, a, b, angle, rng.uniform(*pop["inten"], n),
                             rng.uniform(*pop["ves"], n), pop["irr"])
        if pop["stain"] == "E":
            c_e = np.maximum(c_e, blobs * (1.0 + 0.3 * e_level))
        else:
            c_h = c_h + blobs
            c_e = c_e + 0.3 * blobs  # nuclei also take up some eosin: purple, not slate blue

    if p.get("borders"):  # faint cell membranes: edges of the Voronoi cells of the nuclei (TUM)
        lab = np.zeros((size, size), int)
        pts = np.clip(np.round(_centres(rng, {**_NUC, "place": "grid", "spacing": 18, "drop": 0.0}, size, sc)),
                      0, size - 1).astype(int)
        lab[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1)
        _, (ir, ic) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        cells = lab[ir, ic]
        edge = (cells != np.roll(cells, 1, 0)) | (cells != np.roll(cells, 1, 1))
        c_e = c_e + p["borders"] * ndimage.gaussian_filter(edge.astype(float), 0.7 * sc)
    return np.clip(c_h, 0, None), np.clip(c_e, 0, None)


# ----------------------------------------------------------------------------------------------------------------
# Layout and tile
# ----------------------------------------------------------------------------------------------------------------
def _layout(rng: np.random.Generator, size: int, n_regions: int, white_share: float) -> np.ndarray:
    """(size, size) int map: region index 0..n_regions-1 from a warped, weighted Voronoi diagram; -1 = glass."""
    sc = size / REFERENCE_SIZE
    rr, cc = np.mgrid[0:size, 0:size].astype(float)
    warp = 0.18 * size
    wr = rr + warp * smooth_noise(rng, size, 30 * sc)
    wc = cc + warp * smooth_noise(rng, size, 30 * sc)
    n_seeds = n_regions + int(rng.integers(0, 3)) if n_regions > 1 else 1
    seeds = rng.uniform(0, size, (n_seeds, 2))
    owner = np.concatenate([np.arange(n_regions), rng.integers(0, n_regions, n_seeds - n_regions)])
    bias = rng.uniform(-0.15, 0.15, n_seeds) * size          # additively weighted Voronoi: unequal areas
    d = np.sqrt((wr[None] - seeds[:, 0, None, None]) ** 2 + (wc[None] - seeds[:, 1, None, None]) ** 2)
    region = owner[np.argmin(d + bias[:, None, None], axis=0)]
    if white_share > 0:
        # glass: a smooth blob field plus a random gradient, so glass often touches the tile edge (tissue border)
        g = smooth_noise(rng, size, 25 * sc) + rng.uniform(0, 2.0) * (
            (rr - size / 2) * np.cos(t := rng.uniform(0, 2 * np.pi)) + (cc - size / 2) * np.sin(t)) / size * 2
        region[_quantile_mask(g, white_share)] = -1
    return region


def _draw_classes(rng: np.random.Generator, white_share: float | None) -> tuple[list[str], float | None]:
    """Classes of a tile drawn from the dataset's mix (a few single-class tiles are mostly white glass)."""
    if rng.random() < P_MOSTLY_WHITE:
        n, white_share = 1, rng.uniform(0.62, 0.85) if white_share is None else white_share
    else:
        n = int(rng.choice([1, 2, 3], p=N_CLASSES_P))
    return [CLASSES[i] for i in sorted(rng.choice(len(CLASSES), n, replace=False, p=CLASS_WEIGHTS))], white_share


def _draw_styles(rng: np.random.Generator, classes: Sequence[str], styles: dict[str, str] | None) -> dict[str, str]:
    """Class -> sub-style: the given ones (checked), the others drawn uniformly."""
    styles = dict(styles or {})
    for c in classes:
        if c not in styles:
            styles[c] = str(rng.choice(list(STYLES[c])))
        elif styles[c] not in STYLES[c]:
            raise PBIPError(f"render_tile: unknown sub-style {styles[c]!r} for {c}; choose from {list(STYLES[c])}")
    return styles


def _label_mask(rng: np.random.Generator, size: int, classes: Sequence[str], white_share: float,
                min_area_share: float) -> tuple[np.ndarray, list[int]]:
    """The tile's class-index mask (4 = glass) and its present classes; classes below ``min_area_share`` are merged
    into their nearest remaining class, so the label equals the classes in the mask."""
    region = _layout(rng, size, len(classes), float(white_share))
    idx = np.array([CLASSES.index(c) for c in classes])
    mask = np.where(region >= 0, idx[np.clip(region, 0, None)], BACKGROUND_INDEX).astype(np.uint8)
    shares = np.bincount(mask.ravel(), minlength=BACKGROUND_INDEX + 1) / mask.size
    small = [i for i in idx if shares[i] < min_area_share]
    keep = [i for i in idx if shares[i] >= min_area_share]
    if small and keep:
        tissue_ok = np.isin(mask, keep)
        _, (ir, ic) = ndimage.distance_transform_edt(~tissue_ok, return_indices=True)
        fill = np.isin(mask, small)
        mask[fill] = mask[ir[fill], ic[fill]]
    elif small:  # every class is tiny: the tile is glass with a little tissue; keep the largest class
        top = idx[np.argmax(shares[idx])]
        mask[(mask != BACKGROUND_INDEX)] = top
        keep = [top]
    return mask, sorted(set(int(i) for i in keep))


def _stain_image(rng: np.random.Generator, size: int, mask: np.ndarray, present: Sequence[int],
                 styles: dict[str, str]) -> np.ndarray:
    """RGB (size, size, 3) uint8: each class's stain concentrations composited through the mask (OD is additive, so
    compositing concentrations is exact), slide-level stain vectors and gain, Beer-Lambert to colour."""
    sc = size / REFERENCE_SIZE
    c_h = np.zeros((size, size), np.float32)
    c_e = np.zeros((size, size), np.float32)
    for i in present:
        h, e = render_class(rng, size, CLASSES[i], styles[CLASSES[i]])
        sel = mask == i
        c_h[sel], c_e[sel] = h[sel], e[sel]
    glass = mask == BACKGROUND_INDEX
    c_e[glass] = 0.02 * np.clip(smooth_noise(rng, size, 4 * sc), 0, None)[glass]   # faint debris on glass
    stains = _stain_vectors(rng).astype(np.float32)                                 # slide-level variation
    gain = rng.uniform(0.85, 1.15)
    c_h = ndimage.gaussian_filter(c_h, 0.5 * sc)   # optical blur
    c_e = ndimage.gaussian_filter(c_e, 0.5 * sc)
    od = gain * (c_h[..., None] * stains[0] + c_e[..., None] * stains[1])
    od += rng.uniform(0.02, 0.05) + 0.004 * smooth_noise(rng, size, 0.6)[..., None]  # glass 240-250, faint noise
    rgb = 255.0 * np.exp(-od) + 1.5 * smooth_noise(rng, size, 0.5)[..., None]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def render_tile(rng: np.random.Generator, size: int = 224, classes: Sequence[str] | None = None,
                styles: dict[str, str] | None = None, white_share: float | None = None,
                min_area_share: float = MIN_AREA_SHARE) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one synthetic H&E tile.

    Args:
        rng: the tile's own generator (everything random is drawn from it).
        size: tile side in pixels (lengths of :data:`STYLES` are scaled by size / 224).
        classes: classes to place (names from :data:`CLASSES`); None draws 1-3 of them.
        styles: class -> sub-style name; missing classes draw a sub-style uniformly.
        white_share: share of glass; None draws it (70 %: none, else 5-40 %; mostly-white tiles: 60-85 %).
        min_area_share: classes covering less of the tile are merged into neighbouring classes.

    Returns:
        rgb (size, size, 3) uint8; mask (size, size) uint8 with class indices 0..3 and 4 = glass;
        meta: ``classes`` (present, in class order), ``label`` (0/1 list over CLASSES), ``styles``
        (class -> sub-style, present classes), ``shares`` (class -> area share), ``background_share``.
    """
    if classes is None:
        classes, white_share = _draw_classes(rng, white_share)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes:
        raise PBIPError(f"render_tile: classes must be a non-empty subset of {list(CLASSES)}, got {list(classes)}")
    if white_share is None:
        white_share = rng.uniform(0.05, 0.40) if rng.random() < P_WHITE else 0.0
    styles = _draw_styles(rng, classes, styles)
    mask, present = _label_mask(rng, size, classes, float(white_share), min_area_share)
    rgb = _stain_image(rng, size, mask, present, styles)
    counts = np.bincount(mask.ravel(), minlength=BACKGROUND_INDEX + 1) / mask.size
    names = [CLASSES[i] for i in present]
    meta = {
        "classes": names,
        "label": [int(i in present) for i in range(len(CLASSES))],
        "styles": {c: styles[c] for c in names},
        "shares": {c: float(counts[i]) for i, c in enumerate(CLASSES)},
        "background_share": float(counts[BACKGROUND_INDEX]),
    }
    return rgb, mask, meta


def _stain_vectors(rng: np.random.Generator) -> np.ndarray:
    """(2, 3) unit OD vectors (H, E) for one tile: a random mix of Ruifrok-Johnston and Macenko references."""
    t = rng.uniform(0.3, 1.0)
    v = (1 - t) * RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True) + t * MACENKO / np.linalg.norm(
        MACENKO, axis=1, keepdims=True)
    v = v + rng.normal(0, 0.02, v.shape)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def tile_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of tile ``index`` of ``split``: depends on (seed, split, index) only, not on workers."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


# ----------------------------------------------------------------------------------------------------------------
# Writing a dataset folder
# ----------------------------------------------------------------------------------------------------------------
def label_string(label: Sequence[int]) -> str:
    """``[1, 0, 1, 0]`` -> ``'[1 0 1 0]'`` (the BCSS-WSSS / LUAD-HistoSeg file-name convention)."""
    return "[" + " ".join(str(int(v)) for v in label) + "]"


def _save_rgb(rgb: np.ndarray, path: Path) -> None:
    """Atomic RGB PNG at zlib level 1: 4x faster than PIL's default for noisy tiles, ~4 % larger."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG", compress_level=1)


def _tile_job(job: tuple[str, int, int, int, str]) -> dict[str, Any]:
    """Render and write one tile; returns its meta.csv row."""
    split, index, seed, size, out = job
    rgb, mask, meta = render_tile(tile_rng(seed, split, index), size)
    root = Path(out)
    if split == "train":
        name = f"train_{index:05d}-{label_string(meta['label'])}.png"
        _save_rgb(rgb, root / "train" / name)
        save_png(mask, root / "train_mask" / name, PALETTE)
    else:
        name = f"{split}_{index:05d}.png"
        _save_rgb(rgb, root / split / "img" / name)
        save_png(mask, root / split / "mask" / name, PALETTE)
    row: dict[str, Any] = {"name": name, "split": split, "label": label_string(meta["label"])[1:-1],
                           "classes": "+".join(meta["classes"]), "n_classes": len(meta["classes"])}
    for c in CLASSES:
        row[f"style_{c}"] = meta["styles"].get(c, "")
    for c in CLASSES:
        row[f"share_{c}"] = f"{meta['shares'][c]:.4f}"
    row["share_background"] = f"{meta['background_share']:.4f}"
    return row


def _check_args(out: Path, seed: int, size: int, counts: dict[str, int], workers: int, overwrite: bool) -> None:
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise PBIPError(f"pbip synth: --n-{name} must be a non-negative integer, got {n!r}")
    if sum(counts.values()) == 0:
        raise PBIPError("pbip synth: nothing to write (all of --n-train, --n-val, --n-test are 0)")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise PBIPError(f"pbip synth: --size must be an integer >= 32 pixels, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PBIPError(f"pbip synth: --seed must be a non-negative integer, got {seed!r}")
    if workers < 0:
        raise PBIPError(f"pbip synth: --workers must be >= 0 (0 = all CPU cores), got {workers}")
    if out.exists() and not out.is_dir():
        raise PBIPError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PBIPError(f"{out}: folder exists and is not empty; pass --overwrite or choose another --out")
        if not (out / MARKER).exists():
            raise PBIPError(f"{out}: not empty and not written by `pbip synth` (no {MARKER}); refusing to overwrite")


def generate(out: str | Path, seed: int = 0, size: int = 224, n_train: int = 1000, n_val: int = 100,
             n_test: int = 200, workers: int = 1, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the synthetic dataset folder ``out`` (layout in the module docstring) and return its path.

    ``workers`` > 1 renders tiles in that many processes (0 = all CPU cores); the bytes written do not depend on
    it. With ``overwrite``, a folder previously written by this function is emptied first; any other non-empty
    folder is refused.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(out, seed, size, counts, workers, overwrite)
    if out.is_dir() and any(out.iterdir()):
        (out / "dataset.yaml").unlink(missing_ok=True)  # first, so the folder never looks complete meanwhile
        for entry in ("train", "train_mask", "val", "test", "meta.csv"):
            p = out / entry
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, f"pbip synth {GENERATOR_VERSION}\n")
    for d in ("train", "train_mask", "val/img", "val/mask", "test/img", "test/mask"):
        (out / d).mkdir(parents=True, exist_ok=True)

    jobs = [(split, i, int(seed), int(size), str(out)) for split, n in counts.items() for i in range(n)]
    workers = workers or (os.cpu_count() or 1)
    bar = dict(total=len(jobs), desc="pbip synth", unit="tile", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(min(workers, len(jobs))) as pool:
            rows = list(tqdm(pool.imap(_tile_job, jobs, chunksize=8), **bar))
    else:
        rows = [_tile_job(j) for j in tqdm(jobs, **bar)]

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "meta.csv", buf.getvalue())
    atomic_write_text(out / "dataset.yaml", dataset_yaml(seed, size, counts))
    return out


def dataset_yaml(seed: int, size: int, counts: dict[str, int]) -> str:
    """Text of ``dataset.yaml`` (DESIGN.md keys first, then description and generator settings)."""
    doc = {
        "name": "synth",
        "classes": list(CLASSES),
        "background_index": BACKGROUND_INDEX,
        "palette": [list(c) for c in PALETTE],
        "description": DESCRIPTION,
        "generator": {"module": "pbip_core.data.synth", "version": GENERATOR_VERSION, "seed": int(seed),
                      "size": int(size), "n_train": int(counts["train"]), "n_val": int(counts["val"]),
                      "n_test": int(counts["test"]), "min_area_share": MIN_AREA_SHARE},
        "sub_styles": {c: list(STYLES[c]) for c in CLASSES},
        "confusable": [list(p) for p in CONFUSABLE],
        "extras": {"train_mask": "pixel masks of train/ (same names); hidden from weak supervision",
                   "meta": "meta.csv: name, split, label, classes, style_<class>, share_<class>, share_background"},
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------------------------------------------------
# Command line: pbip synth
# ----------------------------------------------------------------------------------------------------------------
