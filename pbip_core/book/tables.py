"""Tables of the chapters: our numbers (mean±std over seeds) beside the paper's, with their provenance.

Our metrics are fractions in columns ``<stage>.<split>.<metric>`` of the runner's tidy table (one row per run);
:func:`paper_comparison` puts mean±std over seeds beside the paper's numbers with
:func:`pbip_core.experiments.report.render_comparison`, and :func:`provenance` says which profile, dataset, encoder,
seeds and trims produced them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
