"""Statistics over seeds and tables of our numbers beside the paper's.

* :func:`summarize`: mean, sample standard deviation (``ddof=1``) and n over seeds.
* :func:`compare`: Welch's t-test (unequal variances) or a paired t-test by seed, via scipy. The paper reports
  "p-values from t-tests" without saying which; Welch is the safe default for two methods run on different seeds.
* :func:`paper_table`: the paper's published numbers, typed in once into ``paper_results/paper_tables.csv``
  (columns ``table, dataset, row, metric, mean, std, note``; values in percent as printed, except Table 6 whose
  F1 scores are printed as fractions). Notes record every ambiguity of the text (e.g. Table 2's fourth row).
* :func:`render_comparison`: rows aligned by method/setting, columns "paper mean±std", "ours mean±std" and
  "Δ (ours − paper)", with a mandatory provenance caption saying exactly what "ours" was run with.
* :func:`to_markdown`: a GitHub-style markdown table without the ``tabulate`` package.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

PAPER = "Tang et al. 2025"
METRIC_LABELS = {"miou": "mIoU (%)", "fwiou": "FwIoU (%)", "biou": "bIoU (%)", "dice": "Dice (%)"}
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "fig4")
DATASETS = ("luad-histoseg", "bcss-wsss", "gcss", "bcss")


# ---------------------------------------------------------------------------------------------------- statistics
def summarize(df: pd.DataFrame, by: Sequence[str] | str, metrics: Sequence[str] | str) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count of each metric over the rows of each group (usually seeds).

    Returns one row per group with columns ``<metric>.mean``, ``<metric>.std``, ``<metric>.n`` and ``n`` (rows in
    the group). NaN metric values (failed runs) are left out of that metric's statistics.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [c for c in by + metrics if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: columns not in the table: {missing}")
    rows = []
    for key, g in df.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key))
        for m in metrics:
            v = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{m}.mean"] = float(v.mean()) if len(v) else math.nan
            row[f"{m}.std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            row[f"{m}.n"] = int(len(v))
        row["n"] = int(len(g))
        rows.append(row)
    return pd.DataFrame(rows)


def parse_selector(text: str) -> dict[str, str]:
    """A command-line group selector: ``pbip`` (method), ``pbip:pooled`` (method and variant) or
    ``col=value[,col=value...]`` (any result columns, e.g. ``method=pbip,model.fgbg=pooled``)."""
    text = text.strip()
    if "=" in text:
        pairs = [part.split("=", 1) for part in text.split(",") if part]
        if any(len(kv) != 2 or not kv[0] for kv in pairs):
            raise ValueError(f"bad selector {text!r}: use METHOD, METHOD:VARIANT or col=value[,col=value]")
        return {k.strip(): v.strip() for k, v in pairs}
    method, _, variant = text.partition(":")
    return {"method": method, "variant": variant} if variant else {"method": method}


def selector_text(sel: str | Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_selector` (for messages): ``pbip``, ``pbip:pooled`` or ``col=value,...``."""
    if not isinstance(sel, Mapping):
        return str(sel)
    if set(sel) <= {"method", "variant"} and "method" in sel:
        return f"{sel['method']}:{sel['variant']}" if "variant" in sel else str(sel["method"])
    return ",".join(f"{k}={v}" for k, v in sel.items())


def _select(df: pd.DataFrame, sel: str | Mapping[str, Any], by: str) -> pd.DataFrame:
    if not isinstance(sel, Mapping):
        sel = {by: sel}
    mask = np.ones(len(df), dtype=bool)
    for col, val in sel.items():
        if col not in df.columns:
            shown = ", ".join(map(str, df.columns[:12]))
            raise KeyError(f"selector column {col!r} is not in the results (columns: {shown}, ...)")
        # CSV columns may hold numbers or booleans while a selector from the command line is text
        mask &= (df[col].astype(str) == str(val)).to_numpy() | (df[col] == val).to_numpy()
    return df[mask]


