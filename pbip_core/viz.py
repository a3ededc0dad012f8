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


def _rgb01(palette: Palette, i: int) -> np.ndarray:
    return np.asarray(palette[i], dtype=float) / 255.0


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def white_examples(paths: Sequence[Path], white: np.ndarray, threshold: float, n: int = 8,
                   titles: Sequence[str] | None = None) -> Figure:
    """The ``n`` whitest tiles with their white-pixel share; those above ``threshold`` are dropped from the bank."""
    from .io import read_rgb

    order = np.argsort(-np.asarray(white), kind="stable")[:n]
    fig = image_mask_grid([read_rgb(paths[i]) for i in order], None, [],
                          [f"{(titles[i] + ' · ') if titles else ''}{100 * white[i]:.0f} % white\n"
                           f"{'DROPPED' if white[i] > threshold else 'kept'}" for i in order], ncols=min(n, 8))
    fig.suptitle(f"the whitest single-class tiles (dropped when more than {100 * threshold:.0f} % of the pixels "
                 "are white)", fontsize=10)
    return fig


def bank_montage(rows: Sequence[Sequence[Sequence[Path]]], classes: Sequence[str], n_show: int = 4,
                 panel: float = 1.1) -> Figure:
    """The image bank: one row per class, one group of ``n_show`` tiles per cluster (sub-bank), nearest the
    cluster centre first. ``rows[n][k]`` = paths of class n's sub-bank k."""
    from .io import read_rgb

    n_rows, k = len(rows), max(len(r) for r in rows)
    ncols = k * n_show + (k - 1)                       # one empty spacer column between clusters
    fig, axes = plt.subplots(n_rows, ncols, figsize=(panel * ncols, panel * n_rows * 1.15), squeeze=False,
                             gridspec_kw={"width_ratios": ([1] * n_show + [0.25]) * (k - 1) + [1] * n_show})
    for ax in axes.ravel():
        ax.set_axis_off()
    for n, groups in enumerate(rows):
        for j, paths in enumerate(groups):
            for i, p in enumerate(list(paths)[:n_show]):
                ax = axes[n, j * (n_show + 1) + i]
                ax.imshow(read_rgb(p))
                if i == 0:
                    ax.set_title(f"{classes[n]} · sub-bank {j + 1} ({len(paths)})", fontsize=8, loc="left")
    fig.suptitle("image bank: rows = classes, groups = K-means clusters (nearest the centre first)", fontsize=10)
    fig.tight_layout()
    return fig


