"""What chapters 05-07 and 09 call: run their grids of experiments and shape the results into the paper's tables.

Book grids
----------
A chapter's experiments are declared in ``pbip_core/grids/book/<name>.yaml``: a grid of
:mod:`pbip_core.experiments` (``name, methods, variants, stage2, splits, overrides``) without ``profile`` and
``datasets``, which come from the chapter's parameters, plus two keys of its own:

* ``extends: <other book grid>``: start from that file's keys (the ablations all extend ``book-ablation``, so their
  unchanged baseline is one run, trained once, whatever table it appears in);
* ``profiles: {<profile>: {seeds: [...], overrides: {...}, only: [variant, ...]}}``: per profile, the seeds, the
  config overrides that trim the runs to the profile's time budget, and the variants that are run at all.

:func:`book_grid` resolves a book grid for a chapter into a plain :class:`~pbip_core.experiments.Grid`;
:func:`run_book_grid` writes it to ``<out_dir>/grids/<name>.yaml`` (rerun it with
``pbip run <that file> --results <out_dir>/experiments``) and runs what is not done yet. Runs are cached by content
hash under ``<out_dir>/experiments/runs/<hash>``, so two chapters asking for the same runs train them once.

Tables
------
Our metrics are fractions in columns ``<stage>.<split>.<metric>`` of the runner's tidy table (one row per run);
:func:`paper_comparison` puts mean±std over seeds beside the paper's numbers with
:func:`pbip_core.report.render_comparison`, and :func:`provenance` says which profile, dataset, encoder, seeds and
trims produced them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from .errors import ConfigError, PBIPError

BOOK_GRIDS_DIR = Path(__file__).with_name("grids") / "book"
METRICS = ("miou", "fwiou", "biou", "dice")
#: Names of the paper (Table 3) for our encoder / backbone names.
PAPER_ENCODERS = {"clip": "CLIP", "medclip": "MedCLIP", "plip": "PLIP", "dinov2": "DINOv2"}
PAPER_BACKBONES = {"mit_b1": "SegFormer", "resnet18": "ResNet18", "resnet50": "ResNet50"}


# ---------------------------------------------------------------------------------------------------- book grids
def read_book_grid(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of ``grids/book/<name>.yaml`` with its ``extends`` chain merged (this file's keys win;
    ``profiles`` are merged per profile and per key)."""
    path = BOOK_GRIDS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BOOK_GRIDS_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: book grid not found (book grids: {known})")
    if name in _seen:
        raise ConfigError(f"{path}: 'extends' cycle {' -> '.join((*_seen, name))}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a book grid is a mapping (name, methods, variants, profiles, ...)")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    base = read_book_grid(str(base_name), (*_seen, name))
    merged = {**base, **{k: v for k, v in data.items() if k != "profiles"}}
    profiles = copy.deepcopy(base.get("profiles") or {})
    for prof, block in (data.get("profiles") or {}).items():
        profiles[prof] = {**profiles.get(prof, {}), **(block or {})}
    merged["profiles"] = profiles
    return merged


