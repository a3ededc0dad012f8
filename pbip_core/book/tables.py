"""Tables of the chapters: our numbers (mean±std over seeds) beside the paper's, with their provenance.

Our metrics are fractions in columns ``<stage>.<split>.<metric>`` of the runner's tidy table (one row per run);
:func:`paper_comparison` puts mean±std over seeds beside the paper's numbers with
:func:`pbip_core.experiments.report.render_comparison`, and :func:`provenance` says which profile, dataset, encoder,
seeds and trims produced them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import HTML

from ..config import get_key, make_config
from ..data import known_name, load_info
from ..experiments.grid import read_grid, resolve
from ..experiments.report import DATASETS, PAPER, compare, paper_table, render_comparison, summarize
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
    dataset = Path(ch.dataset).name + (" (synthetic stand-in for BCSS-WSSS)" if ch.synthetic else
                                       " (real Kather 2016 H&E tiles, BCSS-WSSS's classes)" if ch.builtin else "")
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
    """A table for a notebook as HTML: its caption (``caption`` or ``table.attrs["caption"]``) above it, floats with
    two decimals, missing values as "—", long texts not truncated."""
    caption = caption if caption is not None else table.attrs.get("caption", "")
    styled = table.style.format(precision=2, na_rep="—").set_caption(caption).set_table_styles(
        [{"selector": "caption", "props": "caption-side: top; text-align: left; font-style: italic;"}])
    return HTML(styled.to_html())


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
DIFFERENCES: list[dict[str, Any]] = [
    {"difference": "prototype encoder", "keys": ["bank.encoder"],
     "official": "ImageNet Swin-T + random 768->512 projection (MedCLIP weights never loaded)", "variant": ""},
    {"difference": "prototypes", "keys": ["bank.selection"], "variant": "centroid prototypes"},
    {"difference": "backbone levels", "keys": ["model.levels"], "variant": "levels 1-4"},
    {"difference": "projected prototypes normalised", "keys": ["model.normalize_prototypes"],
     "variant": "unnormalised prototypes"},
    {"difference": "logit scale", "keys": ["model.logit_scale", "model.learn_logit_scale"],
     "variant": "learnable logit scale 1/0.07"},
    {"difference": "CLS loss level weights", "keys": ["loss.cls_level_weights"], "variant": "CLS level weights 0/0.1/1"},
    {"difference": "FG/BG loss weights, CAM term", "keys": ["loss.beta", "loss.theta2", "loss.cam_reg"],
     "variant": "SIM weights and CAM term"},
    {"difference": "temperature of eq. 9, 11", "keys": ["loss.tau"], "variant": "temperature 0.07"},
    {"difference": "mask threshold (eq. 4)", "keys": ["model.delta", "model.threshold_scope"],
     "variant": "threshold 0.5 x global max"},
    {"difference": "FG/BG images (eq. 5)", "keys": [],
     "official": "last level's CAM only, min-max normalised, masked at 0.5 x global max", "variant": ""},
    {"difference": "schedule", "keys": ["train.schedule", "train.lr", "train.weight_decay", "train.epochs"],
     "variant": "linear lr decay"},
    {"difference": "pseudo-mask fusion", "keys": ["model.levels", "pseudo.level_weights"],
     "variant": "levels 1-4 + fusion 0/0.3/0.3/0.4"},
    {"difference": "background in pseudo masks", "keys": ["pseudo.white_background"], "variant": "no white background"},
]


def differences_table(measured: pd.DataFrame | None = None, metric: str = "stage1.test.miou",
                      baseline: str = "paper (this book)") -> pd.DataFrame:
    """The paper/official differences with the values of both sides read from the configs (profile ``paper``,
    methods ``pbip`` and ``official``: the paper as this book reads it, and the official code's preset) and, where
    ``measured`` (the book-official results) has the variant, ``metric`` and its change against ``baseline`` in
    percentage points."""
    paper, official = make_config("paper"), make_config("paper", {"method": "official"})
    base = _mean_of(measured, baseline, metric) if measured is not None else np.nan
    rows = []
    for d in DIFFERENCES:
        fmt = lambda cfg: "; ".join(f"{k.split('.')[-1]}={_short(get_key(cfg, k))}" for k in d["keys"])  # noqa: E731
        v = d["variant"]
        ours = _mean_of(measured, v, metric) if (measured is not None and v) else np.nan
        rows.append({"difference": d["difference"], "paper (profile paper)": fmt(paper),
                     "official code": d.get("official") or fmt(official),
                     "config switch": ", ".join(d["keys"]), "measured as": v or "not measurable here",
                     "mIoU (%)": 100 * ours, "Δ vs paper (pp)": 100 * (ours - base)})
    return pd.DataFrame(rows).set_index("difference")


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


def foreground_share(m: torch.Tensor, present: torch.Tensor, deltas: Sequence[float], scope: str = "class"
                     ) -> pd.DataFrame:
    """Share of foreground pixels of b (eq. 4) over the (image, class) pairs present, for each delta.

    m (B, N, H, W) in [0, 1]; present (B, N) bool. Also the share of the soft FG weight b * M and of M itself
    ("no AT": FG = M). Returns one row per delta.
    """
    sel = present.bool()
    rows = []
    for d in deltas:
        b = adaptive_threshold(m, float(d), scope)
        rows.append({"delta": float(d), "foreground share (b)": float(b[sel].mean()),
                     "mean FG weight b·M": float((b * m)[sel].mean()),
                     "mean FG weight without AT (M)": float(m[sel].mean())})
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
