"""The runs behind the chapters: read (or, where the profile allows, train) a book grid's runs, find their run
folders, read their histories and masks.

A chapter's experiments are a grid of :mod:`pbip_core.experiments.grid` in ``grids/book/`` (the same dialect as every
grid: ``extends`` and per-profile ``profiles`` blocks), resolved for the chapter's profile, dataset and encoder; which
chapter reads which grid is :data:`pbip_core.book.plan.CHAPTER_GRIDS`, the table ``pbip book --plan`` plans from.
:func:`run_book_grid` writes the resolved grid to ``<out_dir>/grids/<name>.yaml`` and returns its rows from
``<out_dir>/experiments``. Runs that are missing are trained in the kernel, one after another, only when the chapter
may (``ch.train``: smoke and demo); otherwise (the paper profile) it raises :class:`~pbip_core.errors.MissingRunsError`
naming the runs and the ``pbip book --plan`` / ``pbip run`` commands that make them. Runs are cached by content hash
under ``<out_dir>/experiments/runs/<hash>``, so two chapters asking for the same runs train them once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import list_pairs, load_info, resize_image, to_tensor
from ..engine.checkpoint import load_classnet
from ..errors import ConfigError, DataError, MissingRunsError, PBIPError
from ..experiments.grid import Grid, plan, write_grid
from ..experiments.runner import collect, dataset_hint, done_runs, execute, run_grid
from ..io import read_mask, read_rgb
from ..method.model import match_masks
from . import findings
from .plan import (
    BOOK_GRIDS,
    SHARED_RUN_GRID,
    book_grid,
    missing_message,
    shared_run_grid,
)
from .tables import paper_dataset

__all__ = [
    "SHARED_RUN_GRID",
    "book_grid",
    "ensure_runs",
    "results_dir",
    "run_book_grid",
    "run_dir",
    "shared_run_grid",
    "stage1_run",
]


def results_dir(ch: Any) -> Path:
    """Where the chapters' runs and result tables live: ``<out_dir>/experiments``."""
    return Path(ch.out_dir) / "experiments"


def ensure_runs(grid: Grid, ch: Any) -> pd.DataFrame:
    """The rows of ``grid``'s runs in the chapter's results folder. Missing runs are trained now (one after another,
    in this process) when ``ch.train``; otherwise :class:`MissingRunsError` says which and how to make them."""
    out = results_dir(ch)
    if getattr(ch, "train", True):
        return run_grid(grid, out, jobs=1, wait=True)     # a run another process holds: wait for it
    specs = plan(grid, quiet=True)
    done = done_runs(specs, out)
    missing = [s for s in specs if s.hash not in done]
    if missing:
        raise MissingRunsError(missing_message(ch, grid, missing, out))
    return collect(grid, specs, out)


def run_book_grid(name: str, ch: Any, seeds: Sequence[int] | None = None, variants: Sequence[str] | None = None,
                  allow_failed: bool = False) -> pd.DataFrame:
    """Book grid ``name`` for chapter ``ch``: its rows of the results table (:func:`ensure_runs`).

    A failed run raises :class:`PBIPError` with its reason unless ``allow_failed``. The returned frame carries the
    grid in ``df.attrs["grid"]``.
    """
    if name not in BOOK_GRIDS:
        raise ConfigError(f"book grid {name!r} is not in pbip_core.book.plan.CHAPTER_GRIDS (the table the book's plan "
                          f"is made from): add it there; known: {', '.join(sorted(BOOK_GRIDS))}")
    grid = book_grid(name, ch, seeds, variants)
    out = results_dir(ch)
    data = Path(grid.datasets[0])
    if not (data / "dataset.yaml").is_file():
        # The grid's own dataset (GRID_DATASETS) is not here: show the runs recorded in the results folder, if any.
        df = recorded_rows(name, ch)
        if not len(df):
            raise DataError(f"{data}: dataset folder not found and no recorded runs of grid {name} in {out}; "
                            f"{dataset_hint(str(data))}")
        df.attrs.update(grid=grid, recorded=True)
        return df
    write_grid(grid, Path(ch.out_dir) / "grids" / f"{grid.name}.yaml")
    df = ensure_runs(grid, ch)
    bad = df[df["status"] != "ok"] if len(df) else df
    if len(bad) and not allow_failed:
        first = bad.iloc[0]
        raise PBIPError(f"grid {grid.name}: {len(bad)} run(s) failed, e.g. {first['method']}/{first['variant']} "
                        f"seed {first['seed']}: {first['error']} (run folder {out / 'runs' / str(first['hash'])})")
    df.attrs["grid"] = grid
    return df


