"""Tables of the chapters: our numbers (mean±std over seeds) beside the paper's, with their provenance.

Our metrics are fractions in columns ``<stage>.<split>.<metric>`` of the runner's tidy table (one row per run);
:func:`paper_comparison` puts mean±std over seeds beside the paper's numbers with
:func:`pbip_core.experiments.report.render_comparison`, and :func:`provenance` says which profile, dataset, encoder,
seeds and trims produced them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from html import escape as html_escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import HTML

from ..config import get_key, make_config
from ..data import known_name, load_info
from ..experiments.grid import read_grid, resolve
from ..experiments.report import (
    DATASETS,
    PAPER,
    compare,
    paper_table,
    render_comparison,
    summarize,
)
from ..method.model import adaptive_threshold
from ..nets.backbones import available_backbones
from ..nets.encoders import available_encoders

METRICS = ("miou", "fwiou", "biou", "dice")


PAPER_ENCODERS = {"clip": "CLIP", "medclip": "MedCLIP", "plip": "PLIP", "dinov2": "DINOv2"}


PAPER_BACKBONES = {"mit_b1": "SegFormer", "resnet18": "ResNet18", "resnet50": "ResNet50"}


# ---------------------------------------------------------------------------------------------------- provenance
def paper_dataset(ch: Any) -> str:
    """The paper's dataset our numbers are put beside: the dataset itself when it is one of the paper's four, else
    BCSS-WSSS (the synthetic set stands in for it: same classes and palette)."""
    name = load_info(ch.dataset).name if Path(ch.dataset).is_dir() else Path(ch.dataset).name
    key = known_name(str(name))
    return key if key in DATASETS else "bcss-wsss"


def trims(grid: Any) -> dict[str, Any]:
    """The grid-wide overrides (what the book changed relative to the profile for every run)."""
    return {k: v for k, v in grid.overrides.items() if k != "bank.encoder"}


def provenance(ch: Any, grid: Any, what: str = "") -> str:
    """One sentence: profile, dataset, encoder, backbone, epochs (and stage 2), seeds, trims and what is scored."""
    cfg = make_config(grid.profile, {**grid.overrides})
    name = Path(grid.datasets[0]).name if grid.datasets else Path(ch.dataset).name
    own = name == Path(ch.dataset).name                   # the chapter's dataset, not a grid's own (GRID_DATASETS)
    dataset = name + (" (synthetic stand-in for BCSS-WSSS)" if own and ch.synthetic else
                      " (real Kather 2016 H&E tiles, BCSS-WSSS's classes)" if own and ch.builtin else "")
    trim = ", ".join(f"{k}={v}" for k, v in trims(grid).items()) or "none"
    s2 = cfg.stage2
    stage2 = (f", stage 2: DeepLab-v2 on {s2.backbone} ({'pretrained' if s2.pretrained else 'random init'}), "
              f"{s2.epochs} epochs" if grid.stage2 else "")
    return (f"profile {grid.profile}, dataset {dataset}, encoder {cfg.bank.encoder}, backbone {cfg.model.backbone}"
            f", {cfg.train.epochs} epochs{stage2}, seeds {list(grid.seeds)}, book-grid trims: {trim}"
            + (f"; {what}" if what else ""))


# ---------------------------------------------------------------------------------------------------- tables
def paper_comparison(df: pd.DataFrame, table: str | int, ch: Any, *, key: str = "variant", stage: str = "stage1",
                     split: str = "test", metrics: Sequence[str] = METRICS, row_map: Mapping[str, str] | None = None,
                     only_ours: bool = True, what: str = "") -> pd.DataFrame:
    """Our rows (mean±std over seeds of ``<stage>.<split>.<metric>``) beside the paper's ``table``.

    The provenance caption names the chapter's profile, dataset, encoder, seeds and the grid's trims.
    """
    grid = df.attrs.get("grid")
    scored = what or f"{'stage-1 pseudo masks' if stage == 'stage1' else 'stage-2 predictions'} on {split}"
    prov = provenance(ch, grid, scored) if grid is not None else f"profile {ch.profile}; {scored}"
    cols = [key] + [c for c in (f"{stage}.{split}.{m}" for m in metrics) if c in df.columns]
    return render_comparison(df[cols].copy(), table, paper_dataset(ch), key=key, metrics=metrics, provenance=prov,
                             columns=f"{stage}.{split}.", row_map=row_map, only_ours=only_ours)


def show(table: pd.DataFrame, caption: str | None = None) -> Any:
    """A table for a notebook as HTML (:func:`show_table` with every column in the table and two decimals): its
    caption (``caption`` or ``table.attrs["caption"]``) above it, missing values as "–", integral numbers as
    integers, long texts as numbered notes under the table."""
    return show_table(table, digits=2, caption=caption)


# ---------------------------------------------------------------------------------------------------- display
#: Missing values in a displayed table (NaN, None, and the dashes other helpers write for "no number").
MISSING = "\u2013"
_MISSING_TEXT = {"", "—", "–", "nan", "NaN", "None"}
_NUMBER_TEXT = re.compile(r"^[+\-−–]?\d[\d.,]*(\s*±\s*\d[\d.,]*)?\s*%?$")   # "45.20±1.30", "-0.4", "12 %"
#: A text cell longer than this many characters becomes a numbered note under the table (its start stays).
NOTE_CHARS = 40

TABLE_CSS = """<style>
.pbip-table-wrap { max-width: 100%; overflow-x: auto; margin: 0.4em 0 0.8em 0; }
div.cell_output table.pbip-table, table.pbip-table { max-width: 100%; width: auto; table-layout: auto;
  border-collapse: collapse; font-size: 0.78rem; line-height: 1.3; margin: 0; }
