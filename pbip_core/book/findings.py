"""The "What we found" paragraphs: sentences computed from the result tables, never typed in by hand.

A chapter passes the runner's tidy table (one row per run) and says which groups to contrast; these functions
compute the means, the difference in percentage points, Welch's and the paired t-test over seeds
(:func:`pbip_core.experiments.report.compare`), a 95 % confidence interval of the paired difference, and, where the
paper has the same two rows, the paper's difference, and word the outcome: significant or not at the seeds run,
in the paper's direction or against it.

>>> c = contrast(runs, "pbip", "cam", "stage1.test.miou")        # doctest: +SKIP
>>> sentence(c)                                                    # doctest: +SKIP
'pbip 59.1 % vs cam 46.6 % (+12.5 pp; paired 95 % CI +9.8..+15.2; Welch p = 0.001, paired p = 0.004; 3 seeds)'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from IPython.display import Markdown
from scipy import stats

from ..data import IMAGE_SUFFIXES
from ..data.manifest import dataset_entry
from ..experiments.report import compare, paper_table

ALPHA = 0.05


@dataclass(frozen=True)
class Contrast:
    """Group ``a`` against group ``b`` on one metric (values in percent, differences in percentage points)."""

    a: str
    b: str
    metric: str
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    p_welch: float          # NaN when a group has < 2 runs
    p_paired: float         # NaN when < 2 seeds are shared
    ci: tuple[float, float]  # 95 % CI of the paired difference a - b (NaN without pairs)
    wins: int               # seeds where a > b
    pairs: int              # seeds run by both

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def p(self) -> float:
        """The p-value the wording uses: the paired test when seeds pair up (it removes the seed's shared noise)."""
        return self.p_paired if not math.isnan(self.p_paired) else self.p_welch

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p) and self.p < ALPHA


def _select(df: pd.DataFrame, group: str, by: str) -> pd.DataFrame:
    return df[df[by].astype(str) == str(group)]


def contrast(df: pd.DataFrame, a: str, b: str, metric: str = "stage1.test.miou", by: str = "method") -> Contrast:
    """Means (percent), Welch and paired t-tests, and the paired 95 % CI of ``a`` - ``b`` on ``metric``."""
    ga, gb = _select(df, a, by), _select(df, b, by)
    if ga.empty or gb.empty:
        have = ", ".join(sorted(df[by].astype(str).unique()))
        raise ValueError(f"contrast: no runs of {a if ga.empty else b!r} in column {by!r} (have: {have})")
    xa = pd.to_numeric(ga[metric], errors="coerce").dropna() * 100
    xb = pd.to_numeric(gb[metric], errors="coerce").dropna() * 100
    p_welch = compare(df, a, b, metric, by=by)["p"] if min(len(xa), len(xb)) >= 2 else math.nan
    paired = pd.merge(ga[["seed", metric]], gb[["seed", metric]], on="seed", suffixes=("_a", "_b")).dropna()
    d = (paired[f"{metric}_a"] - paired[f"{metric}_b"]).to_numpy(float) * 100
    if len(d) >= 2:
        p_paired = compare(df, a, b, metric, by=by, paired=True)["p"]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        ci = (float(d.mean() - half), float(d.mean() + half))
    else:
        p_paired, ci = math.nan, (math.nan, math.nan)
    return Contrast(str(a), str(b), metric, float(xa.mean()), float(xb.mean()), len(xa), len(xb), float(p_welch),
                    float(p_paired), ci, int((d > 0).sum()), len(d))


def _p(p: float) -> str:
    """A p-value as a table cell: ``—`` (no test), ``< 0.001``, 3 decimals below 0.01, else 2."""
    return "—" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}")


def _p_is(p: float, name: str = "p") -> str:
    """A p-value in a sentence: ``p = 0.004`` or ``p < 0.001`` (never ``p = < 0.001``)."""
    v = _p(p)
    return f"{name} {v}" if v.startswith("<") else f"{name} = {v}"


