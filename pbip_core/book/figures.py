"""Figures of the book: mask colouring and overlays, image/mask grids, the bank, eq. 2-5 maps, result plots.

Sections: (1) colour helpers on arrays, (2) building blocks for data and method figures, (3) result plots (loss
curves, ablation points, comparisons), (4) named figures in :data:`FIGURES` (``pbip figure NAME --out FILE``).
Matplotlib runs on the non-interactive Agg backend outside a notebook, so figures render without a display.

Readable on the page: the book's content column is about :data:`PAGE_WIDTH_IN` (7.3 in, 700 px) wide and a wider
figure is scaled down, so the figures here are at most that wide, every label is at least :data:`MIN_FONT_PT` at
page width (:func:`effective_font_sizes` measures it), layouts are constrained (no title over another), and every
image panel keeps a thin frame (:func:`frame_image`), so a nearly white or black panel still shows its extent.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

try:                                   # inside a Jupyter kernel keep the inline backend; elsewhere render headless
    get_ipython  # type: ignore[name-defined]  # noqa: B018
except NameError:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.axis import Axis, Tick, XTick  # noqa: E402
from matplotlib.figure import Figure, SubFigure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from ..data import synth
from ..errors import PBIPError
from ..io import atomic_path, read_mask, read_rgb
from ..method.bank import BankSteps
from ..method.model import fg_bg_masks

Palette = Sequence[Sequence[int]]

#: Width of the book's content column (inches at 96 px per inch: about 700 px); wider figures are scaled down.
PAGE_WIDTH_IN = 7.3
#: The smallest label size (points) a figure may show at page width.
MIN_FONT_PT = 9.0
#: Label sizes the figures use (points, at a figure width of at most PAGE_WIDTH_IN).
FONT = {"small": 9.0, "label": 10.0, "title": 10.0, "suptitle": 11.0}
#: The frame of image panels.
FRAME = {"color": "0.55", "linewidth": 0.8}


# ----------------------------------------------------------------------------------------------------------------
# (0) Readability: page scale, label sizes, frames
# ----------------------------------------------------------------------------------------------------------------
def display_width_in(fig: Figure) -> float:
    """Width (inches) of ``fig`` as saved for the page (``bbox_inches="tight"``: labels outside the figure widen it)."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    tight = fig.get_tightbbox(renderer)
    return max(float(fig.get_figwidth()), float(tight.width) if tight is not None else 0.0)


def page_scale(fig: Figure) -> float:
    """How much the page shrinks ``fig``'s labels: a PNG is shown at its pixel size (96 px per inch) up to the
    content column's width, so a point of text appears as ``min(1, dpi / 96, PAGE_WIDTH_IN / width)`` points."""
    return min(1.0, fig.dpi / 96.0, PAGE_WIDTH_IN / round(display_width_in(fig), 3))


def drawn_texts(fig: Figure) -> list[Text]:
    """Every text artist ``fig`` draws: visible, non-empty, not on a switched-off axis (``set_axis_off``)."""
    found: list[Text] = []

    def walk(artist: Any) -> None:
        if not artist.get_visible():
            return
        if isinstance(artist, Axis) and not artist.axes.axison:
            return
        if isinstance(artist, Tick):                 # ticks outside the view limits are not drawn
            axis = artist.axes.xaxis if isinstance(artist, XTick) else artist.axes.yaxis
            lo, hi = sorted(axis.get_view_interval())
            loc, eps = artist.get_loc(), 1e-9 * max(1.0, abs(hi - lo))
            if loc is None or not lo - eps <= loc <= hi + eps:
                return
        if isinstance(artist, Text) and artist.get_text().strip():
            found.append(artist)
        for child in artist.get_children():
            walk(child)

    walk(fig)
    return found


def effective_font_sizes(fig: Figure) -> list[tuple[str, float]]:
    """``(text, size in points as the page shows it)`` for every drawn text of ``fig`` (:func:`page_scale`)."""
    scale = page_scale(fig)
    return [(t.get_text(), float(t.get_fontsize()) * scale) for t in drawn_texts(fig)]