table.pbip-table caption { caption-side: top; text-align: left; font-style: italic; font-size: 0.85rem;
  padding-bottom: 0.3em; overflow-wrap: anywhere; }
div.cell_output table.pbip-table th, div.cell_output table.pbip-table td, table.pbip-table th, table.pbip-table td {
  padding: 0.15em 0.45em; vertical-align: top; text-align: left; white-space: normal; overflow-wrap: anywhere;
  word-break: break-word; max-width: 22em; }
table.pbip-table thead th { border-bottom: 1px solid #888; }
table.pbip-table td.pbip-num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.pbip-table sup { font-size: 0.7em; }
.pbip-notes { font-size: 0.75rem; margin: 0.2em 0 0.6em 0; padding-left: 1.6em; overflow-wrap: anywhere; }
details.pbip-more > summary { font-size: 0.8rem; cursor: pointer; }
</style>"""


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, str):
        return v.strip() in _MISSING_TEXT
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):          # arrays, lists: not a missing scalar
        return False


def format_value(v: Any, digits: int = 1) -> str:
    """A cell as text: missing -> "–", integral numbers (3.0, ``np.int64(20)``) -> "3", "20", other floats with
    ``digits`` decimals (a nonzero value that would round to 0 with 2 significant digits instead: 0.0012), text as
    is."""
    if _is_missing(v):
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f):
            return "∞" if f > 0 else "−∞"
        if f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        if f != 0 and abs(f) < 0.5 * 10 ** -digits:
            return f"{f:.2g}"
        return f"{f:.{digits}f}"
    return str(v)


def _digits_of(col: Any, digits: int | Mapping[Any, int]) -> int:
    if not isinstance(digits, Mapping):
        return int(digits)
    for key in (col, col[0] if isinstance(col, tuple) else None, col[-1] if isinstance(col, tuple) else None):
        if key is not None and key in digits:
            return int(digits[key])
    return 1


def _label(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _matches(col: Any, name: Any) -> bool:
    return col == name or (isinstance(col, tuple) and (col[0] == name or tuple(name if isinstance(name, tuple)
                                                                                  else (name,)) == col))


def _shorten(text: str, n: int) -> str:
    """The first words of ``text`` within about ``n`` characters, with an ellipsis."""
    cut = text[:n].rsplit(" ", 1)[0] if " " in text[:n] else text[:n]
    return cut.rstrip(" ,;:(") + "…"


class _Notes:
    """Numbered notes under a table: explicit ones first, then long cell texts (identical texts share a number)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def html(self) -> str:
        if not self.texts:
            return ""
        items = "".join(f'<li value="{i}">{_esc(t)}</li>' for i, t in enumerate(self.texts, 1))
        return f'<ol class="pbip-notes">{items}</ol>'


def _esc(v: Any) -> str:
    return html_escape(str(v), quote=True)


def _sup(n: int) -> str:
    return f"<sup>{n}</sup>"


def _header_html(columns: pd.Index, index_names: Sequence[str], col_notes: Mapping[Any, int]) -> str:
    """``<thead>``: one row per column level (consecutive equal labels merged), the index names on the left."""
    levels = columns.nlevels
    tuples = [c if isinstance(c, tuple) else (c,) for c in columns]
    rows = []
    for lev in range(levels):
        cells = [f'<th rowspan="{levels}">{_esc(n)}</th>' for n in index_names] if lev == 0 else []
        j = 0
        while j < len(tuples):
            k = j + 1
            while k < len(tuples) and tuples[k][: lev + 1] == tuples[j][: lev + 1] and lev < levels - 1:
                k += 1
            prefix = tuples[j][: lev + 1]
            note = col_notes.get(prefix) or (col_notes.get(prefix[0]) if lev == 0 else None)
            span = f' colspan="{k - j}"' if k - j > 1 else ""
            cells.append(f"<th{span}>{_esc(_label(tuples[j][lev]))}{_sup(note) if note else ''}</th>")
            j = k
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<thead>" + "".join(rows) + "</thead>"


def _table_html(df: pd.DataFrame, show_index: bool, digits: int | Mapping[Any, int], notes: _Notes,
                col_notes: Mapping[Any, int], row_notes: Mapping[Any, int], note_chars: int,
                caption: str = "") -> str:
    index_names = [_label(n) for n in df.index.names] if show_index else []
    body = []
    prev: tuple = ()
    for key, row in zip(df.index, df.itertuples(index=False, name=None)):
        cells = []
        if show_index:
            parts = key if isinstance(key, tuple) else (key,)
            for lev, part in enumerate(parts):        # a repeated outer label is shown once
                same = len(prev) == len(parts) and prev[: lev + 1] == parts[: lev + 1] and lev < len(parts) - 1
                note = row_notes.get(key) if lev == len(parts) - 1 else None
                cells.append(f"<th>{'' if same else _esc(_label(part))}{_sup(note) if note else ''}</th>")
            prev = parts
        for col, v in zip(df.columns, row):
            text = format_value(v, _digits_of(col, digits))
            numeric = (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                       or bool(_NUMBER_TEXT.match(text)))
            if isinstance(v, str) and len(text) > note_chars:
                cells.append(f"<td>{_esc(_shorten(text, note_chars // 2))}{_sup(notes.add(text))}</td>")
            else:
                cells.append(f'<td class="pbip-num">{_esc(text)}</td>' if numeric or text == MISSING
                             else f"<td>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return (f'<div class="pbip-table-wrap"><table class="pbip-table">{cap}'
            f"{_header_html(df.columns, index_names, col_notes)}<tbody>{''.join(body)}</tbody></table></div>")


def table_html(df: pd.DataFrame, *, main: Sequence[Any] | None = None, digits: int | Mapping[Any, int] = 1,
               notes: Mapping[Any, str] | Sequence[str] = (), caption: str | None = None,
               index: bool | None = None, drop_empty: bool = True, note_chars: int = NOTE_CHARS) -> str:
    """The HTML of :func:`show_table` (a string: CSS, the table, its notes and the collapsible other columns)."""
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)
    caption = caption if caption is not None else str(df.attrs.get("caption", "") or "")
    show_index = index if index is not None else not (isinstance(df.index, pd.RangeIndex) and df.index.name is None)
    if drop_empty and len(df.columns):
        df = df[~df.apply(lambda r: all(_is_missing(v) for v in r), axis=1)]
    if main is None:
        main_cols = list(df.columns)
    else:
        main_cols = [c for c in df.columns if any(_matches(c, m) for m in main)]
        unknown = [m for m in main if not any(_matches(c, m) for c in df.columns)]
        if unknown:
            raise KeyError(f"show_table: main columns not in the table: {unknown}; columns are {list(df.columns)}")
    rest = [c for c in df.columns if c not in main_cols]
    box = _Notes()
    col_notes: dict[Any, int] = {}
    row_notes: dict[Any, int] = {}
    if isinstance(notes, Mapping):
        for key, text in notes.items():
            if any(_matches(c, key) for c in df.columns):
                col_notes[key if isinstance(key, tuple) else (key,)] = box.add(str(text))
            elif key in df.index:
                row_notes[key] = box.add(str(text))
            else:
                box.add(f"{key}: {text}")
    else:
        for text in ([notes] if isinstance(notes, str) else notes):
            box.add(str(text))
    parts = [_table_html(df[main_cols], show_index, digits, box, col_notes, row_notes, note_chars, caption)]
    if rest:
        names = ", ".join(_label(c if not isinstance(c, tuple) else " ".join(map(_label, c))) for c in rest)
        names = names if len(names) <= 80 else _shorten(names, 80)
        inner = _table_html(df[rest], show_index, digits, box, col_notes, row_notes, note_chars)
        parts.append(f'<details class="pbip-more"><summary>{len(rest)} more column{"s" if len(rest) > 1 else ""}: '
                     f"{_esc(names)}</summary>{inner}</details>")
    return TABLE_CSS + "".join(parts) + box.html()