def run_dir(df_row: Mapping[str, Any], ch: Any) -> Path:
    """The run folder of one row of a results table."""
    return results_dir(ch) / "runs" / str(df_row["hash"])


def stage1_run(ch: Any, seed: int | None = None) -> Path:
    """The stage-1 run folder (``.../runs/<hash>/stage1``) of the book's shared run (:func:`shared_run_grid`),
    trained now if missing and the chapter may train: chapters 03-05 use this one run (and it is the ablations'
    baseline in chapters 07 and 09)."""
    grid = shared_run_grid(ch, seed)
    df = ensure_runs(grid, ch)
    row = df.iloc[0]
    if row["status"] != "ok":
        raise DataError(f"{run_dir(row, ch)}: the stage-1 run failed: {row.get('error', '')}")
    if not (run_dir(row, ch) / "stage1" / "best.pt").is_file():
        # A published run (pbip_core.book.publish) has no weights: train it again; on a CPU it reproduces its row.
        if not getattr(ch, "train", True):
            raise MissingRunsError(f"{run_dir(row, ch)}: the shared stage-1 run has no checkpoint (a published run) "
                                   "and this chapter may not train; run `pbip run --rerun-stale` or allow training")
        print(f"the shared stage-1 run {row['hash']} has no checkpoint (published results keep none): training it "
              "again", flush=True)
        again = execute(plan(grid, quiet=True)[0], results_dir(ch), rerun=True)
        if again.get("status") != "ok":
            raise DataError(f"{run_dir(row, ch)}: training the shared stage-1 run again failed: "
                            f"{again.get('error', again.get('status'))}")
    return run_dir(row, ch) / "stage1"


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


def train_seconds(df: pd.DataFrame, ch: Any, key: str = "variant") -> pd.Series:
    """Mean stage-1 training time (seconds, sum over epochs from ``history.json``) per ``key``.

    (The table's ``wall_time_s`` is the time of the last execution, which for a run shared with another grid is only
    its re-scoring.)"""
    secs = [sum(e["seconds"] for e in load_history(run_dir(r, ch))["epochs"]) for _, r in df.iterrows()]
    return pd.Series(secs, index=df.index).groupby(df[key], sort=False).mean()