def resolve_book_grid(data: Mapping[str, Any], profile: str, dataset: str | Path, encoder: str | None = None,
                      seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """A plain grid mapping (keys of :class:`~pbip_core.experiments.Grid`) for one profile and dataset.

    The profile block's ``overrides`` are added to the grid's; ``only`` keeps those variants (in the grid's
    order; an unknown name is an error); ``seeds`` (the chapter's parameter, if not None) replaces the block's.
    ``encoder`` sets ``bank.encoder`` for every run unless a variant sets it.
    """
    name = data.get("name", "?")
    block = dict((data.get("profiles") or {}).get(profile) or {})
    unknown = set(block) - {"seeds", "overrides", "only"}
    if unknown:
        raise ConfigError(f"book grid {name}: unknown keys {sorted(unknown)} in profiles.{profile}")
    variants = {str(k): dict(v or {}) for k, v in (data.get("variants") or {"default": {}}).items()}
    only = block.get("only")
    if only is not None:
        missing = [v for v in only if str(v) not in variants]
        if missing:
            raise ConfigError(f"book grid {name}: profiles.{profile}.only names unknown variants {missing}")
        variants = {k: v for k, v in variants.items() if k in set(map(str, only))}
    overrides = {**(data.get("overrides") or {}), **(block.get("overrides") or {})}
    if encoder:
        overrides["bank.encoder"] = str(encoder)
    grid = {k: v for k, v in data.items() if k not in ("profiles",)}
    grid.update(profile=profile, datasets=[str(dataset)], variants=variants, overrides=overrides,
                seeds=[int(s) for s in (seeds if seeds is not None else block.get("seeds", [0]))])
    return grid


def book_grid(name: str, ch: Any, seeds: Sequence[int] | None = None, variants: Sequence[str] | None = None):
    """The :class:`~pbip_core.experiments.Grid` of book grid ``name`` for chapter ``ch``
    (a :class:`pbip_core.book.Chapter`): its profile, dataset and encoder; ``seeds`` as in :func:`resolve_book_grid`;
    ``variants`` (optional) keeps only those."""
    from .experiments import load_grid

    grid = resolve_book_grid(read_book_grid(name), ch.profile, ch.dataset, ch.encoder, seeds)
    if variants is not None:
        grid["variants"] = {k: v for k, v in grid["variants"].items() if k in set(variants)}
    return load_grid(grid)


def results_dir(ch: Any) -> Path:
    """Where the chapters' runs and result tables live: ``<out_dir>/experiments``."""
    return Path(ch.out_dir) / "experiments"


def write_grid(grid: Any, path: str | Path) -> Path:
    """Save a resolved grid as a plain YAML file that ``pbip run`` reads."""
    from .io import atomic_write_text

    keys = ("name", "profile", "datasets", "methods", "variants", "seeds", "stage2", "splits", "overrides")
    data = {k: getattr(grid, k) for k in keys}
    data["variants"] = {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                        for k, v in data["variants"].items()}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return Path(path)


def run_book_grid(name: str, ch: Any, seeds: Sequence[int] | None = None, variants: Sequence[str] | None = None,
                  allow_failed: bool = False) -> pd.DataFrame:
    """Run (or load from the cache) book grid ``name`` for chapter ``ch``; return its rows of the results table.

    Runs one at a time (``jobs=1``). A failed run raises :class:`PBIPError` with its reason unless ``allow_failed``.
    The returned frame carries the grid in ``df.attrs["grid"]``.
    """
    from .experiments import plan, run_grid

    grid = book_grid(name, ch, seeds, variants)
    out = results_dir(ch)
    write_grid(grid, Path(ch.out_dir) / "grids" / f"{grid.name}.yaml")
    df = run_grid(grid, out, jobs=1)
    bad = df[df["status"] != "ok"] if len(df) else df
    if len(bad) and not allow_failed:
        first = bad.iloc[0]
        raise PBIPError(f"grid {grid.name}: {len(bad)} run(s) failed, e.g. {first['method']}/{first['variant']} "
                        f"seed {first['seed']}: {first['error']} (run folder {out / 'runs' / str(first['hash'])})")
    if len(df):  # the aliases of the current plan (the table keeps those of the grid that first ran the run)
        aliases = {s.hash: " ".join(s.aliases) for s in plan(grid, quiet=True)}
        df["aliases"] = [aliases.get(str(h), "") for h in df["hash"]]
    df.attrs["grid"] = grid
    return df


def run_dir(df_row: Mapping[str, Any], ch: Any) -> Path:
    """The run folder of one row of a results table."""
    return results_dir(ch) / "runs" / str(df_row["hash"])


# ---------------------------------------------------------------------------------------------------- provenance
def paper_dataset(ch: Any) -> str:
    """The paper's dataset our numbers are put beside: the dataset itself when it is one of the paper's four, else
    BCSS-WSSS (the synthetic set stands in for it: same classes and palette)."""
    from .data import known_name, load_info
    from .report import DATASETS

    name = load_info(ch.dataset).name if Path(ch.dataset).is_dir() else Path(ch.dataset).name
    key = known_name(str(name))
    return key if key in DATASETS else "bcss-wsss"


def trims(grid: Any) -> dict[str, Any]:
    """The grid-wide overrides (what the book changed relative to the profile for every run)."""
    return {k: v for k, v in grid.overrides.items() if k != "bank.encoder"}


def provenance(ch: Any, grid: Any, what: str = "") -> str:
    """One sentence: profile, dataset, encoder, backbone, epochs (and stage 2), seeds, trims and what is scored."""
    from .config import make_config

    cfg = make_config(grid.profile, {**grid.overrides})
    dataset = Path(ch.dataset).name + (" (synthetic stand-in for BCSS-WSSS)" if ch.synthetic else "")
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
    from .report import render_comparison

    grid = df.attrs.get("grid")
    scored = what or f"{'stage-1 pseudo masks' if stage == 'stage1' else 'stage-2 predictions'} on {split}"
    prov = provenance(ch, grid, scored) if grid is not None else f"profile {ch.profile}; {scored}"
    cols = [key] + [c for c in (f"{stage}.{split}.{m}" for m in metrics) if c in df.columns]
    return render_comparison(df[cols].copy(), table, paper_dataset(ch), key=key, metrics=metrics, provenance=prov,
                             columns=f"{stage}.{split}.", row_map=row_map, only_ours=only_ours)


def show(table: pd.DataFrame, caption: str | None = None) -> Any:
    """A table for a notebook as HTML: its caption (``caption`` or ``table.attrs["caption"]``) above it, floats with
    two decimals, missing values as "—", long texts not truncated."""
    from IPython.display import HTML

    caption = caption if caption is not None else table.attrs.get("caption", "")
    styled = table.style.format(precision=2, na_rep="—").set_caption(caption).set_table_styles(
        [{"selector": "caption", "props": "caption-side: top; text-align: left; font-style: italic;"}])
    return HTML(styled.to_html())


def ours_table(df: pd.DataFrame, key: str = "variant", stage: str = "stage1", split: str = "test",
               metrics: Sequence[str] = METRICS, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Our mean±std (percent) per ``key`` for tables without a paper counterpart; ``extra`` config columns kept."""
    from .report import summarize

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
    from .report import compare

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


# ---------------------------------------------------------------------------------------------------- histories
def load_history(run: str | Path) -> dict[str, Any]:
    """``stage1/history.json`` of a run folder: ``{"steps": [...], "epochs": [...]}``."""
    path = Path(run) / "stage1" / "history.json"
    if not path.is_file():
        raise PBIPError(f"{path}: no training history (is the run finished?)")
    return json.loads(path.read_text())


def step_frame(df: pd.DataFrame, ch: Any, label: str = "method") -> pd.DataFrame:
    """Per-step loss terms of every run of ``df``: columns label, seed, epoch, step, lr, total, cls, fgs, bgs, sim."""
    frames = []
    for _, row in df.iterrows():
        steps = pd.DataFrame(load_history(run_dir(row, ch))["steps"])
        frames.append(steps.assign(**{label: row[label], "seed": row["seed"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def epoch_frame(df: pd.DataFrame, ch: Any, label: str = "method") -> pd.DataFrame:
    """Per-epoch records (seconds, val_miou, ...) of every run of ``df``, without the confusion matrices."""
    frames = []
    for _, row in df.iterrows():
        ep = pd.DataFrame(load_history(run_dir(row, ch))["epochs"])
        ep = ep.drop(columns=[c for c in ep.columns if c.endswith("confusion")])
        frames.append(ep.assign(**{label: row[label], "seed": row["seed"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------- masks
def pick_images(ch: Any, split: str = "val", n: int = 4) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The first ``n`` images of a val/test split that hold at least two classes (else the first ``n``):
    file names, RGB images and ground-truth masks."""
    from .data import list_pairs, load_info
    from .io import read_mask, read_rgb

    info = load_info(ch.dataset)
    pairs = list_pairs(ch.dataset, split)
    masks = {i: read_mask(m) for i, (_, m) in enumerate(pairs[: 20 * n])}
    rich = [i for i, m in masks.items() if len(set(np.unique(m)) - {info.background_index}) >= 2]
    chosen = (rich + [i for i in masks if i not in rich])[:n]
    return ([pairs[i][0].name for i in chosen], [read_rgb(pairs[i][0]) for i in chosen],
            [masks[i] for i in chosen])


def masks_of(df: pd.DataFrame, ch: Any, names: Sequence[str], split: str = "val", label: str = "method",
             seed: int | None = None, folder: str | None = None) -> dict[str, list[np.ndarray]]:
    """Masks written by the runs of ``df`` for the images ``names``: label -> list of (H, W) arrays.

    ``folder`` defaults to the stage-1 pseudo masks ``pseudo_<split>``; ``stage2/pred_test`` holds stage-2
    predictions. One run per label: the given ``seed``, else the smallest.
    """
    from .io import read_mask

    folder = folder or f"pseudo_{split}"
    out: dict[str, list[np.ndarray]] = {}
    for lab, g in df.groupby(label, sort=False):
        g = g[g["seed"] == seed] if seed is not None else g[g["seed"] == g["seed"].min()]
        if len(g):
            out[str(lab)] = [read_mask(run_dir(g.iloc[0], ch) / folder / n) for n in names]
    return out


def foreground_images(run: str | Path, image: np.ndarray, classes: Sequence[int]
                      ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Eq. 3-5 with a trained stage-1 model: per class of ``classes``, the refined map M (eq. 3, min-max scaled to
    [0, 1]) and the foreground image X_FG = b * M * X (eq. 4-5; b = 1 without the adaptive threshold).

    ``run``: a run folder (its ``stage1`` holds the checkpoint); ``image``: (H, W, 3) uint8. Returns two dicts
    class -> (h, w) map in [0, 1] and class -> (h, w, 3) uint8 image, at the model's input size.
    """
    import torch

    from .data import resize_image, to_tensor
    from .model import adaptive_threshold, aggregate, fg_bg_masks, minmax
    from .train import load_classnet

    net, cfg = load_classnet(Path(run) / "stage1")
    x = resize_image(to_tensor(image), cfg.data.image_size)[None]
    with torch.no_grad():
        m = minmax(aggregate(net(x).maps, tuple(x.shape[-2:])))                      # eq. 3, (1, N, h, w)
        b = adaptive_threshold(m, cfg.model.delta, cfg.model.threshold_scope) if cfg.model.at else None   # eq. 4
        fg, _ = fg_bg_masks(m, b)                                                    # eq. 5 weights
    maps = {c: m[0, c].numpy() for c in classes}
    xs = {c: (255 * (x[0] * fg[0, c]).permute(1, 2, 0).clamp(0, 1).numpy()).astype(np.uint8) for c in classes}
    return maps, xs


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
    (:func:`pbip_core.encoders.available_encoders`, :func:`pbip_core.backbones.available_backbones`).
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
    from .backbones import available_backbones
    from .encoders import available_encoders
    from .report import paper_table

    raw = read_book_grid("book-table3")
    selected = resolve_book_grid(raw, ch.profile, ch.dataset)["variants"]
    status = weights_status(raw["variants"], available_encoders(), available_backbones())
    for v, st in status.items():
        if st == "available" and v not in selected:
            status[v] = f"weights available; not in the {ch.profile} profile's selection (book-table3.yaml)"
    runnable = [v for v in selected if status[v] == "available"]
    rows = [{"row": label_of(v), "variant": v, "status": st} for v, st in status.items()]
    have = {r["row"] for r in rows}
    for r in pd.unique(paper_table(3, paper_dataset(ch))["row"]):
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
#: The differences of DESIGN.md ("What the official code does differently") and the config keys that switch them.
#: Variant = the book-official grid's variant measuring it ("" = not measurable as a switch here).
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
    {"difference": "FG/BG images (eq. 5)", "keys": ["model.fg_mask_source"], "variant": ""},
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
    from .config import get_key, make_config

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


def train_seconds(df: pd.DataFrame, ch: Any, key: str = "variant") -> pd.Series:
    """Mean stage-1 training time (seconds, sum over epochs from ``history.json``) per ``key``.

    (The table's ``wall_time_s`` is the time of the last execution, which for a run shared with another grid is only
    its re-scoring.)"""
    secs = [sum(e["seconds"] for e in load_history(run_dir(r, ch))["epochs"]) for _, r in df.iterrows()]
    return pd.Series(secs, index=df.index).groupby(df[key], sort=False).mean()


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
