"""Figures of results (chapters 05-07, 09): loss curves, validation curves, ablation curves, mask comparisons.

Every function takes tidy frames from :mod:`pbip_core.chapters` (or plain arrays) and returns a matplotlib
``Figure``; nothing here trains or reads run folders. Curves show the mean over seeds with a band from the
smallest to the largest seed (one seed: just the line).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .viz import legend_handles, mask_to_rgb, overlay, plt  # noqa: F401  (plt: the backend choice of viz)

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

    ``steps``: :func:`pbip_core.chapters.step_frame` (columns label, seed, step and the terms). A run whose term is
    identically 0 (e.g. L_FGS of the CAM baseline) is drawn too: its flat line says the term is off.
    """
    terms = [t for t in terms if t in steps.columns]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.0), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for lab, g in steps.groupby(label, sort=False):
            wide = g.pivot_table(index="seed", columns="step", values=term)
            ys = np.stack([smooth(r, window) for r in wide.to_numpy()])
            _band(ax, wide.columns.to_numpy(), ys, str(lab))
        ax.set_title(TERM_LABELS.get(term, term))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"loss (moving average of {window} steps)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_epoch_curves(epochs: pd.DataFrame, metrics: Sequence[str] = ("val_miou",), label: str = "method"):
    """Validation scores per epoch (the pseudo masks of the val split after each epoch), one line per ``label``."""
    metrics = [m for m in metrics if m in epochs.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for lab, g in epochs.groupby(label, sort=False):
            wide = g.pivot_table(index="seed", columns="epoch", values=m)
            _band(ax, wide.columns.to_numpy(), 100 * wide.to_numpy(), str(lab), marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{m.removeprefix('val_')} on val (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_ratio_curves(points: pd.DataFrame, metric: str = "stage1.test.miou", paper_ratio: float = 0.5):
    """Figure 3: mIoU against beta/alpha and against theta2/theta1 (log x axis), mean over seeds with a min-max band;
    a dashed line marks the paper's setting. ``points``: :func:`pbip_core.chapters.ratio_frame`."""
    series = ["beta/alpha", "theta2/theta1"]
    names = {"beta/alpha": r"$\beta / \alpha$ (eq. 6)", "theta2/theta1": r"$\theta_2 / \theta_1$ (eq. 13)"}
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.0), sharey=True)
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
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_bank_ablation(points: pd.DataFrame, metric: str = "stage1.test.miou"):
    """Figure 4: mIoU against N_K (images per sub-bank) for clustered and random sub-banks; "all eligible images"
    (random sub-banks holding every image) as a horizontal line. ``points``: :func:`pbip_core.chapters.bank_frame`."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
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
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_comparison(numeric: pd.DataFrame, metric: str = "mIoU (%)", title: str = ""):
    """Grouped bars, paper vs this book, per row of a comparison (``render_comparison(...).attrs["numeric"]``);
    error bars are the standard deviations (where given)."""
    rows = list(numeric.index)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.0))
    for i, (who, lab) in enumerate((("paper", "paper (BCSS-WSSS)"), ("ours", "this book"))):
        mean = numeric[(metric, f"{who} mean")].to_numpy(float)
        std = np.nan_to_num(numeric[(metric, f"{who} std")].to_numpy(float))
        ax.bar(x + (i - 0.5) * 0.38, np.nan_to_num(mean), 0.38, yerr=std, label=lab, capsize=3,
               alpha=1.0 if who == "ours" else 0.6)
    ax.set_xticks(x, [str(r) for r in rows], rotation=20 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def mask_comparison_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                         preds: Mapping[str, Sequence[np.ndarray]], palette: Sequence[Sequence[int]],
                         classes: Sequence[str], background_index: int, titles: Sequence[str] | None = None,
                         alpha: float = 0.5):
    """Figure 5a style: one row per image: the image, the ground truth and each method's mask overlaid, with the
    raw mask inset in the top-left corner. ``preds``: method -> masks in the order of ``images``."""
    cols = ["image", "ground truth", *preds]
    fig, axes = plt.subplots(len(images), len(cols), figsize=(2.1 * len(cols), 2.1 * len(images) + 0.5),
                             squeeze=False)
    for i, img in enumerate(images):
        masks = [None, gts[i], *[preds[k][i] for k in preds]]
        for j, (ax, m) in enumerate(zip(axes[i], masks)):
            ax.imshow(img if m is None else overlay(img, m, palette, alpha, ignore_index=background_index))
            if m is not None:  # the raw mask as a small inset (the paper's top-left corner)
                ins = ax.inset_axes([0.0, 0.6, 0.4, 0.4])
                ins.imshow(mask_to_rgb(m, palette), interpolation="nearest")
                ins.set_xticks([]), ins.set_yticks([])
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize="medium")
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize="small")
    names = [*classes, "background"]
    pal = [palette[c] for c in range(len(classes))] + [palette[background_index]]
    fig.legend(handles=legend_handles(names, pal), loc="lower center", ncol=len(names), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def foreground_grid(image: np.ndarray, fg: Mapping[str, np.ndarray], maps: Mapping[str, np.ndarray] | None = None):
    """Figure 5b style: the image, then per class its foreground image X_FG (eq. 5) and, optionally, above it the
    refined map M of the class."""
    n = 1 + len(fg)
    rows = 2 if maps else 1
    fig, axes = plt.subplots(rows, n, figsize=(2.1 * n, 2.2 * rows), squeeze=False)
    axes[-1][0].imshow(image)
    axes[-1][0].set_title("image X")
    for j, (cls, x) in enumerate(fg.items(), 1):
        axes[-1][j].imshow(x)
        axes[-1][j].set_title(rf"$X_{{FG}}$ {cls}")
        if maps:
            axes[0][j].imshow(maps[cls], cmap="viridis", vmin=0, vmax=1)
            axes[0][j].set_title(rf"$\mathbf{{M}}$ {cls}")
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_deltas(table: pd.DataFrame, column: str = "Δ miou (pp)", title: str = ""):
    """Horizontal bars of one column of :func:`pbip_core.chapters.delta_table` (change against the baseline)."""
    vals = table[column].astype(float)
    fig, ax = plt.subplots(figsize=(6.0, 0.38 * len(vals) + 1.0))
    colors = ["tab:green" if v >= 0 else "tab:red" for v in np.nan_to_num(vals.to_numpy())]
    ax.barh(np.arange(len(vals)), np.nan_to_num(vals.to_numpy()), color=colors)
    ax.set_yticks(np.arange(len(vals)), [str(i) for i in vals.index])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(column)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
