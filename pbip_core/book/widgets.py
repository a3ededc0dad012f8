"""Interactive figures for the book: the adaptive threshold delta of eq. 4 and the bank's K and N_K (sec. 3.2).

Two kinds of widget:

* :func:`delta_explorer` and :func:`bank_explorer` work in the **static HTML book** as well as in a kernel: the
  figure for each value on a grid is rendered once, and a slider switches between them in the browser (``jslink``
  of the slider's index to a :class:`ipywidgets.Stack`; :func:`static_explorer`), so no kernel is needed to move it.
* :func:`delta_interact` and :func:`bank_interact` recompute the figure in the kernel for any value (JupyterLab).

Equations (sec. 3.4)::

    tau = delta * max(M)                      (4)    b = [M >= tau]
    X_FG = b * M * X,  X_BG = (1 - b) * (1 - M) * X     (5)
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Sequence

import ipywidgets as w
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ..engine.bank import Pool
from ..method.bank import build_prototypes
from ..method.model import adaptive_threshold, fg_bg_masks
from .figures import FONT, PAGE_WIDTH_IN, PCA, feature_projection, frame_image, similarity_heatmap
from .tables import cosine_matrix

DELTA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(15))
#: Resolution of the pre-rendered explorer figures (96 = one figure pixel per page pixel).
EXPLORER_DPI = 96


def threshold_mask(cam: np.ndarray, delta: float) -> np.ndarray:
    """Eq. 4: ``b = M >= delta * max(M)``, the max taken per class map (:func:`pbip_core.method.model.adaptive_threshold`).

    ``cam``: ``(H, W)`` or ``(N, H, W)`` class activation map M in [0, 1]. Returns a bool array of the same shape.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1] (eq. 4), got {delta}")
    m = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    b = adaptive_threshold(m.reshape(1, -1, *m.shape[-2:]), float(delta), scope="class")
    return b.reshape(m.shape).numpy() > 0.5