def show_table(df: pd.DataFrame, *, main: Sequence[Any] | None = None, digits: int | Mapping[Any, int] = 1,
               notes: Mapping[Any, str] | Sequence[str] = (), caption: str | None = None,
               index: bool | None = None, drop_empty: bool = True, note_chars: int = NOTE_CHARS) -> HTML:
    """A table that fits the page, as an IPython :class:`~IPython.display.HTML` object.

    ``main``: the columns shown in the table (names; for two-level columns a top-level name selects its group;
    None = all); the other columns go into a collapsible ``<details>`` table below it. Numbers: integral values as
    integers (K = 3, N_K = 20), other floats with ``digits`` decimals (or a mapping column -> decimals, default 1),
    missing values as "–". Text cells longer than ``note_chars`` keep their first words and move to numbered notes
    under the table; ``notes`` adds notes: a list of texts, or a mapping column (or row label) -> text that puts the
    note's number on that header. ``caption``: above the table (default ``df.attrs["caption"]``). ``index``: show
    the index (default: unless it is an unnamed range). ``drop_empty``: leave out rows without any value. The CSS
    wraps text, keeps the table within the content width and uses a small font.
    """
    return HTML(table_html(df, main=main, digits=digits, notes=notes, caption=caption, index=index,
                           drop_empty=drop_empty, note_chars=note_chars))