def overlapping_texts(fig: Figure, min_overlap: float = 0.15) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes overlap by more than ``min_overlap`` of the smaller box (a title over a
    title, a label over a label)."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    pairs = []
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            small = min(ba.width * ba.height, bb.width * bb.height)
            if w > 0 and h > 0 and small > 0 and w * h > min_overlap * small:
                pairs.append((a, b))
    return pairs


def frame_image(ax: Any) -> Any:
    """An image panel without ticks but with a thin grey frame (an all-white or all-black image still shows its
    extent)."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(FRAME["color"])
        spine.set_linewidth(FRAME["linewidth"])
    return ax


def _panel(total: float, n: int, most: float) -> float:
    """Size of one of ``n`` panels sharing ``total`` inches, at most ``most``."""
    return min(most, total / max(1, n))


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
        size = _panel(PAGE_WIDTH_IN, ncols, panel_size)
        lines = max((t.count("\n") + 1 for _, t in panels if t), default=0)
        fig = plt.figure(figsize=(size * ncols, (size + 0.18 * lines + 0.1) * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        frame_image(ax)
        ax.set_title(title, fontsize=FONT["small"])
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
    order = np.argsort(-np.asarray(white), kind="stable")[:n]
    fig = image_mask_grid([read_rgb(paths[i]) for i in order], None, [],
                          [f"{(titles[i] + ' · ') if titles else ''}{100 * white[i]:.0f} % white\n"
                           f"{'DROPPED' if white[i] > threshold else 'kept'}" for i in order], ncols=min(n, 4))
    fig.suptitle(f"the whitest single-class tiles\n(dropped when more than {100 * threshold:.0f} % of the pixels "
                 "are white)", fontsize=FONT["suptitle"])
    return fig


def bank_montage(rows: Sequence[Sequence[Sequence[Path]]], classes: Sequence[str], n_show: int = 4,
                 panel: float = 1.1) -> Figure:
    """The image bank: one row per class, one group of ``n_show`` tiles per cluster (sub-bank), nearest the
    cluster centre first. ``rows[n][k]`` = paths of class n's sub-bank k."""
    n_rows, k = len(rows), max(len(r) for r in rows)
    ncols = k * n_show + (k - 1)                       # one narrow spacer column between clusters
    ratios = ([1] * n_show + [0.25]) * (k - 1) + [1] * n_show
    tile = _panel(PAGE_WIDTH_IN, sum(ratios), panel)
    fig, axes = plt.subplots(n_rows, ncols, figsize=(tile * sum(ratios), (tile + 0.25) * n_rows + 0.55),
                             squeeze=False, gridspec_kw={"width_ratios": ratios, "wspace": 0.04},
                             layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    for n, groups in enumerate(rows):
        for j, paths in enumerate(groups):
            for i, p in enumerate(list(paths)[:n_show]):
                ax = axes[n, j * (n_show + 1) + i]
                ax.imshow(read_rgb(p))
                frame_image(ax)
                if i == 0:
                    ax.set_title(f"{classes[n]} · {j + 1} ({len(paths)})", fontsize=FONT["small"], loc="left")
    fig.suptitle("image bank: one row per class, one group per K-means sub-bank (nearest the centre first);\n"
                 "title: class · sub-bank (images in it)", fontsize=FONT["title"])
    return fig


def feature_projection(proj: dict[str, np.ndarray], classes: Sequence[str], palette: Palette,
                       chosen: np.ndarray | None = None, ax: Any = None, title: str = "") -> Any:
    """Scatter of 2-D projected features (:func:`pbip_core.book.figures.project_2d`): colour = class, marker = cluster
    (sub-bank); prototypes as large black-outlined markers. Two legends (classes; sub-banks and prototypes) instead of
    a label per point, so nothing overlaps. ``chosen`` (bool per point) greys out the images outside the top-N_K
    sub-banks."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 5.0), layout="constrained")
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
    n_k = int(max(np.max(proj["cluster"]) if len(proj["cluster"]) else 0, np.max(proj["proto_k"]))) + 1
    shapes = [Line2D([], [], ls="", marker=MARKERS[k % len(MARKERS)], color="0.4", label=f"sub-bank {k + 1}")
              for k in range(n_k)]
    shapes.append(Line2D([], [], ls="", marker="o", markersize=10, color="0.85", markeredgecolor="black",
                         markeredgewidth=1.4, label="prototype"))
    first = ax.legend(handles=legend_handles(classes, palette), fontsize=FONT["small"], loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="class", title_fontsize=FONT["small"])
    ax.add_artist(first)
    ax.legend(handles=shapes, fontsize=FONT["small"], loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0,
              title="marker", title_fontsize=FONT["small"])
    ax.set_xlabel("component 1", fontsize=FONT["label"])
    ax.set_ylabel("component 2", fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["small"])
    ax.set_title(title or "encoder features (marker = sub-bank, outlined = prototype)", fontsize=FONT["title"])
    return ax


def similarity_heatmap(sim: np.ndarray, classes: Sequence[str], k: int, ax: Any = None, title: str = "",
                       annotate: bool | None = None) -> Any:
    """Heatmap of a (N*K, N*K) prototype cosine-similarity matrix (class-major), class blocks outlined."""
    if ax is None:
        size = min(5.6, 1.2 + 0.42 * len(sim))
        _, ax = plt.subplots(figsize=(size + 1.4, size + 0.4), layout="constrained")
    labels = [f"{c}·{j + 1}" for c in classes for j in range(k)]
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=FONT["small"])
    ax.set_yticks(range(len(labels)), labels, fontsize=FONT["small"])
    for b in range(1, len(classes)):
        ax.axhline(b * k - 0.5, color="white", lw=1.5)
        ax.axvline(b * k - 0.5, color="white", lw=1.5)
    if annotate if annotate is not None else len(sim) <= 12:
        for i in range(len(sim)):
            for j in range(len(sim)):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=FONT["small"],
                        color="black" if sim[i, j] > 0.6 else "white")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("cosine similarity", fontsize=FONT["small"])
    cb.ax.tick_params(labelsize=FONT["small"])
    ax.set_title(title or "prototype cosine similarity", fontsize=FONT["title"])
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
    size = _panel(PAGE_WIDTH_IN - 0.9, n + 1, 1.9)
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(size * (n + 1) + 0.9, (size + 0.1) * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    frame_image(axes[0, 0]).imshow(image)
    axes[0, 0].set_title("image", fontsize=FONT["small"])
    frame_image(axes[1, 0]).imshow(overlay(image, gt, palette, 0.5) if gt.shape == image.shape[:2]
                                   else mask_to_rgb(gt, palette))
    axes[1, 0].set_title("ground truth", fontsize=FONT["small"])
    for r, (m, name) in enumerate(zip(rows, names)):
        lo, hi = float(m.min()), float(m.max())
        for c in range(n):
            im = frame_image(axes[r, c + 1]).imshow(m[c], cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
            star = "\n(in GT)" if present is not None and present[c] else ""
            axes[r, c + 1].set_title(f"{classes[c]}{star}" if r == 0 else "", fontsize=FONT["small"])
        axes[r, 1].set_ylabel(name, fontsize=FONT["small"])
        cb = fig.colorbar(im, ax=axes[r, 1:].tolist(), fraction=0.04, pad=0.02, aspect=12)
        cb.ax.tick_params(labelsize=FONT["small"])
    fig.suptitle("cosine-similarity maps per level (eq. 2) and their sum (eq. 3)", fontsize=FONT["suptitle"])
    return fig


def fused_maps_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], fused: np.ndarray,
                    pseudo: Sequence[np.ndarray], classes: Sequence[str], palette: Palette,
                    background_index: int | None = None) -> Figure:
    """Per image (rows): the image, its ground truth, M' of every class (one colour scale per image) and the
    pseudo mask (argmax of M' over the classes in the ground truth).  fused (B, N, H, W)."""
    n = len(classes)
    size = _panel(PAGE_WIDTH_IN, n + 3, 1.7)
    fig, axes = plt.subplots(len(images), n + 3, figsize=(size * (n + 3), (size + 0.05) * len(images) + 0.8),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (img, gt, m, pm) in enumerate(zip(images, gts, fused, pseudo)):
        frame_image(axes[r, 0]).imshow(img)
        frame_image(axes[r, 1]).imshow(overlay(img, gt, palette, 0.5, background_index))
        lo, hi = float(m.min()), float(m.max())
        for c in range(n):
            frame_image(axes[r, 2 + c]).imshow(m[c], cmap="magma", vmin=lo, vmax=hi)
        frame_image(axes[r, n + 2]).imshow(overlay(img, pm, palette, 0.5, background_index))
    for c, name in enumerate(["image", "ground\ntruth", *[f"$M'$\n{c}" for c in classes], "argmax\n$M'$"]):
        axes[0, c].set_title(name, fontsize=FONT["small"])
    fig.legend(handles=legend_handles(classes, palette), loc="outside lower center", ncol=n, frameon=False,
               fontsize=FONT["small"])
    return fig


def at_comparison(images: Sequence[np.ndarray], m: np.ndarray, b: np.ndarray, titles: Sequence[str],
                  delta: float) -> Figure:
    """The paper's Figure 1: foreground (and background) images without and with adaptive thresholding.

    images (P,) (H, W, 3) uint8; m (P, H, W) class map M in [0, 1]; b (P, H, W) binary mask of eq. 4. Columns: X, M,
    X_FG = M·X (no AT), X_FG = b·M·X (AT), X_BG = (1-M)·X (no AT), X_BG = (1-b)(1-M)·X (AT); eq. 5 via
    :func:`pbip_core.method.model.fg_bg_masks`.
    """
    mt, bt = torch.as_tensor(np.asarray(m, np.float32)), torch.as_tensor(np.asarray(b, np.float32))
    fg0, bg0 = (t.numpy() for t in fg_bg_masks(mt, None))
    fg1, bg1 = (t.numpy() for t in fg_bg_masks(mt, bt))
    heads = ["image $X$", "$M$", "$X_{FG}$, no AT\n$MX$", f"$X_{{FG}}$, AT\n$bMX$ ($\\delta$={delta:g})",
             "$X_{BG}$, no AT\n$(1-M)X$", "$X_{BG}$, AT\n$(1-b)(1-M)X$"]
    size = _panel(PAGE_WIDTH_IN - 0.4, 6, 2.2)
    fig, axes = plt.subplots(len(images), 6, figsize=(size * 6 + 0.4, (size + 0.05) * len(images) + 0.5),
                             squeeze=False, layout="constrained")
    for r, img in enumerate(images):
        x = np.asarray(img, np.float32)
        panels = [img, None, *(np.clip(w[r][..., None] * x, 0, 255).astype(np.uint8) for w in (fg0, fg1, bg0, bg1))]
        for c, p in enumerate(panels):
            ax = frame_image(axes[r, c])
            ax.imshow(m[r], cmap="magma", vmin=0, vmax=1) if p is None else ax.imshow(p)
            if r == 0:
                ax.set_title(heads[c], fontsize=FONT["small"])
        axes[r, 0].set_ylabel(titles[r], fontsize=FONT["small"])
    return fig


def project_2d(features: torch.Tensor, steps: BankSteps, method: str = "pca", seed: int = 0) -> dict[str, np.ndarray]:
    """2-D coordinates of the bank's eligible images and of the prototypes, on the unit-normalised features.

    ``features`` (M, d) of the pool that ``steps`` (:func:`~pbip_core.method.bank.build_prototypes`) indexes.

    ``method``: ``"pca"`` (sklearn PCA fitted on the images; prototypes projected with it) or ``"tsne"`` (images and
    prototypes embedded together, cosine metric). Returns ``xy`` (M', 2), ``cls`` (M',), ``cluster`` (M',),
    ``proto_xy`` (N*K, 2), ``proto_cls`` and ``proto_k`` (N*K,).
    """
    idx = np.concatenate(steps.index)
    cls = np.concatenate([np.full(len(i), n) for n, i in enumerate(steps.index)])
    cluster = np.concatenate(steps.assign)
    x = F.normalize(features[torch.as_tensor(idx)].float(), dim=-1).numpy()
    p = F.normalize(steps.prototypes.reshape(-1, steps.prototypes.shape[-1]).float(), dim=-1).numpy()
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(x)
        xy, pxy = pca.transform(x), pca.transform(p)
    elif method == "tsne":
        from sklearn.manifold import TSNE  # t-SNE only on request (slow import)

        both = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed,
                    perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(np.concatenate([x, p]))
        xy, pxy = both[: len(x)], both[len(x):]
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    n, k = steps.prototypes.shape[:2]
    return {"xy": xy, "cls": cls, "cluster": cluster, "proto_xy": pxy,
            "proto_cls": np.repeat(np.arange(n), k), "proto_k": np.tile(np.arange(k), n)}


# ----------------------------------------------------------------------------------------------------------------
# (3) Result plots
# ----------------------------------------------------------------------------------------------------------------
TERM_LABELS = {
    "total": r"$\mathcal{L}_{\mathrm{total}}$ (eq. 6)",
    "cls": r"$\mathcal{L}_{\mathrm{CLS}}$ (eq. 8)",
    "fgs": r"$\mathcal{L}_{\mathrm{FGS}}$ (eq. 9)",
    "bgs": r"$\mathcal{L}_{\mathrm{BGS}}$ (eq. 11)",
    "sim": r"$\mathcal{L}_{\mathrm{SIM}}$ (eq. 13)",
    "reg": "CAM term (official)",
}


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start); ``window <= 1`` returns ``y``."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.arange(1, len(y) + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def _band(ax, x, ys: np.ndarray, label: str, color=None, marker: str | None = None) -> None:
    """Mean line of ``ys`` (seeds x points) with a min-max band."""
    mean = np.nanmean(ys, axis=0)
    line, = ax.plot(x, mean, label=label, color=color, marker=marker)
    if ys.shape[0] > 1:
        ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=line.get_color(), alpha=0.2, lw=0)


def plot_loss_curves(steps: pd.DataFrame, terms: Sequence[str] = ("total", "cls", "fgs", "bgs"),
                     label: str = "method", window: int = 5):
    """One panel per loss term against the training step, one line per ``label`` (mean over seeds, min-max band).

    ``steps``: :func:`pbip_core.book.results.step_frame` (columns label, seed, step and the terms). A run whose term is
    identically 0 (e.g. L_FGS of the CAM baseline) is drawn too: its flat line says the term is off.
    """
    terms = [t for t in terms if t in steps.columns]
    ncols = min(2, len(terms))
    nrows = -(-len(terms) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH_IN if ncols > 1 else 4.2, 2.6 * nrows + 0.3),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(terms):]:
        ax.set_axis_off()
    for ax, term in zip(axes.ravel(), terms):
        for lab, g in steps.groupby(label, sort=False):
            wide = g.pivot_table(index="seed", columns="step", values=term)
            ys = np.stack([smooth(r, window) for r in wide.to_numpy()])
            _band(ax, wide.columns.to_numpy(), ys, str(lab))
        ax.set_title(TERM_LABELS.get(term, term), fontsize=FONT["title"])
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("loss")
    fig.suptitle(f"loss terms per training step (moving average of {window} steps; band: min-max over seeds)",
                 fontsize=FONT["title"])
    axes[0][0].legend(fontsize=FONT["small"])
    return fig


