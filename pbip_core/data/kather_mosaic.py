"""``kather-mosaic``: a built-in dataset of real H&E tissue, composed from Kather et al. (2016) texture tiles.

The tiles are real colorectal-cancer H&E textures, 150 x 150 px at 0.495 um/px (20x), from Kather JN, Weis CA,
Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A, Zoellner FG, "Multi-class texture analysis in colorectal
cancer histology", Scientific Reports 6:27988 (2016); data: Zenodo doi:10.5281/zenodo.53169, CC BY 4.0. A subset
(30 tiles per class) ships inside the package (``pbip_core/data/assets/kather2016/``, lossless WebP of the original
TIFs, with ``ATTRIBUTION.md``, ``SHA256SUMS`` and ``tiles.csv``); nothing is read from outside the package.

Classes: the four classes of BCSS-WSSS, in its order and palette (DESIGN.md)::

    0 TUM <- 01_tumor     1 STR <- 02_stroma     2 LYM <- 04_lympho     3 NEC <- 05_debris (debris/necrosis)
    4 background (white) <- 07_adipose (ADI) and 08_empty (EMP, bare glass): background texture, not a class

Folder layout: exactly as :mod:`pbip_core.data.synth` (DESIGN.md, "Dataset folder format")::

    DIR/train/train_00012-[1 0 1 0].png        image-level label in the name (order TUM STR LYM NEC)
    DIR/train_mask/train_00012-[1 0 1 0].png   pixel masks of train/ (hidden from weak supervision)
    DIR/val/img/val_00003.png   DIR/val/mask/val_00003.png   DIR/test/img/...   DIR/test/mask/...
    DIR/meta.csv        per image: split, classes, source tile and area share of every region
    DIR/dataset.yaml    name kather-mosaic, classes, background_index 4, palette, citation, slide split, settings

``dataset.yaml`` is written last and the whole folder is built in a temporary sibling folder that is renamed into
place at the end, so a folder named ``out`` is always complete.

Split by slide
--------------
A tile's slide is the ``CRC-Prim-HE-NN`` part of its file name. Each slide goes to exactly one split, so no tile
and no slide is seen in two splits (within a split tiles are reused across images). :func:`slide_split` chooses the
assignment of the 10 slides by an exhaustive search over all 3^10 = 59049 assignments, computed from the shipped
tiles (nothing hard-coded). Constraints: val and test each hold >= ``MIN_EVAL_TILES`` = 5 tiles (one sixth of
the 30) of every tissue class, train holds >= 1 of every tissue class, and every split holds >= 1
background-texture tile (dropped only if infeasible). Objective, lexicographic (maximise): (1) tissue tiles in train,
(2) the smallest per-class tissue count in train, (3) the smallest per-class tissue count in test, (4) tissue tiles
in test (test is the larger evaluation split by default), (5) background tiles in train; remaining ties go to the
first assignment in lexicographic order of the sorted slide ids (train < val < test). The result for the shipped
subset (tiles per texture)::

    split   TUM STR LYM NEC | ADI EMP   slides
    train    12  17  15  13 |  20  28   CRC-Prim-HE-02, CRC-Prim-HE-03, CRC-Prim-HE-05, CRC-Prim-HE-06, CRC-Prim-HE-08
    val      11   5   5   5 |   6   2   CRC-Prim-HE-07, CRC-Prim-HE-09, CRC-Prim-HE-10
    test      7   8  10  12 |   4   0   CRC-Prim-HE-01, CRC-Prim-HE-04

NEC lives almost only in slides 04 and 08 and bare glass almost only in slide 06, which is why these three decide
most of the split; test has adipose but no bare-glass tiles (only slides 06 and 10 have any).

How an image is composed (:func:`render_mosaic`)
------------------------------------------------
1. Classes: 1-4 tissue classes, P(1, 2, 3, 4) = :data:`N_CLASSES_P`, drawn with weights :data:`CLASS_WEIGHTS`
   (TUM and STR dominate, as in BCSS-WSSS). A single-class image has 2-3 regions, a class of a multi-class image
   1-2, every region filled from a different tile of its class, so a single-class image is not one tile.
2. Layout: a Voronoi diagram of the region seeds with coordinates warped by smooth noise and additive weights
   (irregular, natural-looking boundaries, no grid), as in :mod:`pbip_core.data.synth`. With probability
   :data:`P_BACKGROUND` a background-texture region (adipose or bare glass, mask value 4) covering 5-35 % is cut out
   of a smooth field with a random gradient, so it often touches the image edge like a tissue border.
3. Classes covering less than :data:`MIN_AREA_SHARE` (3 %) of the image are merged into the nearest other region,
   so the image-level label is exactly the set of tissue classes in the mask. About 35-38 % of the images end up
   single-class (the paper's image bank, sec. 3.2, uses single-class training images only).
4. Texture: each region shows its tile under a random dihedral transform (8 flips/rotations) and a random crop;
   at the default size 150 a region shows the whole tile at its native resolution. Nothing is ever rescaled: for
   ``size`` < 150 the crop is smaller; for ``size`` > 150 a region's texture is a patchwork of several tiles of its
   class laid on a grid with 8 px linear cross-fades at the seams (seams inside a region of one class). Region
   boundaries are feathered in the image by a Gaussian of sigma :data:`FEATHER_SIGMA` (1.5 px); masks stay hard.

Every image has its own ``numpy`` generator seeded from ``(seed, split, index)``, so the bytes written depend on
the seed (and the other arguments) only.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..io import atomic_write_text, save_png
from .staging import staged_folder
from .synth import _quantile_mask, _save_rgb, label_string, smooth_noise

NAME = "kather-mosaic"
GENERATOR_VERSION = "1.0"
CLASSES: tuple[str, ...] = ("TUM", "STR", "LYM", "NEC")
BACKGROUND_INDEX = 4
PALETTE: list[tuple[int, int, int]] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]
# texture code -> the class folder of the original release
TEXTURE_DIRS: dict[str, str] = {"TUM": "01_tumor", "STR": "02_stroma", "LYM": "04_lympho", "NEC": "05_debris",
                                "ADI": "07_adipose", "EMP": "08_empty"}
BACKGROUND_TEXTURES: tuple[str, ...] = ("ADI", "EMP")
TEXTURES: tuple[str, ...] = CLASSES + BACKGROUND_TEXTURES
TILE_SIZE = 150                 # px, native size of the Kather 2016 tiles
MICRONS_PER_PIXEL = 0.495
MIN_AREA_SHARE = 0.03           # a class is in an image's label iff it covers >= 3 % of it
N_CLASSES_P = (0.34, 0.33, 0.23, 0.10)   # P(1, 2, 3, 4 tissue classes) before small classes are merged
CLASS_WEIGHTS = (0.30, 0.30, 0.20, 0.20)
P_BACKGROUND = 0.35             # images with a background-texture region
BACKGROUND_SHARE = (0.05, 0.35)
FEATHER_SIGMA = 1.5             # px, blend at region boundaries (image only)
SEAM_OVERLAP = 8                # px, cross-fade between tiles of a patchwork (size > 150 only)
MIN_EVAL_TILES = 5              # tiles of every tissue class required in val and in test
SPLITS = {"train": 0, "val": 1, "test": 2}
MARKER = ".pbip-kather-mosaic"
SLIDE_RE = re.compile(r"CRC-Prim-HE-\d+")

CITATION = (
    "Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A, Zoellner FG. Multi-class texture "
    "analysis in colorectal cancer histology. Scientific Reports 6, 27988 (2016). doi:10.1038/srep27988. Data: "
    "Zenodo doi:10.5281/zenodo.53169 (Kather_texture_2016_image_tiles_5000), CC BY 4.0."
)
DESCRIPTION = (
    "Real H&E tissue composed from Kather et al. (2016) colorectal-cancer texture tiles (150 x 150 px, 0.495 um/px; "
    "CC BY 4.0; subset of 30 tiles per class shipped in pbip_core/data/assets/kather2016). Classes as BCSS-WSSS: "
    "TUM (01_tumor), STR (02_stroma), LYM (04_lympho), NEC (05_debris); adipose (07_adipose) and bare glass "
    "(08_empty) are background texture (index 4). Images hold 1-4 classes in irregular regions (warped Voronoi "
    "layout), every region filled from a different real tile (random flip/rotation, no rescaling); boundaries are "
    "feathered in the image, masks are hard. A class is in an image's label iff it covers >= 3% of it. Splits are "
    "by slide (CRC-Prim-HE-NN): no tile and no slide in two splits. train_mask/ holds pixel masks of the train "
    "images: hidden from weak supervision, only for measuring pseudo-mask quality. meta.csv lists the source tile "
    "and area share of every region."
)


# ----------------------------------------------------------------------------------------------------------------
# Assets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One shipped tile: ``file`` is relative to the asset folder (``01_tumor/<original stem>.webp``)."""

    file: str
    texture: str        # TUM STR LYM NEC ADI EMP
    slide: str          # CRC-Prim-HE-NN
    original: str       # the file name in the original release (.tif)
    pixel_sha256: str   # sha256 of the original TIF's pixels (150 x 150 x 3 uint8, C order)