def sentence(c: Contrast, label_a: str | None = None, label_b: str | None = None) -> str:
    """``"A 59.1 % vs B 46.6 % (+12.5 pp; paired 95 % CI ...; Welch p = ..., paired p = ...; 3 seeds)"``."""
    la, lb = label_a or c.a, label_b or c.b
    stats_ = []
    if c.pairs >= 2:
        stats_.append(f"paired 95 % CI {c.ci[0]:+.1f}..{c.ci[1]:+.1f}; ahead in {c.wins} of {c.pairs} seeds")
    tests = [_p_is(c.p_welch, "Welch p")] if not math.isnan(c.p_welch) else []
    if not math.isnan(c.p_paired):
        tests.append(_p_is(c.p_paired, "paired p"))
    n = (f"{c.pairs} seed{'s' if c.pairs != 1 else ''}" if c.pairs else f"{c.n_a} and {c.n_b} runs")
    inner = "; ".join([f"{c.diff:+.1f} pp", *stats_, ", ".join(tests), n] if tests else [f"{c.diff:+.1f} pp", n])
    return f"{la} {c.mean_a:.1f} % vs {lb} {c.mean_b:.1f} % ({inner})"


def verdict(c: Contrast, paper_diff: float | None = None) -> str:
    """How the difference reads: significant or not, and, given the paper's difference, with or against it."""
    if math.isnan(c.p):
        core = "a single run per group: no test possible, read the difference as indicative only"
    elif not c.significant:
        core = f"not significant at {max(c.n_a, c.n_b)} seeds ({_p_is(c.p)}): within seed noise"
    else:
        core = f"significant ({_p_is(c.p)})"
    if paper_diff is None or math.isnan(paper_diff):
        return core
    same = np.sign(paper_diff) == np.sign(c.diff)
    paper = f"the paper: {paper_diff:+.1f} pp"
    if math.isnan(c.ci[0]) and not c.significant:       # no paired CI (one seed, or seeds that do not pair up)
        return (f"{core}; {paper}, {'the same direction as' if same else 'the opposite direction to'} ours "
                "(no paired CI to set it against)")
    outside = not math.isnan(c.ci[0]) and not (c.ci[0] <= paper_diff <= c.ci[1])
    if not c.significant:
        if outside:
            return f"{core}; {paper}, outside our 95 % CI: the paper's effect is not reproduced here"
        return f"{core}; {paper}, inside our 95 % CI: we neither confirm nor contradict it"
    return (f"{core}, {'the same direction as' if same else 'the opposite direction to'} {paper}"
            + (" (whose size lies outside our 95 % CI)" if same and outside else ""))


def paper_diff(table: str | int, dataset: str, row_a: str, row_b: str, metric: str = "miou") -> float:
    """The paper's ``row_a`` - ``row_b`` of ``metric`` in one table (NaN when either row is missing)."""
    t = paper_table(table, dataset)
    t = t[t["metric"] == metric].set_index("row")["mean"]
    return float(t[row_a] - t[row_b]) if row_a in t.index and row_b in t.index else math.nan


def claim(df: pd.DataFrame, a: str, b: str, metric: str = "stage1.test.miou", by: str = "method", *,
          labels: tuple[str, str] | None = None, paper: tuple[str | int, str, str, str] | None = None) -> str:
    """One bullet: :func:`sentence` and :func:`verdict`. ``paper`` = ``(table, dataset, row_a, row_b)`` names the
    paper's corresponding rows, whose difference the verdict compares against."""
    c = contrast(df, a, b, metric, by)
    pd_ = paper_diff(*paper, metric=metric.rsplit(".", 1)[-1]) if paper else None
    la, lb = labels or (a, b)
    return f"{sentence(c, la, lb)}: {verdict(c, pd_)}."


def best(df: pd.DataFrame, metric: str = "stage1.test.miou", by: str = "variant") -> tuple[str, float]:
    """The group with the highest mean ``metric`` and that mean in percent."""
    m = df.groupby(by)[metric].mean() * 100
    return str(m.idxmax()), float(m.max())