def separate(image: np.ndarray, cam: np.ndarray, delta: float,
             cut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 5 for one class map: ``X_FG = b M X`` and ``X_BG = (1 - b)(1 - M) X`` (:func:`~pbip_core.method.model.fg_bg_masks`).

    ``image``: ``(H, W, 3)`` uint8; ``cam``: ``(H, W)`` M in [0, 1]; ``cut``: the ``(H, W)`` map eq. 4 thresholds
    (``model.threshold_map``: M' for ``fused``, the default of the book; None: M itself, ``minmax``).
    Returns two ``(H, W, 3)`` uint8 images.
    """
    m = torch.as_tensor(np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0))
    b = torch.as_tensor(threshold_mask(m.numpy() if cut is None else cut, delta).astype(np.float32))
    fg, bg = fg_bg_masks(m, b)                                       # (H, W) soft masks
    x = np.asarray(image, dtype=np.float32)
    return ((fg.numpy()[..., None] * x).round().astype(np.uint8), (bg.numpy()[..., None] * x).round().astype(np.uint8))


def demo_cam(mask: np.ndarray, cls: int, seed: int = 0, blur: float = 3.0, noise: float = 0.25) -> np.ndarray:
    """A stand-in CAM for one class: the class region of ``mask`` blurred, plus smooth noise, scaled to [0, 1].

    Good enough to see what delta does before a model is trained (chapter 04 later uses real CAMs).
    ``mask``: ``(H, W)`` class indices. Returns ``(H, W)`` float32.
    """
    rng = np.random.default_rng(seed)
    region = gaussian_filter((np.asarray(mask) == cls).astype(np.float32), blur)
    clutter = gaussian_filter(rng.random(region.shape, dtype=np.float32), 2 * blur)
    clutter = (clutter - clutter.min()) / (np.ptp(clutter) + 1e-8)
    m = region + noise * clutter
    return ((m - m.min()) / (np.ptp(m) + 1e-8)).astype(np.float32)


def delta_figure(image: np.ndarray, cam: np.ndarray, delta: float, title: str = "", gt: np.ndarray | None = None,
                 cut: np.ndarray | None = None):
    """2 x 2 panels: the CAM M with the contour of eq. 4's cut (of ``cut``, M' by the book's default reading, else of
    M itself), the binary mask b, X_FG and X_BG (eq. 4-5).

    ``gt``: optional ``(H, W)`` bool mask of the class in the ground truth; its boundary is drawn (dashed green) on
    M and on b, so the cut can be compared with the truth. Every panel has a frame (b is often almost all white).
    """
    b = threshold_mask(cam if cut is None else cut, delta)
    fg, bg = separate(image, cam, delta, cut)
    cut_name = "M" if cut is None else "M'"                       # the map eq. 4 thresholds
    fig, axes = plt.subplots(2, 2, figsize=(6.4, 7.0), dpi=EXPLORER_DPI, layout="constrained")
    (a_m, a_b), (a_fg, a_bg) = axes
    a_m.imshow(cam, cmap="magma", vmin=0, vmax=1)
    a_b.imshow(b, cmap="gray", vmin=0, vmax=1)
    a_fg.imshow(fg)
    a_bg.imshow(bg)
    if 0 < b.mean() < 1:
        a_m.contour(b.astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
    handles = [Line2D([], [], color="cyan", lw=1.2, label=rf"${cut_name} = \tau$")]
    if gt is not None:
        gt = np.asarray(gt).astype(bool)
        if gt.shape != b.shape:
            raise ValueError(f"delta_figure: gt {gt.shape} and cam {b.shape} differ in size")
        if 0 < gt.mean() < 1:
            for ax in (a_m, a_b):
                ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=1.4, linestyles="--")
        handles.append(Line2D([], [], color="lime", lw=1.4, ls="--", label="ground truth of the class"))
    labels = [rf"$M$, contour ${cut_name} = \tau = {delta:.2f} \max {cut_name}$", f"$b$: {100 * b.mean():.0f} % foreground",
              r"$X_{FG} = b \cdot M \cdot X$", r"$X_{BG} = (1-b) \cdot (1-M) \cdot X$"]
    for ax, label in zip(axes.ravel(), labels):
        ax.set_title(label, fontsize=FONT["label"] + 1)
        frame_image(ax)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
               fontsize=FONT["label"] + 1)
    fig.suptitle(title or rf"$\delta = {delta:.2f}$", fontsize=FONT["suptitle"] + 1)
    return fig


def _png_html(fig, alt: str = "figure") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%" alt="{alt}"/>'


def static_explorer(pages: Sequence[tuple[str, str]], index: int = 0, description: str = "",
                    width: str = "420px"):
    """A slider over pre-rendered HTML pages that works without a kernel (static HTML book).

    ``pages``: ``(slider label, HTML)`` pairs. The slider's index is linked in the browser (``jslink``) to a
    :class:`ipywidgets.Stack` of :class:`ipywidgets.HTML` pages. Returns an :class:`ipywidgets.VBox`.
    """
    if not pages:
        raise ValueError("static_explorer: no pages")
    stack = w.Stack([w.HTML(html) for _, html in pages], selected_index=index)
    slider = w.SelectionSlider(options=[(label, i) for i, (label, _) in enumerate(pages)], index=index,
                               description=description, continuous_update=True, layout=w.Layout(width=width),
                               style={"description_width": "initial"})
    w.jslink((slider, "index"), (stack, "selected_index"))
    return w.VBox([slider, stack])


def delta_explorer(image: np.ndarray, cam: np.ndarray, deltas: Sequence[float] = DELTA_GRID,
                   value: float = 0.15, title: str = "", gt: np.ndarray | None = None,
                   cut: np.ndarray | None = None):
    """A delta slider that also works in the static HTML book (no kernel).

    One figure per value of ``deltas`` is rendered now (:func:`delta_figure`, with the ground-truth boundary when
    ``gt`` is given); the slider's index is linked in the browser to a :class:`ipywidgets.Stack` holding them
    (:func:`static_explorer`). Returns an :class:`ipywidgets.VBox`.
    """
    deltas = [round(float(d), 4) for d in deltas]
    if not deltas:
        raise ValueError("deltas must not be empty")
    start = int(np.argmin([abs(d - value) for d in deltas]))
    pages = [(f"{d:.2f}", _png_html(delta_figure(image, cam, d, title, gt, cut), f"eq. 4-5 at delta {d:.2f}"))
             for d in deltas]
    return static_explorer(pages, start, "δ")


def delta_interact(image: np.ndarray, cam: np.ndarray, value: float = 0.15, title: str = "",
                   gt: np.ndarray | None = None, cut: np.ndarray | None = None):
    """A live FloatSlider for delta in [0, 1] that redraws :func:`delta_figure` in the kernel (JupyterLab)."""
    slider = w.FloatSlider(value=value, min=0.0, max=1.0, step=0.01, description="δ", continuous_update=False)

    def show(delta: float) -> None:
        delta_figure(image, cam, delta, title, gt, cut)
        plt.show()

    return w.interactive(show, delta=slider)


BANK_GRID: tuple[tuple[int, int], ...] = ((1, 5), (2, 5), (3, 5), (3, 20), (3, 0), (4, 5), (4, 20))


def bank_figure(pool: Pool, k: int, nk: int, palette, seed: int = 0, proj_fit=None):
    """The bank for one (K, N_K): projected features with the top-N_K sub-banks highlighted, and the prototype
    cosine-similarity matrix (eq. 1 clustering, sec. 3.4 prototypes). ``pool``: :class:`pbip_core.engine.bank.Pool`.

    ``nk = 0`` keeps every image of each cluster. ``proj_fit``: a fitted sklearn PCA so that all (K, N_K) share axes.
    """
    with warnings.catch_warnings():       # the sweep goes above small classes' sizes on purpose (documented fallback)
        warnings.simplefilter("ignore", UserWarning)
        steps = build_prototypes(pool.features, [pool.members(n) for n in range(len(pool.classes))], k,
                                 nk or len(pool.paths), seed=seed, class_names=pool.classes)
    idx = np.concatenate(steps.index)
    unit = lambda t: F.normalize(t.reshape(-1, t.shape[-1]).float(), dim=-1).numpy()
    pca = proj_fit or _fit_pca(unit(pool.features[idx]), seed)
    chosen_set = {int(i) for per in steps.chosen for c in per for i in c}
    proj = {"xy": pca.transform(unit(pool.features[idx])), "cls": pool.label[idx],
            "cluster": np.concatenate(steps.assign), "proto_xy": pca.transform(unit(steps.prototypes)),
            "proto_cls": np.repeat(np.arange(len(pool.classes)), k),
            "proto_k": np.tile(np.arange(k), len(pool.classes))}
    fig, (a, b) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 3.9), dpi=EXPLORER_DPI, layout="constrained",
                               gridspec_kw={"width_ratios": [1.25, 1]})
    feature_projection(proj, pool.classes, palette, np.array([int(i) in chosen_set for i in idx]), ax=a,
                       title=f"K = {k}, N_K = {nk or 'all'}:\nsub-banks bright, other images faded")
    similarity_heatmap(cosine_matrix(steps.prototypes), pool.classes, k, ax=b, annotate=False)
    return fig


def _fit_pca(x: np.ndarray, seed: int = 0):
    return PCA(n_components=2, random_state=seed).fit(x)


def bank_explorer(pool, palette, combos: Sequence[tuple[int, int]] = BANK_GRID, value: tuple[int, int] = (3, 20),
                  seed: int = 0):
    """A (K, N_K) slider over pre-rendered :func:`bank_figure` pages; works in the static HTML book."""
    idx = np.flatnonzero(pool.eligible)
    pca = _fit_pca(F.normalize(pool.features[idx].float(), dim=-1).numpy(), seed)
    combos = [tuple(c) for c in combos]
    start = combos.index(tuple(value)) if tuple(value) in combos else 0
    labels = [f"K={k}, N_K={nk or 'all'}" for k, nk in combos]
    pages = [(lab, _png_html(bank_figure(pool, k, nk, palette, seed, pca), f"bank with {lab}"))
             for lab, (k, nk) in zip(labels, combos)]
    return static_explorer(pages, start, "bank", width="520px")


def bank_interact(pool, palette, k: int = 3, nk: int = 20, seed: int = 0):
    """Live sliders for K and N_K that recompute :func:`bank_figure` in the kernel (JupyterLab)."""
    def show(k: int, nk: int) -> None:
        bank_figure(pool, k, nk, palette, seed)
        plt.show()

    return w.interactive(show, k=w.IntSlider(value=k, min=1, max=6, description="K", continuous_update=False),
                         nk=w.IntSlider(value=nk, min=0, max=100, step=5, description="N_K (0 = all)",
                                        continuous_update=False))
