"""Figures: mask colouring, overlays, image/mask grids, and the ``pbip figure`` command.

Sections: (1) colour helpers on arrays, (2) matplotlib building blocks, (3) named figures in :data:`FIGURES`
(``pbip figure NAME --out FILE``). To add a figure, write ``def fig_<name>(args) -> Figure`` and register it in
:data:`FIGURES`; options it needs go in :func:`add_arguments` (shared by all figures).
Matplotlib runs on the non-interactive Agg backend here, so figures render without a display.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

try:                                   # inside a Jupyter kernel keep the inline backend; elsewhere render headless
    get_ipython  # type: ignore[name-defined]  # noqa: B018
except NameError:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure, SubFigure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .errors import PBIPError  # noqa: E402
from .io import atomic_path  # noqa: E402

Palette = Sequence[Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# (1) Colour helpers
# ----------------------------------------------------------------------------------------------------------------
def mask_to_rgb(mask: np.ndarray, palette: Palette) -> np.ndarray:
    """Class-index mask (H, W) -> RGB (H, W, 3) uint8 via ``palette`` (list of (r, g, b)); indices beyond the
    palette are drawn black."""
    lut = np.zeros((256, 3), np.uint8)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    lut[: len(pal)] = pal
    return lut[np.asarray(mask).astype(np.int64).clip(0, 255)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: Palette, alpha: float = 0.45,
            ignore_index: int | None = None) -> np.ndarray:
    """Blend the coloured mask over an RGB image (H, W, 3) uint8: ``(1 - alpha) * image + alpha * colour``.

    Pixels whose class is ``ignore_index`` (e.g. the white background index) keep the image unchanged.
    """
    image = np.asarray(image)
    if image.shape[:2] != np.asarray(mask).shape:
        raise PBIPError(f"overlay: image {image.shape[:2]} and mask {np.asarray(mask).shape} differ in size")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_to_rgb(mask, palette).astype(np.float32)
    if ignore_index is not None:
        keep = np.asarray(mask) == ignore_index
        out[keep] = image[keep]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def legend_handles(classes: Sequence[str], palette: Palette) -> list[Patch]:
    """One coloured patch per class name (palette order = class index order) for ``fig.legend(handles=...)``."""
    return [Patch(facecolor=np.asarray(palette[i]) / 255.0, edgecolor="0.3", label=name)
            for i, name in enumerate(classes)]


# ----------------------------------------------------------------------------------------------------------------
# (2) Building blocks
# ----------------------------------------------------------------------------------------------------------------
def image_mask_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None, palette: Palette,
                    titles: Sequence[str] | None = None, ncols: int = 4, mode: str = "side", alpha: float = 0.45,
                    panel_size: float = 2.0, fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """Grid of images, each with its mask: ``mode="side"`` puts a mask overlay to the right of every image
    (a pair takes two panels), ``"overlay"`` draws the overlay only. ``masks=None`` (or a None entry) shows the
    image alone. ``ncols`` counts panels. Draws into ``fig`` (a Figure or SubFigure) when given.
    """
    masks = list(masks) if masks is not None else [None] * len(images)
    if len(masks) != len(images):
        raise PBIPError(f"image_mask_grid: {len(images)} images but {len(masks)} masks")
    panels: list[tuple[np.ndarray, str]] = []
    for i, (img, m) in enumerate(zip(images, masks)):
        title = titles[i] if titles is not None else ""
        if m is None:
            panels.append((img, title))
        elif mode == "side":
            panels += [(img, title), (overlay(img, m, palette, alpha), "mask")]
        elif mode == "overlay":
            panels.append((overlay(img, m, palette, alpha), title))
        else:
            raise PBIPError(f"image_mask_grid: mode must be 'side' or 'overlay', got {mode!r}")
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    if fig is None:
        fig = plt.figure(figsize=(panel_size * ncols, panel_size * nrows * 1.12))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 85) -> Path:
    """Write ``fig`` atomically (format from the suffix) and close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# (3) Named figures
