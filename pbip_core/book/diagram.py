"""The paper's Figure 2 as a diagram whose blocks link to the chapters that compute them (the intro page).

:func:`pipeline_svg` returns an inline SVG (an HTML string: links stay clickable in the built book and in JupyterLab).
Blocks are laid out on a fixed grid; each names the step, its equations and the chapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

#: Chapter id -> page name of the built book (relative links from the intro page, which lives beside the chapters).
PAGES: dict[str, str] = {
    "01": "01_data", "02": "02_image_bank", "03": "03_similarity_masks", "04": "04_adaptive_threshold",
    "05": "05_contrastive_training", "06": "06_stage2", "07": "07_ablations", "08": "08_zero_shot",
    "09": "09_paper_vs_code", "10": "10_ebhi_seg",
}


@dataclass(frozen=True)
class Block:
    """One box: grid position (column, row), title, a second line, and the chapter it links to."""

    col: float
    row: float
    title: str
    detail: str
    chapter: str
    fill: str = "#eef3fb"


#: Figure 2 of the paper, read left to right: the bank (sec. 3.2), stage 1 (sec. 3.3-3.5), stage 2 (sec. 3.1).
FIGURE2: tuple[Block, ...] = (
    Block(0, 0, "Training patches", "image-level labels only", "01", "#f4f4f4"),
    Block(1, 0, "Image bank", "single-class, K-means, eq. 1", "02"),
    Block(2, 0, "Prototypes P", "N x K mean features", "02"),
    Block(1, 1, "ClassNet: SIM maps", "cosine to P, eq. 2-3", "03"),
    Block(2, 1, "Adaptive threshold", "FG / BG images, eq. 4-5", "04"),
    Block(2, 2, "ImgMatchNet", "encode, match to P", "05"),
    Block(1, 2, "Stage-1 loss", "CLS + FGS + BGS, eq. 6-13", "05"),
    Block(0, 2, "Pseudo masks", "argmax over the labels", "06", "#fdf1e3"),
    Block(0, 3, "Stage 2: DeepLab-v2", "trained on pseudo masks", "06", "#fdf1e3"),
)
#: Arrows between blocks (indices into :data:`FIGURE2`).
ARROWS: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (0, 3), (2, 3), (3, 4), (4, 5), (5, 6), (3, 6), (3, 7), (7, 8))
#: Side notes beside stage 2: chapters that test the pipeline rather than compute a step of it.
SIDE: tuple[tuple[str, str], ...] = (("07", "Ablations: Tables 2-5, Fig. 3-4"), ("08", "Zero-shot: Table 6"),
                                      ("09", "Paper vs official code"), ("10", "Real masks: EBHI-Seg"))


def pipeline_svg(blocks: Sequence[Block] = FIGURE2, arrows: Sequence[tuple[int, int]] = ARROWS,
                 side: Sequence[tuple[str, str]] = SIDE, pages: Mapping[str, str] = PAGES, suffix: str = ".html",
                 width: int | None = None, box_w: int = 210, box_h: int = 50, gap_x: int = 40,
                 gap_y: int = 26) -> str:
    """An inline ``<svg>`` of the pipeline; every block and side note links to ``pages[chapter] + suffix``.
    ``width`` (pixels, also the page's ``max-width``): default the grid's, its columns and gaps plus a 10 px margin
    each side (730 for the defaults)."""
    def xy(b: Block) -> tuple[float, float]:
        return 10 + b.col * (box_w + gap_x), 10 + b.row * (box_h + gap_y)

    cols = max(b.col for b in blocks) + 1
    width = int(20 + cols * box_w + (cols - 1) * gap_x) if width is None else int(width)
    rows = max(b.row for b in blocks) + 1
    height = int(20 + rows * (box_h + gap_y))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
           f'style="max-width:{width}px;font-family:sans-serif" role="img" aria-label="PBIP pipeline (Figure 2)">')
    marker = ('<defs><marker id="pbip-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>')
    parts = [svg, marker]
    for i, j in arrows:
        (x1, y1), (x2, y2) = xy(blocks[i]), xy(blocks[j])
        a, b = _edge((x1, y1), (x2, y2), box_w, box_h)
        parts.append(f'<line x1="{a[0]:.0f}" y1="{a[1]:.0f}" x2="{b[0]:.0f}" y2="{b[1]:.0f}" stroke="#555" '
                     'stroke-width="1.4" marker-end="url(#pbip-arrow)"/>')
    for b in blocks:
        x, y = xy(b)
        href = escape(pages[b.chapter] + suffix)
        parts.append(f'<a href="{href}"><title>chapter {b.chapter}</title>'
                     f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{b.fill}" stroke="#345"/>'
                     f'<text x="{x + box_w / 2}" y="{y + 20}" text-anchor="middle" font-size="14" font-weight="bold" '
                     f'fill="#123">{escape(b.title)} ({b.chapter})</text>'
                     f'<text x="{x + box_w / 2}" y="{y + 38}" text-anchor="middle" font-size="12" fill="#333">'
                     f'{escape(b.detail)}</text></a>')
    x0 = 10 + (box_w + gap_x)                          # the free cells right of stage 2
    y0 = 10 + (rows - 1) * (box_h + gap_y) + 4
    for k, (chapter, text) in enumerate(side):
        parts.append(f'<a href="{escape(pages[chapter] + suffix)}"><text x="{x0 + (k % 2) * (box_w + gap_x)}" '
                     f'y="{y0 + 16 + (k // 2) * 22}" font-size="13" fill="#1a5fb4" text-decoration="underline">'
                     f'{chapter} {escape(text)}</text></a>')
    parts.append("</svg>")
    return "".join(parts)


def _edge(a: tuple[float, float], b: tuple[float, float], w: int, h: int) -> tuple[tuple[float, float], ...]:
    """Start and end points of an arrow from box ``a`` to box ``b`` (top-left corners): centre to centre, cut at the
    box borders."""
    ca = (a[0] + w / 2, a[1] + h / 2)
    cb = (b[0] + w / 2, b[1] + h / 2)
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]

    def cut(c: tuple[float, float], sign: int) -> tuple[float, float]:
        tx = (w / 2) / abs(dx) if dx else float("inf")
        ty = (h / 2) / abs(dy) if dy else float("inf")
        t = min(tx, ty)
        return c[0] + sign * dx * t, c[1] + sign * dy * t

    return cut(ca, 1), cut(cb, -1)