def spread(df: pd.DataFrame, metric: str = "stage1.test.miou", by: str = "variant") -> float:
    """The mean over groups of the standard deviation over seeds, in percentage points (the seed noise)."""
    return float(df.groupby(by)[metric].std(ddof=1).mean() * 100)


def report(title: str, bullets: Sequence[str], closing: str = "", notes: Sequence[str] = ()) -> Any:
    """The paragraph as Markdown: a bold title, bullets, a closing sentence and small-print notes."""
    lines = [f"**{title}**", "", *[f"- {b}" for b in bullets]]
    if closing:
        lines += ["", closing]
    if notes:
        lines += ["", *[f"<small>{n}</small>  " for n in notes]]
    return Markdown("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- chapter 02
def sub_bank_white(chosen: Sequence[Sequence[Sequence[int]]], white: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Mean white-pixel share of each sub-bank's images: rows = classes, columns = sub-banks 1..K.

    ``chosen[n][k]`` are the pool indices of sub-bank ``k`` of class ``n`` (:func:`~pbip_core.method.bank.build_prototypes`).
    """
    white = np.asarray(white, dtype=float)
    rows = {classes[n]: {f"sub-bank {k + 1}": float(white[np.asarray(idx, dtype=int)].mean()) if len(idx) else math.nan
                         for k, idx in enumerate(per)} for n, per in enumerate(chosen)}
    return pd.DataFrame(rows).T


def glass_remark(share: pd.DataFrame, factor: float = 2.0) -> str:
    """A sentence naming the sub-banks whose white share is at least ``factor`` times their class's lowest."""
    hits = []
    for cls, row in share.iterrows():
        lo = row.min()
        for col, v in row.items():
            if v >= factor * max(lo, 1e-3) and v > 0.1:
                hits.append(f"{cls} {col} ({100 * v:.0f} % white vs {100 * lo:.0f} %)")
    if not hits:
        return (f"No sub-bank stands out by its glass: within every class the mean white shares differ by less than a "
                f"factor {factor:g}.")
    return (f"{len(hits)} sub-bank(s) gather glass-rich images: " + "; ".join(hits) + ". These prototypes describe "
            "\"tissue with glass\" more than a second appearance of the tissue; a histology encoder, or a stricter "
            "white filter (`bank.white_threshold`), would spend the cluster on the tissue instead.")


# ---------------------------------------------------------------------------------------------------- seed tables
def per_seed(df: pd.DataFrame, metric: str = "stage1.test.miou", by: str = "method",
             minutes: str | None = "wall_time_s") -> pd.DataFrame:
    """``metric`` in percent per group (rows) and seed (columns), with mean, std and the mean minutes per run."""
    t = df.pivot_table(index=by, columns="seed", values=metric, aggfunc="mean", sort=False) * 100
    t = t[sorted(t.columns)]
    t.columns = [f"seed {s}" for s in t.columns]
    vals = t.to_numpy(float)
    t["mean"] = np.nanmean(vals, axis=1)
    t["std"] = np.nanstd(vals, axis=1, ddof=1) if vals.shape[1] > 1 else math.nan
    if minutes and minutes in df.columns:
        t["min/run"] = df.groupby(by, sort=False)[minutes].mean() / 60
    t.index.name = by
    return t


def paper_value(table: str | int, dataset: str, row: str, metric: str = "miou") -> float:
    """One number of the paper's tables (percent as printed; NaN when the cell is missing)."""
    t = paper_table(table, dataset)
    t = t[(t["row"] == row) & (t["metric"] == metric)]
    return float(t["mean"].iloc[0]) if len(t) else math.nan


def paper_train_size(dataset: str) -> int:
    """Training images of one of the paper's datasets (``pbip_core/data/manifest.yaml``: ``splits.train``)."""
    return int(dataset_entry(dataset).get("splits", {}).get("train", 0))


def train_size(root: str | Path) -> int:
    """Training images of a dataset folder."""
    return sum(1 for p in Path(root, "train").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------------- chapter 06
STAGES = {"stage1.test.miou": "stage 1, ground-truth classes", "stage1_predicted.test.miou": "stage 1, predicted classes",
          "stage2.test.miou": "stage 2"}


def stage_table(df: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Mean test mIoU (percent) per group for the two stage-1 protocols and stage 2, and stage 2's gain over each."""
    cols = [c for c in STAGES if c in df.columns]
    t = df.groupby(by, sort=False)[cols].mean() * 100
    t.columns = [STAGES[c] for c in cols]
    if "stage 2" in t.columns:                          # stage 2's gain over each stage-1 protocol run
        for c in [c for c in t.columns if c != "stage 2"]:
            t[f"stage 2 - {c.split(', ')[1]} (pp)"] = t["stage 2"] - t[c]
    return t


def stage_sentences(df: pd.DataFrame, by: str = "method") -> list[str]:
    """Per group: stage 2 against the stage-1 masks scored with predicted classes (the fair baseline), tested."""
    out = []
    for g in df[by].unique():
        sub = df[df[by] == g]
        long = pd.concat([sub.assign(_stage="stage 2", _v=sub["stage2.test.miou"]),
                          sub.assign(_stage="stage 1", _v=sub["stage1_predicted.test.miou"])])
        c = contrast(long, "stage 2", "stage 1", "_v", by="_stage")
        out.append(f"{g}: {sentence(c, 'stage 2', 'stage 1 with predicted classes')}: {verdict(c)}.")
    return out


def stage2_closing(df: pd.DataFrame, paper_stage2: float, paper_stage1: float, n_train: int,
                   dataset: str = "bcss-wsss") -> str:
    """Where stage 2 stands against stage 1 here and in the paper (Table 1 against Table 5's full model)."""
    s1 = df["stage1.test.miou"].mean() * 100
    s2 = df["stage2.test.miou"].mean() * 100
    epochs = int(df["stage2.epochs"].iloc[0])
    return (f"Averaged over all runs, stage 2 reaches {s2:.1f} % against {s1:.1f} % for the stage-1 masks restricted "
            f"to the ground truth's classes. In the paper stage 2 adds {paper_stage2 - paper_stage1:+.1f} pp "
            f"(Table 1's {paper_stage2:.1f} % against Table 5's {paper_stage1:.1f} %), with a ResNet-101 DeepLab-v2 "
            f"trained on {paper_train_size(dataset):,} pseudo masks; here a light CPU backbone trains for {epochs} "
            f"epochs on {n_train:,}, so stage 2 mostly shows how far a small network gets from noisy masks.")


# ---------------------------------------------------------------------------------------------------- ablations
def against(df: pd.DataFrame, ref: str, metric: str = "stage1.test.miou", by: str = "variant", *,
            paper: tuple[str | int, str] | None = None, row_map: dict[str, str] | None = None) -> list[str]:
    """One :func:`claim` per group against ``ref``. With ``paper = (table, dataset)`` each verdict is set against the
    paper's difference between the same rows (``row_map`` maps our names to the paper's)."""
    row_map = row_map or {}
    groups = list(df[by].astype(str).unique())
    if ref not in groups:                           # a profile that runs a subset of the grid (smoke: `only`)
        return [f"the reference row {ref} did not run at this profile (ran: {', '.join(groups) or 'none'}): "
                "nothing to compare against."]
    if len(groups) < 2:
        return [f"only {ref} ran at this profile: nothing to compare against."]
    out = []
    for g in groups:
        if g == ref:
            continue
        p = (paper[0], paper[1], row_map.get(g, g), row_map.get(ref, ref)) if paper else None
        out.append(claim(df, g, ref, metric, by, paper=p))
    return out


def ranking(df: pd.DataFrame, metric: str = "stage1.test.miou", by: str = "variant") -> str:
    """``"A (61.2) > B (60.1) > C (58.0)"``: groups by mean ``metric`` in percent."""
    m = (df.groupby(by)[metric].mean() * 100).sort_values(ascending=False)
    return " > ".join(f"{k} ({v:.1f})" for k, v in m.items())


def paper_ranking(table: str | int, dataset: str, rows: Sequence[str], metric: str = "miou") -> str:
    """The paper's ordering of ``rows`` of one table, in the style of :func:`ranking`."""
    t = paper_table(table, dataset)
    t = t[(t["metric"] == metric) & t["row"].isin(rows)].dropna(subset=["mean"]).sort_values("mean", ascending=False)
    return " > ".join(f"{r} ({v:.1f})" for r, v in zip(t["row"], t["mean"]))


def curve_shape(points: pd.DataFrame, x: str, metric: str = "stage1.test.miou", by: str = "variant",
                label: str | None = None) -> str:
    """Where a one-parameter curve peaks and whether its ends lie significantly below the peak (Figure 3's claim)."""
    label = label or x
    means = points.groupby(by)[metric].mean() * 100
    xs = pd.Series(means.index, index=means.index) if x == by else points.groupby(by)[x].first()
    order = xs.sort_values().index
    peak = means[order].idxmax()
    ends = [order[0], order[-1]]
    words = []
    for e in ends:
        if e == peak:
            words.append(f"the peak is at the end of the range ({label} = {xs[e]:g})")
            continue
        c = contrast(points, e, peak, metric, by)
        words.append(f"{label} = {xs[e]:g} is {c.diff:+.1f} pp from the peak ({_p_is(c.p) if not math.isnan(c.p) else 'one run'}"
                     f"{', significant' if c.significant else ', within seed noise'})")
    return f"peak at {label} = {xs[peak]:g} ({means[peak]:.1f} %); " + "; ".join(words)


def not_run(status: pd.DataFrame, paper: pd.DataFrame | None = None, metric: str = "miou") -> str:
    """One line per reason naming the rows that did not run (``status``: index = row, column ``status``), with the
    paper's ``metric`` beside each row when ``paper`` (:func:`~pbip_core.experiments.report.paper_table`) has it."""
    vals = {} if paper is None else paper[paper["metric"] == metric].set_index("row")["mean"].to_dict()
    groups: dict[str, list[str]] = {}
    for row, st in status["status"].items():
        if st in ("available", "ran"):
            continue
        v = vals.get(row)
        groups.setdefault(st, []).append(f"{row}" + (f" (paper {v:.1f})" if v is not None and not math.isnan(v) else ""))
    return "\n".join(f"- *{reason}*: " + ", ".join(rows) + "." for reason, rows in groups.items())


def paper_spread(table: str | int, dataset: str, metric: str = "miou") -> float:
    """Highest minus lowest of ``metric`` over the rows of one of the paper's tables (percentage points)."""
    t = paper_table(table, dataset)
    v = t.loc[t["metric"] == metric, "mean"].dropna()
    return float(v.max() - v.min()) if len(v) else math.nan


# ---------------------------------------------------------------------------------------------------- chapter 09
def gap_sentences(diff: pd.DataFrame) -> list[str]:
    """The switches of :func:`~pbip_core.book.tables.differences_table` that move mIoU significantly, largest first."""
    d = diff[diff["explains part of the gap"].isin(["yes", "against"])].sort_values("Δ (pp)", key=abs, ascending=False)
    out = [f"{name}: {r['Δ (pp)']:+.1f} pp ({_p_is(r['p (Welch)'])}; "
           f"{'the direction of the official preset' if r['explains part of the gap'] == 'yes' else 'against the official preset'})"
           for name, r in d.iterrows()]
    n_ns = int((diff["explains part of the gap"] == "no (n.s.)").sum())
    out.append(f"{n_ns} other switch(es) change mIoU by less than the seed noise can resolve (Welch p >= {ALPHA}).")
    return out


def gap_closing(diff: pd.DataFrame) -> str:
    """The whole preset's gap against the sum of the significant single switches (interactions make them differ)."""
    gap = diff.attrs.get("gap_pp", math.nan)
    sig = diff.loc[diff["explains part of the gap"].isin(["yes", "against"]), "Δ (pp)"].sum()
    return (f"The whole official preset moves test mIoU by {gap:+.1f} pp against the paper's settings; the significant "
            f"single switches add up to {sig:+.1f} pp. Switches interact (the official threshold acts on the official "
            "maps, for instance), so the two need not agree; a switch that helps alone may do nothing inside the preset.")


# ---------------------------------------------------------------------------------------------------- chapter 08
def zero_shot_sentences(ran: pd.DataFrame, dataset: str = "bcss-wsss") -> list[str]:
    """Per encoder that ran: mean F1 and its weakest class, beside the paper's best image- and text-prompt rows."""
    paper = paper_table(6, dataset)
    pm = paper[paper["metric"] == "f1_mean"].set_index("row")["mean"].dropna()
    out = []
    for row, r in ran.iterrows():
        f1 = {c[3:].upper(): v for c, v in r.items() if str(c).startswith("f1_") and c != "f1_mean" and pd.notna(v)}
        weak = min(f1, key=f1.get) if f1 else "—"
        out.append(f"{row}: mean F1 {r['f1_mean']:.3f}, weakest class {weak} ({f1.get(weak, math.nan):.3f}), "
                   f"{int(r['n_tiles'])} tiles.")
    if len(pm):
        img = pm[[i for i in pm.index if i.lower().startswith("image")]]
        txt = pm[[i for i in pm.index if i.lower().startswith("text")]]
        if len(img):
            out.append(f"The paper's best image-prompt row: {img.idxmax()} ({img.max():.3f})"
                       + (f"; its best text-prompt row: {txt.idxmax()} ({txt.max():.3f})." if len(txt) else "."))
    return out


# ---------------------------------------------------------------------------------------------------- chapter 10
def split_sizes(root: str | Path) -> dict[str, int]:
    """Images per split of a dataset folder (``train/*``; ``val/img/*``, ``test/img/*``)."""
    def folder(split: str) -> Path:
        return Path(root, split, "img") if Path(root, split, "img").is_dir() else Path(root, split)

    return {s: sum(1 for p in folder(s).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for s in ("train", "val", "test") if Path(root, s).is_dir()}


def per_class_sentence(df: pd.DataFrame, a: str, b: str, split: str = "test", by: str = "method") -> str:
    """Which classes ``a`` segments better than ``b`` (mean per-class IoU over seeds, percentage points)."""
    cols = [c for c in df.columns if c.startswith(f"stage1.{split}.iou.")]
    if not cols:
        return ""
    m = df.groupby(by)[cols].mean() * 100
    d = (m.loc[a] - m.loc[b]).rename(lambda c: c.rsplit(".", 1)[-1]).sort_values()
    return (f"Per class ({split} IoU, {a} minus {b}): " + ", ".join(f"{k} {v:+.1f}" for k, v in d.items())
            + " pp.")


# ---------------------------------------------------------------------------------------------------- intro
def _cell(df: pd.DataFrame, group: str, metric: str, by: str = "method") -> str:
    v = pd.to_numeric(df.loc[df[by].astype(str) == group, metric], errors="coerce").dropna() * 100
    if not len(v):
        return "—"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def headline(sets: Sequence[tuple[str, pd.DataFrame, str, str, float]], groups: Sequence[str] = ("pbip", "cam", "official"),
             by: str = "method") -> pd.DataFrame:
    """The results summary: one row per ``(label, runs, metric, dataset, paper value)``: mean ± std (percent) per
    group, the seeds, the paired test of the first two groups, and the paper's number for PBIP (NaN: none)."""
    rows = []
    for label, df, metric, dataset, paper in sets:
        row: dict[str, Any] = {"result": label, "dataset": dataset}
        for g in groups:
            row[g] = _cell(df, g, metric, by)
        row["seeds"] = int(df["seed"].nunique())
        a, b = groups[0], groups[1]
        if (df[by] == a).any() and (df[by] == b).any():
            c = contrast(df, a, b, metric, by)
            row[f"{a} - {b} (pp)"] = f"{c.diff:+.1f}"
            row["paired p"] = _p(c.p_paired)
        row["paper (PBIP)"] = "—" if paper is None or math.isnan(paper) else f"{paper:.1f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("result")