# ---------------------------------------------------------------------------------------------------- masks
def pick_images(ch: Any, split: str = "val", n: int = 4) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The first ``n`` images of a val/test split that hold at least two classes (else the first ``n``):
    file names, RGB images and ground-truth masks."""
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
    net, cfg = load_classnet(Path(run) / "stage1")
    x = resize_image(to_tensor(image), cfg.data.image_size)[None]
    with torch.no_grad():                                                            # eq. 3-5 of the run's config
        mm = match_masks(net(x).maps, tuple(x.shape[-2:]), cfg.model.delta, cfg.model.at, cfg.model.threshold_scope,
                         threshold_map=cfg.model.threshold_map)
    maps = {c: mm.m[0, c].numpy() for c in classes}
    xs = {c: (255 * (x[0] * mm.fg[0, c]).permute(1, 2, 0).clamp(0, 1).numpy()).astype(np.uint8) for c in classes}
    return maps, xs


# ---------------------------------------------------------------------------------------------------- without data
def recorded_rows(name: str, ch: Any) -> pd.DataFrame:
    """The finished rows recorded for grid ``name`` in the chapter's results folder, read from the runs' ``row.json``
    without the dataset: for a chapter whose dataset is not on this machine but whose runs were made elsewhere
    (results folders are portable, :mod:`pbip_core.experiments.identity`). Empty when there are none."""
    rows = []
    for path in sorted((results_dir(ch) / "runs").glob("*/row.json")):
        row = json.loads(path.read_text())
        if row.get("grid") == name and row.get("status") == "ok" and row.get("profile") == ch.profile:
            rows.append(row)
    return pd.DataFrame(rows)


def pick_per_class(ch: Any, split: str = "test", n: int = 6) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Up to ``n`` images of a split, one per class in turn (by the largest class of each mask): file names, RGB
    images and ground-truth masks. For datasets whose images hold one class each (EBHI-Seg)."""
    info = load_info(ch.dataset)
    pairs = list_pairs(ch.dataset, split)
    by_class: dict[int, list[int]] = {}
    for i, (_, m) in enumerate(pairs):
        counts = np.bincount(read_mask(m).ravel().astype(np.int64), minlength=info.n_classes + 1)[:info.n_classes]
        if counts.any():
            by_class.setdefault(int(counts.argmax()), []).append(i)
    chosen: list[int] = []
    while len(chosen) < n and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(chosen) < n:
                chosen.append(by_class[c].pop(0))
    return ([pairs[i][0].name for i in chosen], [read_rgb(pairs[i][0]) for i in chosen],
            [read_mask(pairs[i][1]) for i in chosen])


# ---------------------------------------------------------------------------------------------------- the summary
def grid_if_available(name: str, ch: Any, seeds: Sequence[int] | None = None) -> pd.DataFrame | None:
    """:func:`run_book_grid`, or None (after a note on the page saying how to get the data) when the grid's own
    dataset (:data:`~pbip_core.book.plan.GRID_DATASETS`) is not on this machine and no runs of it are recorded."""
    grid = book_grid(name, ch, seeds)
    data = Path(grid.datasets[0])
    if not (data / "dataset.yaml").is_file() and not len(recorded_rows(name, ch)):
        from IPython.display import Markdown, display

        display(Markdown(f"*Grid `{name}` is not shown: its dataset `{data.name}` is not on this machine and no runs "
                         f"of it are recorded in the results folder ({dataset_hint(str(data))}).*"))
        return None
    return run_book_grid(name, ch, seeds)


#: The grids behind the results summary (:func:`headline_runs`): name in the summary -> book grid.
HEADLINE_GRIDS: dict[str, str] = {"table1": "book-table1", "ebhi": "book-ebhi"}


def headline_runs(ch: Any) -> dict[str, pd.DataFrame]:
    """The runs behind the book's results summary (the intro page and the README): ``table1`` (PBIP, CAM and the
    official code, stage 1 and 2, on the chapters' dataset) and ``ebhi`` (PBIP and CAM on EBHI-Seg, chapter 10; None
    when that dataset is not here and nothing is recorded)."""
    return {"table1": run_book_grid(HEADLINE_GRIDS["table1"], ch), "ebhi": grid_if_available(HEADLINE_GRIDS["ebhi"], ch)}


def headline(ch: Any, runs: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The results summary (:func:`pbip_core.book.findings.headline`) of :func:`headline_runs`: test mIoU of PBIP,
    CAM and the official code per row, the paper's PBIP figure beside it (Table 5 for stage 1, Table 1 for stage 2)."""
    runs = runs or headline_runs(ch)
    pds = paper_dataset(ch)
    s1, s2 = findings.paper_value(5, pds, "SIM+AT"), findings.paper_value(1, pds, "PBIP (Ours)")
    name, nan = Path(ch.dataset).name, float("nan")
    t1 = runs["table1"]
    return findings.headline([
        ("stage 1, ground-truth classes", t1, "stage1.test.miou", name, s1),
        ("stage 1, predicted classes", t1, "stage1_predicted.test.miou", name, nan),
        ("stage 2", t1, "stage2.test.miou", name, s2),
        *([("stage 1, predicted classes", runs["ebhi"], "stage1.test.miou", "ebhi-seg", nan)]
          if runs.get("ebhi") is not None else []),
    ])