def compare(df: pd.DataFrame, a: str | Mapping[str, Any], b: str | Mapping[str, Any], metric: str,
            paired: bool = False, by: str = "method", seed_col: str = "seed") -> dict[str, Any]:
    """t-test of ``metric`` between the runs selected by ``a`` and by ``b``.

    ``a``/``b`` are values of column ``by`` (e.g. ``"pbip"``) or mappings ``{column: value}``. Unpaired:
    Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``). Paired: runs matched on ``seed_col`` and
    ``scipy.stats.ttest_rel``. Returns ``{"t", "p", "dof", "mean_a", "mean_b", "n_a", "n_b", "test"}``.
    """
    ga, gb = _select(df, a, by), _select(df, b, by)
    for sel, g in ((a, ga), (b, gb)):
        if len(g) == 0:
            groups = ", ".join(sorted({f"{m}:{v}" for m, v in zip(df.get("method", []), df.get("variant", []))}))
            raise ValueError(f"no runs match {selector_text(sel)!r}; groups here (method:variant): {groups}")
    if paired:
        m = pd.merge(ga[[seed_col, metric]], gb[[seed_col, metric]], on=seed_col, suffixes=("_a", "_b")).dropna()
        xa, xb = m[f"{metric}_a"].to_numpy(float), m[f"{metric}_b"].to_numpy(float)
        if len(xa) < 2:
            raise ValueError(f"a paired t-test needs at least 2 seeds run by both groups (have {len(xa)})")
        res = stats.ttest_rel(xa, xb)
        dof = len(xa) - 1
        test = "paired t-test (by seed)"
    else:
        xa = pd.to_numeric(ga[metric], errors="coerce").dropna().to_numpy(float)
        xb = pd.to_numeric(gb[metric], errors="coerce").dropna().to_numpy(float)
        if min(len(xa), len(xb)) < 2:
            raise ValueError(f"a t-test needs at least 2 runs per group (have {len(xa)} and {len(xb)})")
        res = stats.ttest_ind(xa, xb, equal_var=False)
        va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
        dof = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))  # Welch-Satterthwaite
        test = "Welch t-test"
    return {"t": float(res.statistic), "p": float(res.pvalue), "dof": float(dof), "mean_a": float(np.mean(xa)),
            "mean_b": float(np.mean(xb)), "n_a": int(len(xa)), "n_b": int(len(xb)), "test": test}


# ---------------------------------------------------------------------------------------------------- paper numbers
@lru_cache(maxsize=1)
def _paper_csv() -> pd.DataFrame:
    path = resources.files("pbip_core.experiments") / "paper_results" / "paper_tables.csv"
    with resources.as_file(path) as p:
        df = pd.read_csv(p, dtype={"table": str, "dataset": str, "row": str, "metric": str, "note": str},
                         keep_default_na=False, na_values={"mean": [""], "std": [""]})
    df["mean"] = pd.to_numeric(df["mean"])
    df["std"] = pd.to_numeric(df["std"])
    return df


def _table_id(table: str | int) -> str:
    t = str(table).strip().lower().replace(" ", "").replace("_", "")
    if t.isdigit():
        t = f"table{t}"
    t = t.replace("figure", "fig")
    if t not in TABLES:
        raise KeyError(f"unknown paper table {table!r}; choose one of {', '.join(TABLES)}")
    return t


def paper_table(table: str | int, dataset: str | None = None) -> pd.DataFrame:
    """The paper's numbers of one table (``1``..``6``, ``"table3"``, ``"fig4"``), optionally of one dataset.

    Long format: columns ``table, dataset, row, metric, mean, std, note``; percent as printed (Table 6: F1 as
    printed, fractions). ``-`` cells of the paper have ``mean`` NaN.
    """
    df = _paper_csv()
    df = df[df["table"] == _table_id(table)]
    if dataset is not None:
        if dataset not in set(df["dataset"]):
            raise KeyError(f"{table}: no dataset {dataset!r}; the table has {sorted(set(df['dataset']))}")
        df = df[df["dataset"] == dataset]
    return df.reset_index(drop=True)


def paper_wide(table: str | int, dataset: str) -> pd.DataFrame:
    """One dataset of a paper table as rows x metrics of ``"mean±std"`` strings (for display)."""
    df = paper_table(table, dataset)
    df = df.assign(cell=[_fmt(m, s) for m, s in zip(df["mean"], df["std"])])
    return df.pivot(index="row", columns="metric", values="cell").reindex(pd.unique(df["row"]))