def plot_epoch_curves(epochs: pd.DataFrame, metrics: Sequence[str] = ("val_miou",), label: str = "method"):
    """Validation scores per epoch (the pseudo masks of the val split after each epoch), one line per ``label``."""
    metrics = [m for m in metrics if m in epochs.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(PAGE_WIDTH_IN, 3.9 * len(metrics)), 3.0), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes[0], metrics):
        for lab, g in epochs.groupby(label, sort=False):
            wide = g.pivot_table(index="seed", columns="epoch", values=m)
            _band(ax, wide.columns.to_numpy(), 100 * wide.to_numpy(), str(lab), marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{m.removeprefix('val_')} on val (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=FONT["small"])
    return fig


def plot_ratio_curves(points: pd.DataFrame, metric: str = "stage1.test.miou", paper_ratio: float = 0.5):
    """Figure 3: mIoU against beta/alpha and against theta2/theta1 (log x axis), mean over seeds with a min-max band;
    a dashed line marks the paper's setting. ``points``: :func:`pbip_core.book.tables.ratio_frame`."""
    series = ["beta/alpha", "theta2/theta1"]
    names = {"beta/alpha": r"$\beta / \alpha$ (eq. 6)", "theta2/theta1": r"$\theta_2 / \theta_1$ (eq. 13)"}
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 3.0), sharey=True, layout="constrained")
    for ax, s in zip(axes, series):
        g = points[points["series"] == s]
        if len(g):
            wide = g.pivot_table(index="seed", columns="ratio", values=metric)
            _band(ax, wide.columns.to_numpy(), 100 * wide.to_numpy(), "this book", marker="o")
        ax.axvline(paper_ratio, ls="--", color="grey", lw=1, label=f"paper's setting ({paper_ratio:g})")
        ax.set_xscale("log")
        ticks = sorted({*g["ratio"].tolist(), paper_ratio})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(names[s])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU of the pseudo masks (%)")
    axes[0].legend(fontsize=FONT["small"])
    return fig