def asset_root() -> Any:
    """The shipped asset folder (an ``importlib.resources`` Traversable; a ``Path`` for normal installs)."""
    return resources.files(__package__) / "assets" / "kather2016"


def slide_of(name: str) -> str:
    """``'10009_CRC-Prim-HE-03_009.tif_Row_301_Col_151.tif'`` -> ``'CRC-Prim-HE-03'``."""
    m = SLIDE_RE.search(name)
    if m is None:
        raise DataError(f"{name}: no slide id CRC-Prim-HE-NN in the tile name")
    return m.group(0)


def pixel_sha256(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _tiles() -> tuple[Tile, ...]:
    """The tile index ``tiles.csv`` of the shipped assets."""
    root = asset_root()
    try:
        text = (root / "tiles.csv").read_text()
    except FileNotFoundError:
        raise DataError(f"{root}/tiles.csv: missing; the Kather 2016 assets of pbip_core are not installed") from None
    tiles = []
    for row in csv.DictReader(io.StringIO(text)):
        tiles.append(Tile(row["file"], row["texture"], row["slide"], row["original"], row["pixel_sha256"]))
    return tuple(tiles)


@functools.lru_cache(maxsize=1)
def _sha256sums() -> dict[str, str]:
    lines = (asset_root() / "SHA256SUMS").read_text().splitlines()
    return {name.strip(): digest for digest, name in (ln.split(None, 1) for ln in lines if ln.strip())}


def read_tile(tile: Tile | str) -> np.ndarray:
    """(150, 150, 3) uint8 RGB of a shipped tile, checked against ``SHA256SUMS``."""
    from PIL import Image, UnidentifiedImageError

    name = tile.file if isinstance(tile, Tile) else str(tile)
    ref = asset_root() / name
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{ref}: shipped Kather 2016 tile missing") from None
    if hashlib.sha256(data).hexdigest() != _sha256sums().get(name):
        raise DataError(f"{ref}: checksum differs from SHA256SUMS (corrupt or modified asset)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{ref}: cannot decode ({type(e).__name__}: {e}); this Pillow may lack WebP support") from None


@functools.lru_cache(maxsize=1)
def _tile_arrays() -> dict[str, np.ndarray]:
    return {t.file: read_tile(t) for t in _tiles()}


# ----------------------------------------------------------------------------------------------------------------
# Split by slide
# ----------------------------------------------------------------------------------------------------------------
def search_slide_split(counts: np.ndarray, min_eval_tiles: int = MIN_EVAL_TILES, n_tissue: int = len(CLASSES)
                       ) -> np.ndarray:
    """Exhaustive search of slide -> split (0 train, 1 val, 2 test); see the module docstring for the rule.

    ``counts`` (S, T) tiles per slide and texture, the first ``n_tissue`` columns tissue classes, the rest background
    textures. Returns (S,) split codes. Raises :class:`DataError` if no assignment meets the tissue constraints.
    """
    counts = np.asarray(counts, dtype=np.int64)
    s = counts.shape[0]
    if s > 14:
        raise DataError(f"search_slide_split: {s} slides make 3^{s} assignments; too many for an exhaustive search")
    codes = np.arange(3**s)
    assign = (codes[:, None] // 3 ** np.arange(s - 1, -1, -1)[None, :]) % 3      # lexicographic order of codes
    per = np.stack([(assign == k).astype(np.int64) @ counts for k in range(3)], axis=1)   # (A, 3, T)
    tissue, bg = per[:, :, :n_tissue], per[:, :, n_tissue:].sum(-1)
    ok = (tissue[:, 0] >= 1).all(-1) & (tissue[:, 1:] >= min_eval_tiles).all((-1, -2))
    if not ok.any():
        raise DataError(f"no split of the {s} slides gives val and test >= {min_eval_tiles} tiles of every class")
    with_bg = ok & (bg >= 1).all(-1)
    if with_bg.any():
        ok = with_bg
    keys = [   # np.lexsort: last key is primary; all negated so the first index is the best
        codes,
        -bg[:, 0],
        -tissue[:, 2].sum(-1),
        -tissue[:, 2].min(-1),
        -tissue[:, 0].min(-1),
        -tissue[:, 0].sum(-1),
        ~ok,
    ]
    return assign[np.lexsort(keys)[0]]


@functools.lru_cache(maxsize=4)
def _split_of_slides(min_eval_tiles: int = MIN_EVAL_TILES) -> dict[str, str]:
    slides = sorted({t.slide for t in _tiles()})
    counts = np.zeros((len(slides), len(TEXTURES)), np.int64)
    for t in _tiles():
        counts[slides.index(t.slide), TEXTURES.index(t.texture)] += 1
    assign = search_slide_split(counts, min_eval_tiles)
    return {sl: list(SPLITS)[int(a)] for sl, a in zip(slides, assign)}


def slide_split(min_eval_tiles: int = MIN_EVAL_TILES) -> dict[str, list[str]]:
    """``{'train': [slide ids], 'val': [...], 'test': [...]}`` chosen by :func:`search_slide_split`."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for slide, split in _split_of_slides(min_eval_tiles).items():
        out[split].append(slide)
    return out


def source_tiles():
    """A ``pandas.DataFrame``, one row per shipped tile: file, path, texture, class_dir, kind, mask_index, slide,
    split, original (the release's file name), pixel_sha256."""
    import pandas as pd

    split = _split_of_slides()
    root = asset_root()
    rows = []
    for t in _tiles():
        tissue = t.texture in CLASSES
        rows.append({"file": t.file, "path": str(root / t.file), "texture": t.texture,
                     "class_dir": TEXTURE_DIRS[t.texture], "kind": "tissue" if tissue else "background",
                     "mask_index": CLASSES.index(t.texture) if tissue else BACKGROUND_INDEX,
                     "slide": t.slide, "split": split[t.slide], "original": t.original,
                     "pixel_sha256": t.pixel_sha256})
    return pd.DataFrame(rows)


def tiles_per_split() -> dict[str, dict[str, int]]:
    """``{split: {texture: number of tiles}}`` for the slide split."""
    split = _split_of_slides()
    out = {s: {x: 0 for x in TEXTURES} for s in SPLITS}
    for t in _tiles():
        out[split[t.slide]][t.texture] += 1
    return out


@functools.lru_cache(maxsize=4)
def _pools(split: str) -> dict[str, tuple[tuple[str, np.ndarray], ...]]:
    """texture -> ((file, rgb), ...) of the tiles of ``split``, sorted by file."""
    of = _split_of_slides()
    arrays = _tile_arrays()
    pools: dict[str, list] = {x: [] for x in TEXTURES}
    for t in sorted(_tiles(), key=lambda t: t.file):
        if of[t.slide] == split:
            pools[t.texture].append((t.file, arrays[t.file]))
    return {x: tuple(v) for x, v in pools.items()}


# ----------------------------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------------------------
def _layout(rng: np.random.Generator, size: int, n_regions: int, bg_share: float) -> np.ndarray:
    """(size, size) int region map 0..n_regions-1 from a warped, additively weighted Voronoi diagram; -1 marks the
    background-texture region (``bg_share`` of the pixels, 0 for none)."""
    sc = size / TILE_SIZE
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = 0.18 * size
    wr = rr + warp * smooth_noise(rng, size, 20 * sc)
    wc = cc + warp * smooth_noise(rng, size, 20 * sc)
    seeds = rng.uniform(0, size, (n_regions, 2)).astype(np.float32)
    bias = (rng.uniform(-0.12, 0.12, n_regions) * size).astype(np.float32)   # unequal areas
    best = np.full((size, size), np.inf, np.float32)
    region = np.zeros((size, size), np.int64)
    for k in range(n_regions):
        d = np.hypot(wr - seeds[k, 0], wc - seeds[k, 1]) + bias[k]
        closer = d < best
        best[closer], region[closer] = d[closer], k
    if bg_share > 0:
        t = rng.uniform(0, 2 * np.pi)
        g = smooth_noise(rng, size, 17 * sc) + rng.uniform(0, 2.0) * (
            (rr - size / 2) * np.cos(t) + (cc - size / 2) * np.sin(t)) / size * 2
        region[_quantile_mask(g, bg_share)] = -1
    return region


def _dihedral(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    out = np.rot90(rgb, k)
    return out[:, ::-1] if flip else out


def _ramp(n: int, overlap: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float32) + 0.5
    return np.minimum(1.0, np.minimum(i, n - i) / overlap)


def _texture(rng: np.random.Generator, first: np.ndarray, pool: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(size, size, 3) float32 texture of one region, never rescaled.

    size <= 150: a random crop of ``first`` under a random dihedral transform. size > 150: a grid patchwork of
    ``first`` and other tiles of ``pool`` (each transformed) with linear cross-fades of SEAM_OVERLAP px at the seams,
    randomly offset and cropped.
    """
    t = TILE_SIZE
    if size <= t:
        y, x = rng.integers(0, t - size + 1, 2)
        return _dihedral(rng, first)[y:y + size, x:x + size].astype(np.float32)
    step = t - SEAM_OVERLAP
    n = -(-(size + step) // step) + 1
    span = (n - 1) * step + t
    num = np.zeros((span, span, 3), np.float32)
    den = np.zeros((span, span, 1), np.float32)
    w = _ramp(t, SEAM_OVERLAP)
    w2 = (w[:, None] * w[None, :])[..., None]
    order = rng.permutation(len(pool))
    for j, (a, b) in enumerate(itertools.product(range(n), range(n))):
        tile = first if j == 0 else pool[order[(j - 1) % len(pool)]]
        num[a * step:a * step + t, b * step:b * step + t] += _dihedral(rng, tile) * w2
        den[a * step:a * step + t, b * step:b * step + t] += w2
    y, x = rng.integers(0, span - size + 1, 2)
    return (num / den)[y:y + size, x:x + size]


def render_mosaic(rng: np.random.Generator, pools: dict[str, Sequence[tuple[str, np.ndarray]]], size: int = TILE_SIZE,
                  min_area_share: float = MIN_AREA_SHARE) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Compose one image from the tiles in ``pools`` (texture -> ((file, rgb), ...)); see the module docstring.

    Returns rgb (size, size, 3) uint8; mask (size, size) uint8 with 0..3 (TUM STR LYM NEC) and 4 (background
    texture); meta with ``classes``, ``label``, ``shares`` (class -> area share), ``background_share``,
    ``background_texture`` and ``regions`` (list of (texture, tile file, area share)).
    """
    available = [i for i, c in enumerate(CLASSES) if pools.get(c)]
    if not available:
        raise DataError("render_mosaic: no tissue tiles in the pools")
    p = np.array([CLASS_WEIGHTS[i] for i in available])
    n = min(int(rng.choice(len(N_CLASSES_P), p=N_CLASSES_P)) + 1, len(available))
    classes = sorted(int(c) for c in rng.choice(available, n, replace=False, p=p / p.sum()))
    per_class = [int(rng.integers(2, 4)) if n == 1 else int(rng.integers(1, 3)) for _ in classes]
    region_class = np.repeat(classes, per_class)                      # class index of every region
    bg_pool = [x for x in BACKGROUND_TEXTURES for _ in pools.get(x, ())]
    bg_share = float(rng.uniform(*BACKGROUND_SHARE)) if bg_pool and rng.random() < P_BACKGROUND else 0.0
    region = _layout(rng, size, len(region_class), bg_share)

    # merge classes below the area threshold into the nearest pixel of another region (or the background texture)
    cls_map = np.where(region >= 0, region_class[np.clip(region, 0, None)], BACKGROUND_INDEX)
    shares = np.bincount(cls_map.ravel(), minlength=BACKGROUND_INDEX + 1) / cls_map.size
    small = [c for c in classes if shares[c] < min_area_share]
    if len(small) == len(classes):                                    # cannot happen with bg <= 35 %; be safe
        small.remove(max(classes, key=lambda c: shares[c]))
    if small:
        fill = np.isin(cls_map, small)
        _, (ir, ic) = ndimage.distance_transform_edt(fill, return_indices=True)
        region[fill] = region[ir[fill], ic[fill]]

    # one different tile per region of a class (the pools hold >= 5 tiles of every class in every split)
    tile_of: dict[int, tuple[str, np.ndarray]] = {}
    for c in classes:
        ids = np.flatnonzero(region_class == c)
        pool = pools[CLASSES[c]]
        picks = rng.choice(len(pool), len(ids), replace=len(ids) > len(pool))
        for r, k in zip(ids, picks):
            tile_of[int(r)] = pool[int(k)]
    if bg_share > 0:
        texture = bg_pool[int(rng.integers(len(bg_pool)))]
        tile_of[-1] = pools[texture][int(rng.integers(len(pools[texture])))]

    present = [int(r) for r in np.unique(region)]
    rgb = np.zeros((size, size, 3), np.float32)
    weights = []
    for r in present:
        w = ndimage.gaussian_filter((region == r).astype(np.float32), FEATHER_SIGMA) if len(present) > 1 else None
        weights.append(w)
    total = np.sum(weights, axis=0) if len(present) > 1 else None
    regions_meta = []
    for r, w in zip(present, weights):
        file, tile = tile_of[r]
        tex = CLASSES[region_class[r]] if r >= 0 else _texture_of_file(file)
        pool = [a for _, a in pools[tex]]
        texture = _texture(rng, tile, pool, size)
        rgb += texture if w is None else texture * (w / total)[..., None]
        regions_meta.append((tex, file, float((region == r).mean())))
    rgb8 = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    mask = np.where(region >= 0, region_class[np.clip(region, 0, None)], BACKGROUND_INDEX).astype(np.uint8)
    counts = np.bincount(mask.ravel(), minlength=BACKGROUND_INDEX + 1) / mask.size
    present_cls = [c for c in range(len(CLASSES)) if counts[c] > 0]
    meta = {
        "classes": [CLASSES[c] for c in present_cls],
        "label": [int(c in present_cls) for c in range(len(CLASSES))],
        "shares": {c: float(counts[i]) for i, c in enumerate(CLASSES)},
        "background_share": float(counts[BACKGROUND_INDEX]),
        "background_texture": _texture_of_file(tile_of[-1][0]) if -1 in present else "",
        "regions": regions_meta,
    }
    return rgb8, mask, meta


def _texture_of_file(file: str) -> str:
    folder = file.split("/", 1)[0]
    return next(x for x, d in TEXTURE_DIRS.items() if d == folder)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: depends on (seed, split, index) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x6B617468, SPLITS[split], int(index)]))


# ----------------------------------------------------------------------------------------------------------------
# A dataset folder
# ----------------------------------------------------------------------------------------------------------------
def _check_args(seed: Any, size: Any, counts: dict[str, Any]) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name, n in counts.items():
        if not is_int(n) or n < 0:
            raise DataError(f"kather-mosaic: n_{name} must be a non-negative integer, got {n!r}")
    if sum(counts.values()) == 0:
        raise DataError("kather-mosaic: nothing to write (n_train, n_val and n_test are all 0)")
    if not is_int(size) or not 32 <= size <= 4096:
        raise DataError(f"kather-mosaic: size must be an integer from 32 to 4096 pixels, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise DataError(f"kather-mosaic: seed must be a non-negative integer, got {seed!r}")


def _image_row(split: str, index: int, seed: int, size: int, root: Path) -> dict[str, Any]:
    rgb, mask, meta = render_mosaic(image_rng(seed, split, index), _pools(split), size)
    if split == "train":
        name = f"train_{index:05d}-{label_string(meta['label'])}.png"
        _save_rgb(rgb, root / "train" / name)
        save_png(mask, root / "train_mask" / name, PALETTE)
    else:
        name = f"{split}_{index:05d}.png"
        _save_rgb(rgb, root / split / "img" / name)
        save_png(mask, root / split / "mask" / name, PALETTE)
    regions = meta["regions"]
    row: dict[str, Any] = {"name": name, "split": split, "label": label_string(meta["label"])[1:-1],
                           "classes": "+".join(meta["classes"]), "n_classes": len(meta["classes"])}
    for c in CLASSES:
        row[f"share_{c}"] = f"{meta['shares'][c]:.4f}"
    row["share_background"] = f"{meta['background_share']:.4f}"
    row["background_texture"] = meta["background_texture"]
    row["region_textures"] = ";".join(r[0] for r in regions)
    row["region_tiles"] = ";".join(r[1] for r in regions)
    row["region_shares"] = ";".join(f"{r[2]:.4f}" for r in regions)
    row["slides"] = ";".join(sorted({slide_of(r[1]) for r in regions}))
    return row


def generate_kather_mosaic(out: str | Path, seed: int = 0, size: int = TILE_SIZE, n_train: int = 600,
                           n_val: int = 60, n_test: int = 100, overwrite: bool = False, progress: bool = False
                           ) -> Path:
    """Write the ``kather-mosaic`` dataset folder ``out`` (layout in the module docstring) and return its path.

    Same ``seed`` and arguments -> same bytes. The folder is built next to ``out`` and renamed into place at the
    end. With ``overwrite`` a folder previously written by this function is replaced; any other non-empty folder is
    refused (:class:`DataError`).
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(seed, size, counts)
    seed, size = int(seed), int(size)
    from tqdm.auto import tqdm

    _pools("train")    # load and verify the assets before creating anything
    with staged_folder(out, overwrite, MARKER, "pbip_core.data.kather_mosaic") as tmp:
        for d in ("train", "train_mask", "val/img", "val/mask", "test/img", "test/mask"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        jobs = [(split, i) for split, n in counts.items() for i in range(int(n))]
        rows = [_image_row(split, i, seed, size, tmp)
                for split, i in tqdm(jobs, desc=NAME, unit="image", disable=not progress)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(tmp / "meta.csv", buf.getvalue())
        atomic_write_text(tmp / "dataset.yaml", dataset_yaml(seed, size, counts))
    return out


def dataset_yaml(seed: int, size: int, counts: dict[str, int]) -> str:
    """Text of ``dataset.yaml`` (DESIGN.md keys first, then description, source, split and settings)."""
    import yaml

    doc = {
        "name": NAME,
        "classes": list(CLASSES),
        "background_index": BACKGROUND_INDEX,
        "palette": [list(c) for c in PALETTE],
        "description": DESCRIPTION,
        "citation": CITATION,
        "licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); see "
                   "pbip_core/data/assets/kather2016/ATTRIBUTION.md",
        "source_textures": {x: TEXTURE_DIRS[x] for x in TEXTURES},
        "background_textures": list(BACKGROUND_TEXTURES),
        "microns_per_pixel": MICRONS_PER_PIXEL,
        "slide_split": slide_split(),
        "tiles_per_split": tiles_per_split(),
        "split_rule": (f"exhaustive search over all slide -> split assignments; val and test >= {MIN_EVAL_TILES} "
                       "tiles of every tissue class, train >= 1, every split >= 1 background-texture tile; maximise "
                       "lexicographically: tissue tiles in train, min per-class tiles in train, min per-class tiles "
                       "in test, tissue tiles in test, background tiles in train"),
        "generator": {"module": "pbip_core.data.kather_mosaic", "version": GENERATOR_VERSION, "seed": int(seed),
                      "size": int(size), "n_train": int(counts["train"]), "n_val": int(counts["val"]),
                      "n_test": int(counts["test"]), "min_area_share": MIN_AREA_SHARE,
                      "p_n_classes": list(N_CLASSES_P), "class_weights": list(CLASS_WEIGHTS),
                      "p_background": P_BACKGROUND, "background_share": list(BACKGROUND_SHARE),
                      "feather_sigma": FEATHER_SIGMA, "rescaled": False},
        "extras": {"train_mask": "pixel masks of train/ (same names); hidden from weak supervision",
                   "meta": "meta.csv: name, split, label, classes, n_classes, share_<class>, share_background, "
                           "background_texture, region_textures, region_tiles, region_shares, slides"},
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------------------------------------------------
# Building the shipped assets (run once by a maintainer; not used at run time)
# ----------------------------------------------------------------------------------------------------------------
def build_assets(src: str | Path, dest: str | Path | None = None) -> Path:
    """Convert the Kather 2016 TIF tiles of ``src/<class folder>/*.tif`` (the classes in :data:`TEXTURE_DIRS`) to
    lossless WebP in ``dest`` (default: the package's asset folder) and write ``tiles.csv`` and ``SHA256SUMS``.

    Every tile is decoded again after writing and compared pixel by pixel with the TIF; ``tiles.csv`` records the
    sha256 of the TIF's pixels so tests can check losslessness without the originals. ``ATTRIBUTION.md`` is not
    touched.
    """
    from PIL import Image

    src = Path(src)
    dest = Path(dest) if dest is not None else Path(__file__).parent / "assets" / "kather2016"
    rows, sums = [], []
    for texture in TEXTURES:
        folder = TEXTURE_DIRS[texture]
        tifs = sorted(p for p in (src / folder).glob("*.tif"))
        if not tifs:
            raise DataError(f"{src / folder}: no .tif tiles")
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for p in tifs:
            with Image.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
            if rgb.shape != (TILE_SIZE, TILE_SIZE, 3):
                raise DataError(f"{p}: expected {TILE_SIZE}x{TILE_SIZE} RGB, got {rgb.shape}")
            rel = f"{folder}/{p.stem}.webp"
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
            data = buf.getvalue()
            with Image.open(io.BytesIO(data)) as im:
                if not np.array_equal(np.asarray(im.convert("RGB")), rgb):
                    raise DataError(f"{p}: WebP round trip is not lossless")
            (dest / rel).write_bytes(data)
            rows.append({"file": rel, "texture": texture, "slide": slide_of(p.name), "original": p.name,
                         "pixel_sha256": pixel_sha256(rgb), "tif_sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {rel}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (dest / "tiles.csv").write_text(buf.getvalue())
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return dest


if __name__ == "__main__":   # python -m pbip_core.data.kather_mosaic OUT: quick timing run
    import sys

    t0 = time.perf_counter()
    generate_kather_mosaic(sys.argv[1], overwrite=True, progress=True)
    print(f"{time.perf_counter() - t0:.1f} s")