# ---------------------------------------------------------------------------------------------------- rendering
def _fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def render_comparison(
    ours: pd.DataFrame,
    table: str | int,
    dataset: str,
    *,
    key: str,
    metrics: Sequence[str] = ("miou", "fwiou", "biou", "dice"),
    provenance: str,
    columns: str | Mapping[str, str] = "",
    row_map: Mapping[str, str] | None = None,
    scale: float = 100.0,
    only_ours: bool = False,
) -> pd.DataFrame:
    """Our mean±std beside the paper's for each row of a paper table.

    ``ours`` is the tidy per-run table (one row per seed; :func:`pbip_core.experiments.load_results`); its column
    ``key`` (e.g. ``"method"`` or ``"variant"``) names the row, mapped to the paper's row names through
    ``row_map`` (e.g. ``{"pbip": "PBIP (Ours)"}``). The column of metric ``m`` is ``columns + m`` when
    ``columns`` is a prefix such as ``"stage2.test."``, or ``columns[m]`` when it is a mapping. Our values are
    fractions and are multiplied by ``scale`` (100: the paper reports percent).

    Returns a DataFrame of strings with a (metric, column) header: "Paper (Tang et al. 2025, Table N) mean±std",
    "This book mean±std", "Δ (ours − paper)" (ours minus paper, in percentage points, signed), and "n"
    (our runs). ``.attrs["caption"]`` holds the provenance caption; ``.attrs["numeric"]`` the numbers.
    Rows: the paper's rows in the paper's order (only those we ran when ``only_ours``), then rows we ran that
    the paper does not have.
    """
    if not provenance or not str(provenance).strip():
        raise ValueError("render_comparison: a provenance string is mandatory (profile, dataset, encoder, seeds, ...)")
    tid = _table_id(table)
    paper = paper_table(tid, dataset)
    row_map = dict(row_map or {})
    if key not in ours.columns:
        raise KeyError(f"render_comparison: column {key!r} not in our results")

    def col(m: str) -> str:
        return columns[m] if isinstance(columns, Mapping) else f"{columns}{m}"

    ours = ours.assign(_row=[row_map.get(v, v) for v in ours[key].astype(str)])
    paper_rows = list(pd.unique(paper["row"]))
    our_rows = list(pd.unique(ours["_row"]))
    rows = [r for r in paper_rows if not only_ours or r in our_rows] + [r for r in our_rows if r not in paper_rows]
    tnum = tid.replace("table", "Table ").replace("fig", "Figure ")
    p_label, o_label, d_label = f"Paper ({PAPER}, {tnum}) mean±std", "This book mean±std", "Δ (ours − paper)"

    cells: dict[tuple[str, str], list[Any]] = {}
    numeric: dict[tuple[str, str], list[float]] = {}
    for m in metrics:
        label = METRIC_LABELS.get(m, m)
        pm, ps, om, osd, dl, ns = [], [], [], [], [], []
        for r in rows:
            pr = paper[(paper["row"] == r) & (paper["metric"] == m)]
            p_mean = float(pr["mean"].iloc[0]) if len(pr) else math.nan
            p_std = float(pr["std"].iloc[0]) if len(pr) else math.nan
            c = col(m)
            vals = (pd.to_numeric(ours.loc[ours["_row"] == r, c], errors="coerce").dropna().to_numpy(float) * scale
                    if c in ours.columns else np.array([]))
            o_mean = float(vals.mean()) if len(vals) else math.nan
            o_std = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            pm.append(p_mean); ps.append(p_std); om.append(o_mean); osd.append(o_std)
            dl.append(o_mean - p_mean); ns.append(len(vals))
        cells[(label, p_label)] = [_fmt(a, b) for a, b in zip(pm, ps)]
        cells[(label, o_label)] = [_fmt(a, b) for a, b in zip(om, osd)]
        cells[(label, d_label)] = ["—" if math.isnan(d) else f"{d:+.2f}" for d in dl]
        numeric.update({(label, "paper mean"): pm, (label, "paper std"): ps, (label, "ours mean"): om,
                        (label, "ours std"): osd, (label, "delta"): dl})
        n_col = ns
    cells[("", "n (ours)")] = [str(n) for n in n_col] if metrics else []
    out = pd.DataFrame(cells, index=pd.Index(rows, name=key))
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    caption = (f"Paper ({PAPER}, {tnum}, dataset {dataset}) vs This book: {provenance.strip()}. "
               f"Values in percent; Δ = ours − paper in percentage points; ± is the sample std over runs.")
    out.attrs["caption"] = caption
    out.attrs["numeric"] = pd.DataFrame(numeric, index=pd.Index(rows, name=key))
    return out


def to_markdown(df: pd.DataFrame, caption: str | None = None, index: bool = True) -> str:
    """A GitHub-flavoured markdown table (no ``tabulate`` needed). MultiIndex headers are joined with " · ".

    The caption (argument, else ``df.attrs["caption"]``) is printed above the table in italics.
    """
    caption = caption if caption is not None else df.attrs.get("caption")

    def head(c: Any) -> str:
        if isinstance(c, tuple):
            return " · ".join(str(x) for x in c if str(x))
        return str(c)

    headers = ([str(df.index.name or "")] if index else []) + [head(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for idx, row in zip(df.index, df.itertuples(index=False)):
        vals = ([str(idx)] if index else []) + [_md_cell(v) for v in row]
        lines.append("| " + " | ".join(_md_escape(v) for v in vals) + " |")
    text = "\n".join(lines)
    return (f"*{caption}*\n\n{text}" if caption else text) + "\n"


def _md_cell(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def paper_csv_path() -> Path:
    """Where the typed-in paper numbers live (for readers who want to check them)."""
    return Path(str(resources.files("pbip_core.experiments") / "paper_results" / "paper_tables.csv"))


# ---------------------------------------------------------------------------------------------------- summaries
DEFAULT_REPORT_METRICS = ("stage1.test.miou", "stage1.test.fwiou", "stage1.test.biou", "stage1.test.dice",
                          "stage2.test.miou", "stage2.test.fwiou", "stage2.test.biou", "stage2.test.dice")


def summary_markdown(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> str:
    """mean +- std (in %) of each metric per group, as a markdown table (rows: groups; columns: metrics)."""
    metrics = [m for m in metrics if m in df.columns]
    s = summarize(df, by, metrics)
    out = pd.DataFrame({b: s[b] for b in by})
    for m in metrics:
        out[m] = [_fmt(100 * mu, 100 * sd if sd == sd else None) for mu, sd in zip(s[f"{m}.mean"], s[f"{m}.std"])]
    out["seeds"] = s["n"]
    return to_markdown(out, index=False)