# ----------------------------------------------------------------------------------------------------------------
def fig_synth_grid(args: argparse.Namespace) -> Figure:
    """The README figure: synthetic tiles, one row per class with its four sub-styles (intra-class
    heterogeneity), then multi-class tiles beside their ground-truth masks.

    Tiles come from ``--data`` (a folder written by ``pbip synth``, chosen via its meta.csv) or, without it,
    are rendered in memory by the generator with ``--seed``.
    """
    from .data import synth

    size = 224
    single: list[tuple[np.ndarray, str]] = []
    multi: list[tuple[np.ndarray, np.ndarray, str]] = []
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 7]))
    data = Path(args.data) if args.data else None
    if data is not None:
        single, multi = _pick_from_folder(data, synth)
    else:
        for c in synth.CLASSES:
            for s in synth.STYLES[c]:
                rgb, _, _ = synth.render_tile(rng, size, [c], {c: s}, white_share=0.0)
                single.append((rgb, f"{c} · {s}"))
        combos = [["TUM", "STR"], ["LYM", "NEC"], ["TUM", "STR", "LYM"], ["STR", "NEC"]]
        for combo, white in zip(combos, [0.0, 0.0, 0.0, 0.25]):
            for _ in range(20):  # a class below the 2 % area rule is merged away: redraw until all are there
                rgb, mask, meta = synth.render_tile(rng, size, combo, white_share=white)
                if len(meta["classes"]) == len(combo):
                    break
            multi.append((rgb, mask, "\n".join(f"{c} · {meta['styles'][c]}" for c in meta["classes"])))

    fig = plt.figure(figsize=(8.4, 8.4 * 1.12 * 1.5 + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4, 2])
    image_mask_grid([s[0] for s in single], None, synth.PALETTE, [s[1] for s in single], ncols=4, fig=top)
    top.suptitle("Four sub-styles per class (intra-class heterogeneity)", fontsize=10)
    image_mask_grid([m[0] for m in multi], [m[1] for m in multi], synth.PALETTE, [m[2] for m in multi],
                    ncols=4, mode="side", fig=bottom)
    bottom.suptitle("Multi-class tiles and their masks (white = glass, index 4)", fontsize=10)
    fig.legend(handles=legend_handles(list(synth.CLASSES) + ["glass"], synth.PALETTE), loc="lower center",
               ncol=5, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("pbip synth: synthetic H&E tiles (Beer-Lambert haematoxylin + eosin)", fontsize=12)
    return fig


def _pick_from_folder(root: Path, synth: Any) -> tuple[list, list]:
    """From a ``pbip synth`` folder: one single-class train tile per (class, sub-style) and four multi-class
    test tiles with masks, chosen deterministically via meta.csv."""
    import csv

    from .io import read_mask, read_rgb

    meta = root / "meta.csv"
    if not meta.exists():
        raise PBIPError(f"{meta}: not found; --data must be a folder written by `pbip synth`")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    single, multi = [], []
    for c in synth.CLASSES:
        for s in synth.STYLES[c]:
            hit = next((r for r in rows if r["split"] == "train" and r["classes"] == c and r[f"style_{c}"] == s
                        and float(r["share_background"]) < 0.1), None)
            if hit is not None:
                single.append((read_rgb(root / "train" / hit["name"]), f"{c} · {s}"))
    for r in [r for r in rows if r["split"] == "test" and int(r["n_classes"]) >= 2][:4]:
        names = r["classes"].split("+")
        title = "\n".join(f"{c} · {r[f'style_{c}']}" for c in names)
        multi.append((read_rgb(root / "test" / "img" / r["name"]), read_mask(root / "test" / "mask" / r["name"]),
                      title))
    return single, multi


FIGURES: dict[str, tuple[Callable[[argparse.Namespace], Figure], str]] = {
    "synth-grid": (fig_synth_grid, "synthetic tiles by class and sub-style, multi-class tiles with masks"),
}


# ----------------------------------------------------------------------------------------------------------------
# Command line: pbip figure NAME --out FILE
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(FIGURES), help="; ".join(f"{k}: {v[1]}" for k, v in FIGURES.items()))
    p.add_argument("--out", required=True, help="output image file (.png, .pdf, .svg)")
    p.add_argument("--data", default=None, help="dataset folder to draw tiles from (default: render in memory)")
    p.add_argument("--seed", type=int, default=0, help="random seed for tiles rendered in memory")
    p.add_argument("--dpi", type=int, default=85)


def main(args: argparse.Namespace) -> int:
    if args.name not in FIGURES:
        raise PBIPError(f"unknown figure {args.name!r}; choose from {sorted(FIGURES)}")
    fig = FIGURES[args.name][0](args)
    path = save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {path}")
    return 0