def ours_table(df: pd.DataFrame, key: str = "variant", stage: str = "stage1", split: str = "test",
               metrics: Sequence[str] = METRICS, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Our mean±std (percent) per ``key`` for tables without a paper counterpart; ``extra`` config columns kept."""
    cols = [f"{stage}.{split}.{m}" for m in metrics]
    s = summarize(df, [key, *extra], cols)
    out = pd.DataFrame({key: s[key], **{e: s[e] for e in extra}})
    for m, c in zip(metrics, cols):
        out[f"{m} (%)"] = [_pct(a, b) for a, b in zip(s[f"{c}.mean"], s[f"{c}.std"])]
    out["n"] = s["n"]
    return out.set_index(key)


def _pct(mean: float, std: float) -> str:
    if mean is None or np.isnan(mean):
        return "—"
    return f"{100 * mean:.2f}" if std is None or np.isnan(std) else f"{100 * mean:.2f}±{100 * std:.2f}"


def ttests(df: pd.DataFrame, ref: str, others: Sequence[str], metric: str, by: str = "method") -> pd.DataFrame:
    """Welch t-tests of ``metric`` between the runs of ``ref`` and each of ``others`` (NaN p with < 2 runs each)."""
    rows = []
    for o in others:
        na, nb = int((df[by] == ref).sum()), int((df[by] == o).sum())
        if min(na, nb) < 2:
            rows.append({"a": ref, "b": o, "metric": metric, "mean a (%)": np.nan, "mean b (%)": np.nan,
                         "t": np.nan, "p": np.nan, "test": f"needs >= 2 seeds each (have {na}, {nb})"})
            continue
        r = compare(df, ref, o, metric, by=by)
        rows.append({"a": ref, "b": o, "metric": metric, "mean a (%)": 100 * r["mean_a"],
                     "mean b (%)": 100 * r["mean_b"], "t": r["t"], "p": r["p"], "test": r["test"]})
    return pd.DataFrame(rows)


def stage_gain(df: pd.DataFrame, split: str = "test", metric: str = "miou", key: str = "method") -> pd.DataFrame:
    """Per ``key``: mean ``metric`` (percent) of the stage-1 pseudo masks and of stage 2, and the gain (pp)."""
    s1, s2 = f"stage1.{split}.{metric}", f"stage2.{split}.{metric}"
    g = df.groupby(key, sort=False)[[s1, s2]].mean() * 100
    g.columns = [f"stage 1 pseudo masks {metric} (%)", f"stage 2 {metric} (%)"]
    g["gain (pp)"] = g.iloc[:, 1] - g.iloc[:, 0]
    return g.round(2)


# ---------------------------------------------------------------------------------------------------- tables 3, 5
def label_of(variant: str) -> str:
    """``"medclip / mit_b1"`` -> ``"MedCLIP / SegFormer"`` (the paper's Table 3 row name); other names unchanged."""
    enc, _, bb = (s.strip() for s in str(variant).partition("/"))
    if enc in PAPER_ENCODERS and bb in PAPER_BACKBONES:
        return f"{PAPER_ENCODERS[enc]} / {PAPER_BACKBONES[bb]}"
    return str(variant)


def weights_status(variants: Mapping[str, Mapping[str, Any]], encoders: Mapping[str, str],
                   backbones: Mapping[str, str]) -> dict[str, str]:
    """Per variant ``{bank.encoder, model.backbone}``: "available" or which weights are missing here.

    ``encoders`` / ``backbones`` map names to "available" or a reason
    (:func:`pbip_core.nets.encoders.available_encoders`, :func:`pbip_core.nets.backbones.available_backbones`).
    """
    out = {}
    for name, ov in variants.items():
        enc, bb = ov.get("bank.encoder"), ov.get("model.backbone")
        why = []
        if enc is not None and encoders.get(enc) != "available":
            why.append(f"encoder {enc}" + ("" if enc in encoders else " (unknown)"))
        if bb is not None and backbones.get(bb) != "available":
            why.append(f"backbone {bb}" + ("" if bb in backbones else " (unknown)"))
        out[name] = "available" if not why else "weights not available offline (" + "; ".join(why) + ")"
    return out


def table3_plan(ch: Any) -> tuple[list[str], pd.DataFrame]:
    """Which Table-3 variants run here (weights available and selected for the profile), and a table of every
    variant and paper row with its status."""
    raw = read_grid("book-table3")
    selected = resolve(raw, ch.profile, ch.dataset)["variants"]
    status = weights_status(raw["variants"], available_encoders(), available_backbones())
    for v, st in status.items():
        if st == "available" and v not in selected:
            status[v] = f"weights available; not in the {ch.profile} profile's selection (book-table3.yaml)"
    runnable = [v for v in selected if status[v] == "available"]
    rows = [{"row": label_of(v), "variant": v, "status": st} for v, st in status.items()]
    have = {r["row"] for r in rows}
    try:
        paper_rows = pd.unique(paper_table(3, paper_dataset(ch))["row"])
    except KeyError:                       # the paper's Table 3 covers BCSS-WSSS only
        paper_rows = []
    for r in paper_rows:
        if r not in have:
            rows.append({"row": r, "variant": "", "status": "not implemented in this book (no such backbone)"})
    return runnable, pd.DataFrame(rows).set_index("row")


def table3_comparison(df: pd.DataFrame, ch: Any, status: pd.DataFrame) -> pd.DataFrame:
    """Table 3: every paper row and every variant we ran, the paper's numbers beside ours, and a status column."""
    df = df.assign(row=[label_of(v) for v in df["variant"]])
    table = paper_comparison(df, 3, ch, key="row", only_ours=False)
    table[("", "this book: status")] = [
        "ran" if r in set(df["row"]) else status["status"].get(r, "not in the book grid") for r in table.index]
    return table


# ---------------------------------------------------------------------------------------------------- figure 3, 4
def ratio_frame(df: pd.DataFrame, metric: str = "stage1.test.miou") -> pd.DataFrame:
    """Figure 3 points: one row per (series, run) with ``series`` ("beta/alpha" or "theta2/theta1"), ``ratio`` and
    the metric.

    A run belongs to the series its variant name (or the name of an identical run, listed in ``aliases``) starts
    with; the ratio is read from its config columns (``loss.beta / loss.alpha`` or ``loss.theta2 / loss.theta1``).
    """
    ratio = {"beta/alpha": ("loss.beta", "loss.alpha"), "theta2/theta1": ("loss.theta2", "loss.theta1")}
    rows = []
    for _, r in df.iterrows():
        aliases = str(r.get("aliases", "")) if pd.notna(r.get("aliases", "")) else ""
        names = [str(r["variant"])] + [a.split("/", 1)[-1] for a in aliases.split()]
        for s, (num, den) in ratio.items():
            if any(n.startswith(s) for n in names):
                rows.append({"series": s, "ratio": float(r[num]) / float(r[den]), "seed": r["seed"],
                             metric: r[metric]})
    out = pd.DataFrame(rows, columns=["series", "ratio", "seed", metric])
    return out.sort_values(["series", "ratio"]).reset_index(drop=True)


def bank_frame(df: pd.DataFrame, metric: str = "stage1.test.miou") -> pd.DataFrame:
    """Figure 4 points: selection, N_K (``bank.nk``; "all" when above every class's eligible images), metric."""
    out = df[["variant", "seed", "bank.selection", "bank.nk", metric]].rename(
        columns={"bank.selection": "selection", "bank.nk": "nk"})
    out = out.assign(all_images=out["nk"] >= 100_000)
    return out.sort_values(["selection", "nk"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------- chapter 09
#: Every difference between the paper (as this book reads it) and the official code (QingchenTang/PBIP, BCSS-WSSS
#: stage 1), with the config key(s) that switch it, where the official code does it (file: function, as read in the
#: public source) and the variant of ``grids/book/book-official.yaml`` that flips only that switch ("" = not run,
#: ``reason`` says why); ``against`` names the variant it is compared with when that is not the paper's settings
#: (a switch that only acts on backbone stage 4 is measured on top of "levels 1-4").
DIFFERENCES: list[dict[str, Any]] = [
    {"difference": "prototype encoder", "keys": ["bank.encoder"],
     "official": "ImageNet Swin-T + random 768->512 projection (MedCLIP weights never loaded)",
     "source": "features/excract_medclip_proces.py: MedCLIPModel(vision_cls=MedCLIPVisionModelViT), no from_pretrained",
     "variant": "", "reason": "its weights are hub downloads, not available offline"},
    {"difference": "prototypes", "keys": ["bank.selection"], "variant": "centroid prototypes",
     "source": "features/k_mean_cos_per_class.py: CosineSimilarityKMeans centres over all bank images"},
    {"difference": "backbone levels", "keys": ["model.levels"], "variant": "levels 1-4",
     "source": "model/model.py: ClsNetwork.forward, four stages"},
    {"difference": "last-stage stride", "keys": ["model.output_stride"], "variant": "output stride 16",
     "against": "levels 1-4", "source": "work_dirs/bcss/classification/config.yaml: stride [4, 2, 2, 1]"},
    {"difference": "input channels and normalisation", "keys": ["model.input_norm"], "variant": "BGR input, official mean/std",
     "source": "datasets (cv2.imread: BGR) + utils/trainutils.py: get_mean_std"},
    {"difference": "projected prototypes normalised", "keys": ["model.normalize_prototypes"],
     "variant": "unnormalised prototypes", "source": "model/model.py: ClsNetwork.forward normalises _x only"},
    {"difference": "prototype MLP width", "keys": ["model.proj_hidden"], "variant": "MLP hidden 256",
     "source": "model/model.py: AdaptiveLayer(512, n_ratio=0.5, C_i)"},
    {"difference": "logit scale", "keys": ["model.logit_scale", "model.learn_logit_scale"],
     "variant": "learnable logit scale 1/0.07", "source": "model/model.py: logit_scale1-4 = nn.Parameter(1/0.07)"},
    {"difference": "CLS loss level weights", "keys": ["loss.cls_level_weights"], "variant": "CLS level weights 0/0.1/1",
     "source": "config.yaml l1-l4 = 0, 0.1, 1, 1.5; train_stage_1.py: cls_loss"},
    {"difference": "FG/BG loss weights, CAM term", "keys": ["loss.beta", "loss.theta2", "loss.cam_reg"],
     "variant": "SIM weights and CAM term",
     "source": "train_stage_1.py: cls_loss + (fg_loss + bg_loss + 0.0005 * mean(cam4)) * l5, l5 = 0.1"},
    {"difference": "temperature of eq. 9, 11", "keys": ["loss.tau"], "variant": "temperature 0.07",
     "source": "train_stage_1.py: InfoNCELossFG/BG(temperature=0.07)"},
    {"difference": "InfoNCE reduction", "keys": ["loss.nce"], "variant": "batch InfoNCE",
     "source": "utils/contrast_loss.py: InfoNCELossFG / InfoNCELossBG (sums over the batch before the log)"},
    {"difference": "FG/BG compared with", "keys": ["model.fgbg_space"], "variant": "raw-prototype space",
     "source": "utils/hierarchical_utils.py: pair_features(fg, bg, l_fea, ...) with the unprojected l_fea"},
    {"difference": "mask threshold (eq. 4)", "keys": ["model.delta", "model.threshold_scope"],
     "variant": "threshold 0.5 x global max",
     "source": "utils/fgbg_feature.py: MaskAdapter_DynamicThreshold (alpha x max over all channels of the image)"},
    {"difference": "CAM behind FG/BG (eq. 3)", "keys": ["model.cam_source"], "variant": "last level's CAM",
     "source": "train_stage_1.py: process_batch(inputs, cam4, ...); model.py: cam1-3 detached"},
    {"difference": "FG/BG pairs", "keys": ["model.pairs"], "variant": "sub-class pairs",
     "source": "train_stage_1.py: cls4_bir = (cls4 > cls4_expand) * subclass_labels"},
    {"difference": "FG/BG images (eq. 5)", "keys": ["model.separation"], "variant": "official FG/BG images",
     "source": "utils/fgbg_feature.py: FeatureExtractor.extract_features + get_masked_features"},
    {"difference": "schedule", "keys": ["train.schedule", "train.lr", "train.weight_decay", "train.epochs"],
     "variant": "linear lr decay", "source": "utils/optimizer.py: PolyWarmupAdamW (power 1, no warm-up); config.yaml"},
    {"difference": "mixed precision", "keys": ["train.amp"],
     "official": "fp16 autocast + GradScaler", "source": "train_stage_1.py: torch.cuda.amp.autocast, GradScaler",
     "variant": "", "reason": "autocast only acts on a GPU; the CPU profiles run fp32 either way"},
    {"difference": "pseudo-mask fusion", "keys": ["model.levels", "pseudo.level_weights"],
     "variant": "levels 1-4 + fusion 0/0.3/0.3/0.4", "against": "levels 1-4", "source": "utils/validate.py: fuse234 = 0.3 cam2 + 0.3 cam3 + 0.4 cam4"},
    {"difference": "sub-map merge in pseudo masks", "keys": ["pseudo.merge"], "variant": "softmax merge of sub-maps",
     "source": "utils/hierarchical_utils.py: merge_subclass_cams_to_parent(method=merge_test='max')"},
    {"difference": "CAM normalisation in pseudo masks", "keys": ["pseudo.cam_norm"], "variant": "ReLU + min-max CAMs",
     "source": "utils/validate.py: get_seg_label"},
    {"difference": "test-time augmentation", "keys": ["pseudo.tta"], "variant": "test-time augmentation",
     "source": "utils/validate.py: validate, ttach HorizontalFlip x Multiply(0.9, 1.0, 1.1)"},
    {"difference": "background in pseudo masks", "keys": ["pseudo.white_background"], "variant": "no white rule",
     "source": "utils/validate.py: get_seg_label drops its background channel; argmax over the classes"},
    {"difference": "weights scored on test", "keys": ["pseudo.test_checkpoint"], "variant": "last weights on test",
     "source": "train_stage_1.py: validate(test) after the loop; best_cam.pth only for generate_cam (train)"},
]

#: The rows of the book-official grid that are not one difference: the paper's settings, the whole preset, the book's
#: own approximation, and the reading s = 1.
OFFICIAL_BASELINE, OFFICIAL_PRESET = "paper (this book)", "official preset"


def differences_table(measured: pd.DataFrame | None = None, metric: str = "stage1.test.miou",
                      baseline: str = OFFICIAL_BASELINE, official: str = OFFICIAL_PRESET,
                      alpha: float = 0.05) -> pd.DataFrame:
    """The paper/official differences, one row each: the values of both sides read from the configs (profile
    ``paper``, methods ``pbip`` and ``official``), the official source, the config switch and, where ``measured``
    (the book-official results) has the variant, the seeds, ``metric`` (mean, percent), its change against
    ``baseline`` (or the row's ``against`` variant; pp) with a Welch t-test, and whether it explains part of the gap
    between the official preset and the paper's settings (same sign as that gap and p < ``alpha``)."""
    paper, off = make_config("paper"), make_config("paper", {"method": "official"})
    base = _mean_of(measured, baseline, metric) if measured is not None else np.nan
    gap = (_mean_of(measured, official, metric) - base) if measured is not None else np.nan
    rows = []
    for d in DIFFERENCES:
        fmt = lambda cfg: "; ".join(f"{k.split('.')[-1]}={_short(get_key(cfg, k))}" for k in d["keys"])
        v, ref = d["variant"], d.get("against", baseline)
        ours = _mean_of(measured, v, metric) if (measured is not None and v) else np.nan
        delta = ours - (_mean_of(measured, ref, metric) if measured is not None else np.nan)
        p, seeds, sd = np.nan, "", np.nan
        if measured is not None and v:
            vals = pd.to_numeric(measured.loc[measured["variant"] == v, metric], errors="coerce").dropna()
            sd = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
            seeds = ",".join(str(int(x)) for x in sorted(measured.loc[measured["variant"] == v, "seed"]))
            p = _welch_p(measured, ref, v, metric)
        rows.append({"difference": d["difference"], "paper (profile paper)": fmt(paper),
                     "official code": d.get("official") or fmt(off), "official source": d.get("source", ""),
                     "config switch": ", ".join(d["keys"]),
                     "measured as": v or f"not measurable here: {d.get('reason', '')}".rstrip(": "),
                     "compared with": ref if v else "", "seeds": seeds, "mIoU (%)": 100 * ours,
                     "std (pp)": 100 * sd, "Δ (pp)": 100 * delta, "p (Welch)": p,
                     "explains part of the gap": _explains(delta, p, gap, alpha)})
    out = pd.DataFrame(rows).set_index("difference")
    out.attrs["gap_pp"] = 100 * gap
    return out


def _welch_p(df: pd.DataFrame, a: str, b: str, metric: str) -> float:
    """p of the Welch t-test of ``metric`` between variants a and b; NaN with fewer than 2 runs each."""
    na, nb = int((df["variant"] == a).sum()), int((df["variant"] == b).sum())
    if min(na, nb) < 2:
        return np.nan
    p = compare(df, a, b, metric, by="variant")["p"]
    return float(p) if np.isfinite(p) else np.nan


def _explains(delta: float, p: float, gap: float, alpha: float) -> str:
    """"yes" when the switch moves the metric the way the official preset does (same sign as the gap) with
    p < alpha; "against" when significantly the other way; "no (n.s.)"; "" when not measured."""
    if not np.isfinite(delta):
        return ""
    if not np.isfinite(p) or not np.isfinite(gap):
        return "untested (< 2 seeds)" if not np.isfinite(p) else "no official preset run"
    if p >= alpha:
        return "no (n.s.)"
    return "yes" if np.sign(delta) == np.sign(gap) else "against"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)


def _mean_of(df: pd.DataFrame, variant: str, metric: str) -> float:
    v = pd.to_numeric(df.loc[df["variant"] == variant, metric], errors="coerce").dropna()
    return float(v.mean()) if len(v) else np.nan


def delta_table(df: pd.DataFrame, baseline: str, metrics: Sequence[str] = METRICS, stage: str = "stage1",
                split: str = "test", seconds: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per variant: mean of each metric (percent) and its change against the ``baseline`` variant (pp); with
    ``seconds`` (variant -> training seconds, :func:`train_seconds`) a column of training time."""
    rows = []
    for v in pd.unique(df["variant"]):
        row: dict[str, Any] = {"variant": v}
        for m in metrics:
            c = f"{stage}.{split}.{m}"
            mean = _mean_of(df, v, c)
            row[f"{m} (%)"] = 100 * mean
            row[f"Δ {m} (pp)"] = 100 * (mean - _mean_of(df, baseline, c))
        if seconds is not None:
            row["stage-1 training (s)"] = float(seconds.get(v, np.nan))
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").round(2)


# ---------------------------------------------------------------------------------------------------- the bank, eq. 4, Table 6
def cosine_matrix(protos: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every prototype with every other: P (N, K, d) -> (N*K, N*K), rows class-major."""
    p = F.normalize(protos.reshape(-1, protos.shape[-1]).float(), dim=-1)
    return (p @ p.T).numpy()


def similarity_summary(protos: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """Mean cosine between prototypes of the same class (off-diagonal) and of different classes, per class."""
    n, k, _ = protos.shape
    s = cosine_matrix(protos).reshape(n, k, n, k)
    rows = {}
    for i, c in enumerate(classes):
        within = s[i, :, i, :][~np.eye(k, dtype=bool)] if k > 1 else np.array([np.nan])
        between = np.concatenate([s[i, :, j, :].ravel() for j in range(n) if j != i])
        rows[c] = {"within class (other prototypes)": float(np.mean(within)),
                   "to other classes": float(np.mean(between)), "max to another class": float(np.max(between))}
    return pd.DataFrame(rows).T.rename_axis("class")


def foreground_share(m: torch.Tensor, present: torch.Tensor, deltas: Sequence[float], scope: str = "class",
                     fused: torch.Tensor | None = None) -> pd.DataFrame:
    """Share of foreground pixels of b (eq. 4) over the (image, class) pairs present, for each delta.

    m (B, N, H, W) in [0, 1]; present (B, N) bool. Also the share of the soft FG weight b * M and of M itself
    ("no AT": FG = M). With ``fused`` = M' (B, N, H, W) of eq. 3, b is cut on M' (tau = delta max M', this book's
    reading) and a column gives the share that cutting M itself would keep (the min-max reading). One row per delta.
    """
    sel = present.bool()
    rows = []
    for d in deltas:
        b = adaptive_threshold(m if fused is None else fused, float(d), scope)
        row = {"delta": float(d), "foreground share (b)": float(b[sel].mean()),
               "mean FG weight b·M": float((b * m)[sel].mean()),
               "mean FG weight without AT (M)": float(m[sel].mean())}
        if fused is not None:
            row["foreground share if cut on M"] = float(adaptive_threshold(m, float(d), scope)[sel].mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("delta")


def table6_comparison(ours: pd.DataFrame, classes: Sequence[str], provenance: str) -> pd.DataFrame:
    """The paper's Table 6 rows (BCSS-WSSS) above ours, same columns (per-class F1 and the mean, fractions).

    ``ours``: :func:`zero_shot_table`'s result. Returns a table indexed by (source, row) with columns
    ``F1 <class>`` and ``F1 mean`` (3 decimals as in the paper, "—" where there is no number) and ``note``;
    ``.attrs["caption"]`` says where each part comes from.
    """
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
