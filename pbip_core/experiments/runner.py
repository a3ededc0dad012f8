"""The resumable runner: every run of a grid through the pipeline, one tidy results table.

The pipeline of one run (:func:`pipeline_step`): prototype bank (cached per dataset and bank config; ``bank.seed``
stays fixed unless a variant sets it or ``bank.seed_from_train`` ties it to the run's seed, so seeds vary the training
only by default) -> stage-1 training -> pseudo masks of ``splits`` (val/test restricted by ``pseudo.labels``, from the
``pseudo.test_checkpoint`` weights; train from ``best.pt``) -> scores -> optionally train pseudo masks -> stage 2 ->
scores. Every finished (or failed) run becomes one
row of ``RESULTS/<name>.csv``: grid, hash, dataset, method, variant, seed, status, wall time, every flat config key
(dotted), and every metric as ``<stage>.<split>.<metric>`` (per-class IoU as ``<stage>.<split>.iou.<class>``). Rows
are written atomically under a file lock. Rerunning a grid skips runs whose hash already has status ``ok`` and
resumes half-finished run folders (``RESULTS/runs/<hash>/``) from their checkpoints. A run's folder is claimed
(:mod:`pbip_core.engine.claims`) before it starts, so a second ``pbip run`` of the same grid skips the runs a live
process holds, never writes a row for a run it did not execute, and a failed row never replaces an ``ok`` one.

Command line: ``pbip run GRID.yaml [--profile P] [--dataset D] [--dry-run] [--jobs N] [--results DIR]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from ..config import Config
from ..data.manifest import load_manifest
from ..engine.bank import build_bank, save_bank
from ..engine.claims import acquire, held_by_another
from ..engine.metrics import evaluate_dir
from ..engine.pseudo import write_pseudo_masks
from ..engine.stage1 import train
from ..engine.stage2 import train_stage2
from ..errors import PBIPError, RunClaimedError
from ..io import atomic_path
from ..nets.backbones import available_backbones
from ..nets.encoders import available_encoders
from .grid import Grid, RunSpec, load_grid, plan

ID_COLUMNS = ["grid", "hash", "dataset", "method", "variant", "seed", "aliases", "status", "wall_time_s", "finished", "error"]
Step = Callable[[RunSpec, Path], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------------- results table
def results_path(grid: Grid, results_dir: str | Path) -> Path:
    return Path(results_dir) / f"{grid.name}.csv"


def load_results(path: str | Path) -> pd.DataFrame:
    """The tidy table of a grid (empty DataFrame if it does not exist yet)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=ID_COLUMNS)
    return pd.read_csv(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Add (or replace, by hash) one row of the table: read, update, write a temp file, rename; under a lock.

    A row that is not ``ok`` never replaces an ``ok`` row of the same hash (that result stays; a message says so)."""
    path = Path(path)
    with _locked(path):
        df = load_results(path)
        if len(df) and "hash" in df.columns:
            same = df["hash"].astype(str) == str(row["hash"])
            if row.get("status") != "ok" and "status" in df.columns and (df.loc[same, "status"] == "ok").any():
                print(f"pbip run: {path}: kept the ok row of {row['hash']}; not replaced by this "
                      f"{row.get('status')} run ({row.get('error', '')})", file=sys.stderr, flush=True)
                return
            df = df[~same]
        new = pd.DataFrame([dict(row)])
        df = new if df.empty else pd.concat([df, new], ignore_index=True, sort=False)
        cols = [c for c in ID_COLUMNS if c in df.columns] + [c for c in df.columns if c not in ID_COLUMNS]
        with atomic_path(path) as tmp:
            df[cols].to_csv(tmp, index=False)


def done_hashes(path: str | Path) -> set[str]:
    df = load_results(path)
    if df.empty or "status" not in df.columns:
        return set()
    return set(df.loc[df["status"] == "ok", "hash"].astype(str))


_NOT_METRICS = {"background_index", "class_names", "split", "data_root"}


def flatten_metrics(stage: str, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"miou": .5, "per_class_iou": {"TUM": .6}}`` -> ``{"stage1.val.miou": .5, "stage1.val.iou.TUM": .6}``."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in _NOT_METRICS:
            continue
        if isinstance(v, Mapping):
            name = "iou" if k == "per_class_iou" else k
            for c, x in v.items():
                if isinstance(x, (int, float)) or x is None:
                    out[f"{stage}.{split}.{name}.{c}"] = x
        elif isinstance(v, (int, float)) or v is None:
            out[f"{stage}.{split}.{k}"] = v
    return out


def _config_columns(cfg: Config) -> dict[str, Any]:
    return {k: (json.dumps(list(v)) if isinstance(v, (tuple, list)) else v) for k, v in cfg.flat().items()}


# ---------------------------------------------------------------------------------------------------- pipeline
def bank_path_for(spec: RunSpec, results_dir: str | Path) -> Path:
    """Cache path of the prototype bank: one per dataset and bank configuration."""
    key = json.dumps({"dataset": Path(spec.dataset).as_posix(), "bank": dataclasses.asdict(spec.cfg.bank)},
                     sort_keys=True, default=str)
    return Path(results_dir) / "banks" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def pipeline_step(spec: RunSpec, run_dir: Path, results_dir: str | Path = "results") -> dict[str, Any]:
    """The real pipeline of one run; returns the flat metric columns."""
    cfg, data = spec.cfg, spec.dataset
    bank_path = bank_path_for(spec, results_dir)
    with _locked(bank_path):  # two parallel runs on one dataset build its bank once
        if not bank_path.is_file():
            save_bank(build_bank(data, cfg.bank, cache_dir=bank_path.parent / "cache"), bank_path)
    s1 = run_dir / "stage1"
    train(cfg, data, bank_path, s1, resume=(s1 / "last.pt").is_file())
    out: dict[str, Any] = {}
    for split in spec.splits:  # val/test: cfg.pseudo.labels and the cfg.pseudo.test_checkpoint weights
        ckpt = "last.pt" if (split != "train" and cfg.pseudo.test_checkpoint == "last") else "best.pt"
        masks = write_pseudo_masks(s1, data, split, run_dir / f"pseudo_{split}", cfg.pseudo.labels, checkpoint=ckpt)
        if split != "train":
            out.update(flatten_metrics("stage1", split, evaluate_dir(masks, data, split)))
    if spec.stage2:
        masks = run_dir / "pseudo_train"
        if "train" not in spec.splits:
            masks = write_pseudo_masks(s1, data, "train", masks)
        s2 = run_dir / "stage2"
        res = train_stage2(cfg, data, masks, s2, resume=(s2 / "last.pt").is_file())
        for split in ("val", "test"):
            out.update(flatten_metrics("stage2", split, res[split]))
    return out


def _default_step(results_dir: str | Path) -> Step:
    return lambda spec, run_dir: pipeline_step(spec, run_dir, results_dir)


def execute(spec: RunSpec, results_dir: str | Path, step: Step | None = None) -> dict[str, Any]:
    """Claim the run's folder, run it (:func:`_execute`) and record its row.

    A run whose folder another live process holds (a second ``pbip run`` on the same grid), or that another process
    finished meanwhile, is skipped: the returned row has status ``skipped`` and nothing is written for it.
    """
    results_dir = Path(results_dir)
    run_dir = results_dir / "runs" / spec.hash
    skipped = {"grid": spec.grid, "hash": spec.hash, "status": "skipped", "wall_time_s": 0.0}
    try:
        claim = acquire(run_dir, f"run {spec.label}")
    except RunClaimedError as e:
        print(f"pbip run: {spec.label} skipped: {e}", file=sys.stderr, flush=True)
        return {**skipped, "error": str(e), "claimed": True}
    with claim:
        if spec.hash in done_hashes(results_dir / f"{spec.grid}.csv"):
            print(f"pbip run: {spec.label} skipped: finished by another process meanwhile", flush=True)
            return {**skipped, "error": "finished by another process"}
        return _execute(spec, results_dir, step)


def _execute(spec: RunSpec, results_dir: str | Path, step: Step | None = None) -> dict[str, Any]:
    """Run one spec with ``step`` and record its row (status ok, or failed with the error). KeyboardInterrupt
    propagates without a row, so the run is redone (resumed) next time."""
    results_dir = Path(results_dir)
    run_dir = results_dir / "runs" / spec.hash
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.cfg.save(run_dir / "config.yaml")
    step = step or _default_step(results_dir)
    t0 = time.time()
    row: dict[str, Any] = {"grid": spec.grid, "hash": spec.hash, "dataset": spec.dataset, "method": spec.method,
                           "variant": spec.variant, "seed": spec.seed, "aliases": " ".join(spec.aliases)}
    try:
        metrics = dict(step(spec, run_dir) or {})
        row.update(status="ok", error="")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a failed run is recorded and the grid goes on
        metrics = {}
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        row.update(status="failed", error=msg)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        where = "" if isinstance(e, PBIPError) else f" (traceback in {run_dir / 'error.txt'})"
        print(f"pbip run: {spec.label} failed: {msg}{where}", file=sys.stderr)
    row.update(wall_time_s=round(time.time() - t0, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    row.update(_config_columns(spec.cfg))
    row.update(metrics)
    append_row(results_dir / f"{spec.grid}.csv", row)
    return row


def _init_worker(counter: Any, n_gpus: int, threads: int) -> None:
    with counter.get_lock():
        idx = counter.value
        counter.value += 1
    if n_gpus > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(idx % n_gpus)  # round-robin, before CUDA is touched
    torch.set_num_threads(max(1, threads))


def run_grid(grid: Grid | str | Path | Mapping[str, Any], results_dir: str | Path = "results", jobs: int = 1,
             dry_run: bool = False, step: Step | None = None, wait: bool = False,
             poll_s: float = 5.0) -> pd.DataFrame:
    """Run every pending run of ``grid`` and return its rows of the results table.

    ``step(spec, run_dir) -> {metric column: value}`` defaults to the real pipeline (:func:`pipeline_step`).
    ``jobs > 1`` runs that many processes (spawn); each uses ``cores // jobs`` torch threads and, on a machine
    with GPUs, one GPU chosen round-robin. ``dry_run`` prints the plan and what is missing and runs nothing.
    Runs another live process holds are skipped (that process writes their rows); with ``wait``, this call waits
    for them (checking every ``poll_s`` seconds) and runs any that the other process did not finish.
    """
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    specs = plan(grid)
    table = results_path(grid, results_dir)
    if dry_run:
        text, df = dry_run_report(grid, specs, results_dir)
        print(text)
        return df
    done = done_hashes(table)
    todo = [s for s in specs if s.hash not in done]
    print(f"pbip run: grid {grid.name}: {len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run "
          f"-> {table}", flush=True)
    if jobs <= 1 or len(todo) <= 1:
        rows = []
        for i, spec in enumerate(todo, 1):
            print(f"pbip run: [{i}/{len(todo)}] {spec.label} ({spec.hash})", flush=True)
            rows.append(execute(spec, results_dir, step))
            print(f"pbip run: [{i}/{len(todo)}] {rows[-1]['status']} in {rows[-1]['wall_time_s']} s", flush=True)
    else:
        rows = _run_parallel(todo, results_dir, jobs, step)
    held = {r["hash"] for r in rows if r.get("claimed")}
    claimed = [s for s in todo if s.hash in held]
    if wait and claimed:
        rows = [r for r in rows if not r.get("claimed")] + _wait_for(claimed, results_dir, step, poll_s)
    n_skipped = sum(r["status"] == "skipped" for r in rows)
    if n_skipped:
        print(f"pbip run: {n_skipped} run(s) skipped: claimed or finished by another process (their rows are "
              "written by that process)", flush=True)
    df = load_results(table)
    hashes = [s.hash for s in specs]
    if df.empty:
        return df
    df = df[df["hash"].astype(str).isin(hashes)]
    order = {h: i for i, h in enumerate(hashes)}
    return df.sort_values("hash", key=lambda s: s.astype(str).map(order)).reset_index(drop=True)


def _wait_for(specs: list[RunSpec], results_dir: str | Path, step: Step | None, poll_s: float
              ) -> list[dict[str, Any]]:
    """Wait until no live process holds these runs, then run each one whose row is not ``ok`` by then."""
    print(f"pbip run: waiting for {len(specs)} run(s) held by another process", flush=True)
    rows: list[dict[str, Any]] = []
    pending = list(specs)
    while pending:
        time.sleep(poll_s)
        still = []
        for spec in pending:
            if held_by_another(Path(results_dir) / "runs" / spec.hash):
                still.append(spec)
                continue
            row = execute(spec, results_dir, step)
            if row.get("claimed"):                    # claimed again in the meantime: keep waiting
                still.append(spec)
            else:
                rows.append(row)
        pending = still
    return rows


def _run_parallel(todo: list[RunSpec], results_dir: str | Path, jobs: int, step: Step | None) -> list[dict[str, Any]]:
    n_gpus = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, n_gpus, threads)) as pool:
        futures = {pool.submit(execute, spec, results_dir, step): spec for spec in todo}
        rows = []
        for n, fut in enumerate(as_completed(futures), 1):
            spec = futures[fut]
            rows.append(row := fut.result())
            print(f"pbip run: [{n}/{len(todo)}] {spec.label}: {row['status']} in {row['wall_time_s']} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- dry run
def dataset_hint(dataset: str) -> str:
    """What the data manifest says about obtaining ``dataset`` (matched by the folder name; "" if unknown)."""
    key = "".join(ch for ch in Path(dataset).name.lower() if ch.isalnum())
    for name, entry in load_manifest()["datasets"].items():
        if "".join(ch for ch in name.lower() if ch.isalnum()) == key:
            parts = [f"{k}: {' '.join(str(entry[k]).split())}" for k in ("source", "licence", "local_dir", "layout")
                     if entry.get(k)]
            return "; ".join(parts)
    return ""


def missing_requirements(specs: Sequence[RunSpec]) -> list[str]:
    """Human-readable lines: datasets not on disk (with the manifest's instructions), weights not available."""
    lines = []
    for ds in dict.fromkeys(s.dataset for s in specs):
        if not Path(ds).is_dir():
            hint = dataset_hint(ds)
            lines.append(f"dataset {ds}: folder not found" + (f" -- {hint}" if hint else
                                                                " (see `pbip data list`)"))
    encoders = available_encoders()
    for enc in dict.fromkeys(s.cfg.bank.encoder for s in specs):
        status = encoders.get(enc, "unknown encoder")
        if status != "available":
            lines.append(f"encoder {enc}: weights not available offline -- {status}")
    backbones = available_backbones()
    needed: dict[str, str] = {}
    for s in specs:
        if s.cfg.model.pretrained:
            needed[s.cfg.model.backbone] = "stage-1 backbone"
        if s.stage2 and s.cfg.stage2.pretrained:
            needed.setdefault(s.cfg.stage2.backbone, "stage-2 backbone")
    for bb, role in needed.items():
        status = backbones.get(bb, "unknown backbone")
        if status != "available":
            lines.append(f"{role} {bb}: weights not available offline -- {status}")
    return lines


def dry_run_report(grid: Grid, specs: Sequence[RunSpec], results_dir: str | Path) -> tuple[str, pd.DataFrame]:
    done = done_hashes(results_path(grid, results_dir))
    df = pd.DataFrame([{"hash": s.hash, "dataset": s.dataset, "method": s.method, "variant": s.variant,
                        "seed": s.seed, "status": "done" if s.hash in done else "pending"} for s in specs])
    lines = [f"grid {grid.name} (profile {grid.profile}, stage2={grid.stage2}, splits={grid.splits}): "
             f"{len(specs)} runs, {int((df['status'] == 'done').sum()) if len(df) else 0} done -> "
             f"{results_path(grid, results_dir)}", df.to_string(index=False) if len(df) else "(no runs)"]
    missing = missing_requirements(specs)
    lines.append("missing:" if missing else "missing: nothing (all datasets found; weights check passed where known)")
    lines += [f"  - {m}" for m in missing]
    df.attrs["missing"] = missing
    return "\n".join(lines), df