def feature_projection(proj: dict[str, np.ndarray], classes: Sequence[str], palette: Palette,
                       chosen: np.ndarray | None = None, ax: Any = None, title: str = "") -> Any:
    """Scatter of 2-D projected features (:func:`pbip_core.explore.project_2d`): colour = class, marker = cluster;
    prototypes as large outlined markers labelled ``CLASS·k``. ``chosen`` (bool per point) greys out the images
    outside the top-N_K sub-banks."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.6, 4.8))
    alpha = np.where(chosen, 0.9, 0.15) if chosen is not None else np.full(len(proj["xy"]), 0.7)
    for n in np.unique(proj["cls"]):
        for c in np.unique(proj["cluster"]):
            sel = (proj["cls"] == n) & (proj["cluster"] == c)
            if sel.any():
                ax.scatter(*proj["xy"][sel].T, s=14, marker=MARKERS[c % len(MARKERS)], color=_rgb01(palette, n),
                           alpha=alpha[sel], linewidths=0)
    for (x, y), n, k in zip(proj["proto_xy"], proj["proto_cls"], proj["proto_k"]):
        ax.scatter([x], [y], s=150, marker=MARKERS[k % len(MARKERS)], color=_rgb01(palette, n), edgecolors="black",
                   linewidths=1.4, zorder=3)
        ax.annotate(f"{classes[n]}·{k + 1}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.legend(handles=legend_handles(classes, palette), fontsize=8, loc="best", framealpha=0.7)
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.set_title(title or "encoder features (marker = cluster, outlined = prototype)", fontsize=10)
    return ax


def similarity_heatmap(sim: np.ndarray, classes: Sequence[str], k: int, ax: Any = None, title: str = "",
                       annotate: bool | None = None) -> Any:
    """Heatmap of a (N*K, N*K) prototype cosine-similarity matrix (class-major), class blocks outlined."""
    if ax is None:
        size = 1.0 + 0.42 * len(sim)
        _, ax = plt.subplots(figsize=(size + 1.2, size))
    labels = [f"{c}·{j + 1}" for c in classes for j in range(k)]
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for b in range(1, len(classes)):
        ax.axhline(b * k - 0.5, color="white", lw=1.5)
        ax.axvline(b * k - 0.5, color="white", lw=1.5)
    if annotate if annotate is not None else len(sim) <= 12:
        for i in range(len(sim)):
            for j in range(len(sim)):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if sim[i, j] > 0.6 else "white")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title or "prototype cosine similarity", fontsize=10)
    return ax


def level_maps_figure(image: np.ndarray, gt: np.ndarray, maps: Sequence[np.ndarray], fused: np.ndarray,
                      classes: Sequence[str], palette: Palette, present: Sequence[bool] | None = None) -> Figure:
    """Eq. 2-3 for one image: rows = levels i (M_i, each at its own resolution) and the sum M'; columns = classes.
    The first column shows the image and its ground truth. Each row shares one colour scale (its colour bar).

    maps: L arrays (N, h_i, w_i); fused: (N, H, W).
    """
    rows = [*maps, fused]
    names = [f"$M_{i + 1}$ ({m.shape[-2]}×{m.shape[-1]})" for i, m in enumerate(maps)] + [r"$M' = \sum_i Up(M_i)$"]
    n = len(classes)
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(1.9 * (n + 1) + 0.6, 1.9 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    axes[1, 0].imshow(overlay(image, gt, palette, 0.5) if gt.shape == image.shape[:2] else mask_to_rgb(gt, palette))
    axes[1, 0].set_title("ground truth", fontsize=9)
    for r, (m, name) in enumerate(zip(rows, names)):
        lo, hi = float(m.min()), float(m.max())
        for c in range(n):
            im = axes[r, c + 1].imshow(m[c], cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
            star = " (in GT)" if present is not None and present[c] else ""
            axes[r, c + 1].set_title(f"{classes[c]}{star}" if r == 0 else "", fontsize=9)
        axes[r, 1].text(-0.12, 0.5, name, transform=axes[r, 1].transAxes, rotation=90, va="center", ha="right",
                        fontsize=9)
        fig.colorbar(im, ax=axes[r, n], fraction=0.046, pad=0.04)
    fig.suptitle("cosine-similarity maps per level (eq. 2) and their sum (eq. 3)", fontsize=11)
    fig.tight_layout()
    return fig


def fused_maps_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], fused: np.ndarray,
                    pseudo: Sequence[np.ndarray], classes: Sequence[str], palette: Palette,
                    background_index: int | None = None) -> Figure:
    """Per image (rows): the image, its ground truth, M' of every class (one colour scale per image) and the
    pseudo mask (argmax of M' over the classes in the ground truth).  fused (B, N, H, W)."""
    n = len(classes)
    fig, axes = plt.subplots(len(images), n + 3, figsize=(1.7 * (n + 3), 1.8 * len(images)), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (img, gt, m, pm) in enumerate(zip(images, gts, fused, pseudo)):
        axes[r, 0].imshow(img)
        axes[r, 1].imshow(overlay(img, gt, palette, 0.5, background_index))
        lo, hi = float(m.min()), float(m.max())
        for c in range(n):
            axes[r, 2 + c].imshow(m[c], cmap="magma", vmin=lo, vmax=hi)
        axes[r, n + 2].imshow(overlay(img, pm, palette, 0.5, background_index))
    for c, name in enumerate(["image", "ground truth", *[f"$M'$ {c}" for c in classes], "argmax $M'$"]):
        axes[0, c].set_title(name, fontsize=9)
    fig.legend(handles=legend_handles(classes, palette), loc="lower center", ncol=n, frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout()
    return fig


def at_comparison(images: Sequence[np.ndarray], m: np.ndarray, b: np.ndarray, titles: Sequence[str],
                  delta: float) -> Figure:
    """The paper's Figure 1: foreground (and background) images without and with adaptive thresholding.

    images (P,) (H, W, 3) uint8; m (P, H, W) class map M in [0, 1]; b (P, H, W) binary mask of eq. 4. Columns: X, M,
    X_FG = M·X (no AT), X_FG = b·M·X (AT), X_BG = (1-M)·X (no AT), X_BG = (1-b)(1-M)·X (AT); eq. 5 via
    :func:`pbip_core.model.fg_bg_masks`.
    """
    import torch

    from .model import fg_bg_masks

    mt, bt = torch.as_tensor(np.asarray(m, np.float32)), torch.as_tensor(np.asarray(b, np.float32))
    fg0, bg0 = (t.numpy() for t in fg_bg_masks(mt, None))
    fg1, bg1 = (t.numpy() for t in fg_bg_masks(mt, bt))
    heads = ["image $X$", "$M$", r"$X_{FG}$ without AT: $M X$", rf"$X_{{FG}}$ with AT ($\delta$={delta:g}): $bMX$",
             r"$X_{BG}$ without AT: $(1-M)X$", r"$X_{BG}$ with AT: $(1-b)(1-M)X$"]
    fig, axes = plt.subplots(len(images), 6, figsize=(13.2, 2.3 * len(images)), squeeze=False)
    for r, img in enumerate(images):
        x = np.asarray(img, np.float32)
        panels = [img, None, *(np.clip(w[r][..., None] * x, 0, 255).astype(np.uint8) for w in (fg0, fg1, bg0, bg1))]
        for c, p in enumerate(panels):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.imshow(m[r], cmap="magma", vmin=0, vmax=1) if p is None else ax.imshow(p)
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
        axes[r, 0].text(-0.06, 0.5, titles[r], transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=9)
    fig.tight_layout()
    return fig


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