def plot_bank_ablation(points: pd.DataFrame, metric: str = "stage1.test.miou"):
    """Figure 4: mIoU against N_K (images per sub-bank) for clustered and random sub-banks; "all eligible images"
    (random sub-banks holding every image) as a horizontal line. ``points``: :func:`pbip_core.book.tables.bank_frame`."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2), layout="constrained")
    for sel, g in points[~points["all_images"]].groupby("selection", sort=True):
        wide = g.pivot_table(index="seed", columns="nk", values=metric)
        _band(ax, wide.columns.to_numpy(), 100 * wide.to_numpy(), f"{sel} selection", marker="o")
    allv = points.loc[points["all_images"], metric]
    if len(allv):
        ax.axhline(100 * float(allv.mean()), ls=":", color="k", label="random sub-banks of all images")
    nks = sorted(set(points.loc[~points["all_images"], "nk"].tolist()))
    if nks:
        ax.set_xticks(nks, [str(int(n)) for n in nks])
    ax.set_xlabel(r"$N_K$ (images per sub-bank)")
    ax.set_ylabel("mIoU of the pseudo masks (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=FONT["small"])
    return fig


def plot_comparison(numeric: pd.DataFrame, metric: str = "mIoU (%)", title: str = ""):
    """Grouped horizontal bars, paper vs this book, per row of a comparison
    (``render_comparison(...).attrs["numeric"]``): one row of the table per line, so long row names stay readable;
    error bars are the standard deviations (where given)."""
    rows = list(numeric.index)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.42 * len(rows) + 1.3), layout="constrained")
    for i, (who, lab) in enumerate((("paper", "paper"), ("ours", "this book"))):
        mean = numeric[(metric, f"{who} mean")].to_numpy(float)
        std = np.nan_to_num(numeric[(metric, f"{who} std")].to_numpy(float))
        ax.barh(y + (i - 0.5) * 0.38, np.nan_to_num(mean), 0.38, xerr=std, label=lab, capsize=3,
                alpha=1.0 if who == "ours" else 0.6)
    ax.set_yticks(y, [str(r) for r in rows], fontsize=FONT["small"])
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(title, fontsize=FONT["title"])
    ax.legend(fontsize=FONT["small"], loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig


def mask_comparison_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                         preds: Mapping[str, Sequence[np.ndarray]], palette: Sequence[Sequence[int]],
                         classes: Sequence[str], background_index: int, titles: Sequence[str] | None = None,
                         alpha: float = 0.5):
    """Figure 5a style: one row per image: the image, the ground truth and each method's mask overlaid, with the
    raw mask inset in the top-left corner. ``preds``: method -> masks in the order of ``images``."""
    cols = ["image", "ground truth", *preds]
    size = _panel(PAGE_WIDTH_IN - 0.4, len(cols), 2.1)
    fig, axes = plt.subplots(len(images), len(cols), figsize=(size * len(cols) + 0.4, (size + 0.05) * len(images)
                                                              + 0.9), squeeze=False, layout="constrained")
    for i, img in enumerate(images):
        masks = [None, gts[i], *[preds[k][i] for k in preds]]
        for j, (ax, m) in enumerate(zip(axes[i], masks)):
            ax.imshow(img if m is None else overlay(img, m, palette, alpha, ignore_index=background_index))
            if m is not None:  # the raw mask as a small inset (the paper's top-left corner)
                ins = ax.inset_axes([0.0, 0.6, 0.4, 0.4])
                ins.imshow(mask_to_rgb(m, palette), interpolation="nearest")
                frame_image(ins)
            frame_image(ax)
            if i == 0:
                ax.set_title(cols[j], fontsize=FONT["label"])
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=FONT["small"])
    names = [*classes, "background"]
    pal = [palette[c] for c in range(len(classes))] + [palette[background_index]]
    fig.legend(handles=legend_handles(names, pal), loc="outside lower center", ncol=min(len(names), 5),
               frameon=False, fontsize=FONT["small"])
    return fig


def foreground_grid(image: np.ndarray, fg: Mapping[str, np.ndarray], maps: Mapping[str, np.ndarray] | None = None):
    """Figure 5b style: the image, then per class its foreground image X_FG (eq. 5) and, optionally, above it the
    refined map M of the class."""
    n = 1 + len(fg)
    rows = 2 if maps else 1
    size = _panel(PAGE_WIDTH_IN, n, 2.1)
    fig, axes = plt.subplots(rows, n, figsize=(size * n, (size + 0.3) * rows), squeeze=False, layout="constrained")
    axes[-1][0].imshow(image)
    axes[-1][0].set_title("image X", fontsize=FONT["label"])
    for j, (cls, x) in enumerate(fg.items(), 1):
        axes[-1][j].imshow(x)
        axes[-1][j].set_title(rf"$X_{{FG}}$ {cls}", fontsize=FONT["label"])
        if maps:
            axes[0][j].imshow(maps[cls], cmap="viridis", vmin=0, vmax=1)
            axes[0][j].set_title(rf"$\mathbf{{M}}$ {cls}", fontsize=FONT["label"])
    for ax in axes.ravel():
        if ax.images:
            frame_image(ax)
        else:
            ax.axis("off")
    return fig


def plot_deltas(table: pd.DataFrame, column: str = "Δ miou (pp)", title: str = ""):
    """Horizontal bars of one column of :func:`pbip_core.book.tables.delta_table` (change against the baseline)."""
    vals = table[column].astype(float)
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 0.3 * len(vals) + 1.1), layout="constrained")
    colors = ["tab:green" if v >= 0 else "tab:red" for v in np.nan_to_num(vals.to_numpy())]
    ax.barh(np.arange(len(vals)), np.nan_to_num(vals.to_numpy()), color=colors)
    ax.set_yticks(np.arange(len(vals)), [str(i) for i in vals.index], fontsize=FONT["small"])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(column)
    ax.set_title(title, fontsize=FONT["title"])
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# (4) Named figures
# ----------------------------------------------------------------------------------------------------------------
def fig_synth_grid(args: argparse.Namespace) -> Figure:
    """The README figure: synthetic tiles, one row per class with its four sub-styles (intra-class
    heterogeneity), then multi-class tiles beside their ground-truth masks.

    Tiles come from ``--data`` (a folder written by ``pbip synth``, chosen via its meta.csv) or, without it,
    are rendered in memory by the generator with ``--seed``.
    """
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
