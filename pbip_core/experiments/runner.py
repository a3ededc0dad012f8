"""The resumable runner: every run of a grid (or of a plan of grids) through the pipeline, one tidy table per grid.

The pipeline of one run (:func:`pipeline_step`): prototype bank (cached per dataset identity and bank config;
``bank.seed`` stays fixed unless a variant sets it or ``bank.seed_from_train`` ties it to the run's seed, so seeds vary
the training only by default) -> stage-1 training -> pseudo masks of ``splits`` (val/test restricted by
``pseudo.labels``, from the ``pseudo.test_checkpoint`` weights, and also with the classifier's own labels; train from
``best.pt``) -> scores -> optionally train pseudo masks -> stage 2 -> scores. A run's folder is claimed
(:mod:`pbip_core.engine.claims`) before it starts, so a second ``pbip run`` of the same grid skips (or, with
``wait``, waits for) the runs a live process holds and never runs a finished run again.

Results. Each run writes its own row, ``RESULTS/runs/<hash>/row.json`` (atomically, by the run itself: no file is
shared between runs, so runs on many nodes need no lock): grid, hash, dataset, dataset identity, method, variant,
seed, status, wall time, where it ran and the source of its weights, the code digest, every flat config key (dotted)
and every metric as ``<stage>.<split>.<metric>`` (per-class IoU as ``<stage>.<split>.iou.<class>``).
:func:`collect` gathers a grid's rows into ``RESULTS/<grid>.csv`` (written by ``pbip run`` and ``pbip report``; the
row of a run shared by several grids carries each grid's own labels there). A run is done when its ``row.json`` says
``ok``: rerunning a grid skips it, whichever grid or machine produced it, and resumes half-finished run folders from
their checkpoints. Run hashes do not depend on paths (:mod:`pbip_core.experiments.identity`), so a results folder
copied to another machine or path is reused there.

Where runs execute: :mod:`pbip_core.experiments.executors` (this process, local processes, Slurm via submitit).

Quiet mode (``PBIP_QUIET=1``; ``pbip book`` sets it in the chapters' kernels): no progress bars, each run's printed
output goes to ``runs/<hash>/run.log`` and the runner's own lines to ``RESULTS/logs/<grid>.log``; a call prints one
line per grid, e.g. ``pbip run: book-table1: 9 runs, 9 reused, 0 trained (log: results/.../logs/book-table1.log)``,
with the path relative to ``PBIP_REPO_ROOT`` (default: the working directory). Without it (a terminal, JupyterLab)
everything is printed as it happens, progress bars included.

Command line: ``pbip run GRID_OR_PLAN.yaml [--profile P] [--dataset D] [--dry-run] [--executor local|slurm]
[--jobs N] [--only HASH] [--hashes] [--collect] [--results DIR]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd

from ..config import Config
from ..data.manifest import load_manifest
from ..engine.bank import build_bank, save_bank
from ..engine.claims import acquire, held_by_another
from ..engine.metrics import evaluate_dir
from ..engine.pseudo import write_pseudo_masks
from ..engine.runtime import device_for
from ..engine.stage1 import train
from ..engine.stage2 import train_stage2
from ..errors import ConfigError, PBIPError, RunClaimedError
from ..io import atomic_path, atomic_write_json
from ..nets.backbones import available_backbones
from ..nets.encoders import available_encoders
from .executors import EXECUTORS, SlurmOptions, run_local, run_submitit
from .grid import Grid, RunSpec, load_grid, plan
from .identity import METHOD_VERSION, code_digest

ID_COLUMNS = ["grid", "hash", "dataset", "method", "variant", "seed", "aliases", "status", "wall_time_s", "finished",
              "dataset_id", "device", "weights", "code", "error"]
Step = Callable[[RunSpec, Path], Mapping[str, Any]]
ROW_FILE = "row.json"
RUN_LOG = "run.log"                 # a run's printed output in quiet mode: RESULTS/runs/<hash>/run.log
QUIET_ENV = "PBIP_QUIET"            # "1": quiet mode (pbip book sets it for the chapters it executes)
ROOT_ENV = "PBIP_REPO_ROOT"         # quiet summaries show paths relative to this folder (default: the cwd)


# ---------------------------------------------------------------------------------------------------- output
def quiet_mode() -> bool:
    """True when ``PBIP_QUIET`` is set to 1 / true / yes / on: runs print into log files, without progress bars."""
    return os.environ.get(QUIET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def shown_path(path: str | Path) -> str:
    """``path`` relative to ``PBIP_REPO_ROOT`` (or the working directory) for a printed line: no machine path."""
    return os.path.relpath(Path(path).resolve(), Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve())


def grid_log_path(grids: Sequence[Grid], results_dir: str | Path) -> Path:
    """``RESULTS/logs/<grid>.log`` (``pbip-run.log`` for a plan of several grids): the runner's lines in quiet mode."""
    name = grids[0].name if len(grids) == 1 else "pbip-run"
    return Path(results_dir) / "logs" / f"{name}.log"


@contextlib.contextmanager
def output_to(path: Path | None) -> Iterator[None]:
    """While inside, this process's printed output (``sys.stdout``, ``sys.stderr``: prints, warnings, text progress
    bars) is appended to ``path``; ``None`` changes nothing."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def summary_line(grid: Grid, specs: Sequence[RunSpec], done_before: set[str], df: pd.DataFrame,
                 log: Path | None) -> str:
    """One line for a grid in quiet mode: how many runs were reused (finished before), trained now, failed, or left
    to another process, and where the log is."""
    status = dict(zip(df["hash"], df["status"])) if len(df) else {}
    n = len(specs)
    reused = sum(s.hash in done_before for s in specs)
    now = [s for s in specs if s.hash not in done_before]
    trained = sum(status.get(s.hash) == "ok" for s in now)
    failed = sum(status.get(s.hash) == "failed" for s in now)
    other = len(now) - trained - failed
    parts = [f"{n} run{'s' if n != 1 else ''}", f"{reused} reused", f"{trained} trained"]
    parts += [f"{failed} failed"] if failed else []
    parts += [f"{other} left to another process"] if other else []
    return f"pbip run: {grid.name}: " + ", ".join(parts) + (f" (log: {shown_path(log)})" if log else "")


# ---------------------------------------------------------------------------------------------------- results table
def results_path(grid: Grid, results_dir: str | Path) -> Path:
    return Path(results_dir) / f"{grid.name}.csv"


def load_results(path: str | Path) -> pd.DataFrame:
    """The tidy table of a grid (empty DataFrame if it does not exist yet)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=ID_COLUMNS)
    return pd.read_csv(path)


def row_path(results_dir: str | Path, run_hash: str) -> Path:
    """``RESULTS/runs/<hash>/row.json``: the result of one run, written by the run."""
    return Path(results_dir) / "runs" / str(run_hash) / ROW_FILE


def read_row(results_dir: str | Path, run_hash: str) -> dict[str, Any] | None:
    """The recorded row of a run, or None (not run, or its file is unreadable)."""
    p = row_path(results_dir, run_hash)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def done_runs(specs: Sequence[RunSpec], results_dir: str | Path) -> set[str]:
    """Hashes of ``specs`` whose recorded row says ``ok``."""
    return {s.hash for s in specs if (read_row(results_dir, s.hash) or {}).get("status") == "ok"}


def stale_runs(specs: Sequence[RunSpec], results_dir: str | Path) -> list[str]:
    """Finished runs of ``specs`` recorded with another code digest than the current code's (same
    :data:`~pbip_core.experiments.identity.METHOD_VERSION`, so they are reused; ``--rerun-stale`` redoes them)."""
    now = code_digest()
    out = []
    for s in specs:
        row = read_row(results_dir, s.hash) or {}
        if row.get("status") == "ok" and row.get("code") not in (None, now):
            out.append(s.hash)
    return out


def collect(grid: Grid, specs: Sequence[RunSpec], results_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """The rows of ``grid``'s runs (plan order; runs without a row are left out) with this grid's labels (name,
    method, variant, seed, aliases); written to ``RESULTS/<grid>.csv`` atomically when ``write``."""
    rows = []
    for s in specs:
        row = read_row(results_dir, s.hash)
        if row is None:
            continue
        row.update(grid=grid.name, dataset=s.dataset, method=s.method, variant=s.variant, seed=s.seed,
                   aliases=" ".join(s.aliases))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=ID_COLUMNS)
    cols = [c for c in ID_COLUMNS if c in df.columns] + [c for c in df.columns if c not in ID_COLUMNS]
    df = df[cols]
    if write and rows:
        path = results_path(grid, results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    return df.reset_index(drop=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory lock on ``path.lock`` (two local runs build one bank once). Best effort: on a file system
    without ``flock`` (some cluster mounts) it proceeds unlocked; the bank is written atomically either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    """Cache path of the prototype bank: one per dataset identity (not its path), bank configuration and method
    version."""
    key = json.dumps({"dataset": spec.dataset_id, "bank": dataclasses.asdict(spec.cfg.bank),
                      "method_version": METHOD_VERSION}, sort_keys=True, default=str)
    return Path(results_dir) / "banks" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _provenance(run_dir: Path, stage2: bool) -> dict[str, Any]:
    """``device`` and ``weights`` columns from the stages' run records: where the run ran, and RANDOM WEIGHTS
    (naming the parts) or pretrained."""
    info = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((run_dir / "stage1" / "run_info.json").read_text())
    rand = [f"stage-1 {p}" for p in info.get("random_weights", [])]
    if stage2:
        with contextlib.suppress(OSError, ValueError, KeyError):
            rand += [f"stage-2 {p}" for p in
                     json.loads((run_dir / "stage2" / "metrics.json").read_text())["run"]["random_weights"]]
    weights = f"RANDOM WEIGHTS: {', '.join(rand)}" if rand else "pretrained"
    return {"device": info.get("device", ""), "weights": weights}


def _continue(stage_dir: Path) -> dict[str, bool]:
    """How a stage folder is taken up: resumed from its ``last.pt``; started over (``overwrite``) when it holds a
    finished stage without weights (a published run, :mod:`pbip_core.book.publish`, run again); else a new run."""
    resume = (stage_dir / "last.pt").is_file()
    return {"resume": resume, "overwrite": not resume and (stage_dir / "metrics.json").is_file()}


def pipeline_step(spec: RunSpec, run_dir: Path, results_dir: str | Path = "results") -> dict[str, Any]:
    """The real pipeline of one run; returns the flat metric columns."""
    cfg, data = spec.cfg, spec.dataset
    device = device_for(cfg)                  # the paper profile stops here on a CPU (unless train.allow_cpu)
    progress = not quiet_mode()               # progress bars, except in quiet mode (pbip book)
    bank_path = bank_path_for(spec, results_dir)
    with _locked(bank_path):  # two parallel runs on one dataset build its bank once
        if not bank_path.is_file():
            save_bank(build_bank(data, cfg.bank, cache_dir=bank_path.parent / "cache", device=device,
                                 progress=progress), bank_path)
    s1 = run_dir / "stage1"
    train(cfg, data, bank_path, s1, **_continue(s1), device=device, progress=progress)
    out: dict[str, Any] = {}
    for split in spec.splits:  # val/test: cfg.pseudo.labels and the cfg.pseudo.test_checkpoint weights
        ckpt = "last.pt" if (split != "train" and cfg.pseudo.test_checkpoint == "last") else "best.pt"
        masks = write_pseudo_masks(s1, data, split, run_dir / f"pseudo_{split}", cfg.pseudo.labels, device=device,
                                   checkpoint=ckpt, progress=progress)
        if split != "train" and cfg.pseudo.labels == "gt":   # the same masks with the classifier's own classes
            pred = write_pseudo_masks(s1, data, split, run_dir / f"pseudo_{split}_predicted", "predicted",
                                      device=device, checkpoint=ckpt, progress=progress)
            out.update(flatten_metrics("stage1_predicted", split, evaluate_dir(pred, data, split)))
        if split != "train":
            out.update(flatten_metrics("stage1", split, evaluate_dir(masks, data, split)))
    if spec.stage2:
        masks = run_dir / "pseudo_train"
        if "train" not in spec.splits:
            masks = write_pseudo_masks(s1, data, "train", masks, device=device, progress=progress)
        s2 = run_dir / "stage2"
        res = train_stage2(cfg, data, masks, s2, **_continue(s2), device=device)
        for split in ("val", "test"):
            out.update(flatten_metrics("stage2", split, res[split]))
    out.update(_provenance(run_dir, spec.stage2))
    return out


def _default_step(results_dir: str | Path) -> Step:
    return functools.partial(_pipeline_into, results_dir=results_dir)


def _pipeline_into(spec: RunSpec, run_dir: Path, results_dir: str | Path) -> dict[str, Any]:
    return pipeline_step(spec, run_dir, results_dir)


def execute(spec: RunSpec, results_dir: str | Path, step: Step | None = None, rerun: bool = False) -> dict[str, Any]:
    """Claim the run's folder, run it (:func:`_execute`) and record its row.

    A run whose folder another live process holds (a second ``pbip run`` on the same grid), or that is finished
    already (unless ``rerun``: ``--rerun-stale``), is skipped: the returned row has status ``skipped`` and nothing is
    written for it. In quiet mode (:func:`quiet_mode`) the run's printed output goes to ``runs/<hash>/run.log``.
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
        if not rerun and (read_row(results_dir, spec.hash) or {}).get("status") == "ok":
            print(f"pbip run: {spec.label} skipped: finished by another process meanwhile", flush=True)
            return {**skipped, "error": "finished by another process"}
        with output_to(run_dir / RUN_LOG if quiet_mode() else None):
            return _execute(spec, results_dir, step)


def _execute(spec: RunSpec, results_dir: str | Path, step: Step | None = None) -> dict[str, Any]:
    """Run one spec with ``step`` and record its row in ``runs/<hash>/row.json`` (status ok, or failed with the
    error). KeyboardInterrupt and SystemExit (a scheduler's requeue) propagate without a row, so the run is redone
    (resumed) next time."""
    results_dir = Path(results_dir)
    run_dir = results_dir / "runs" / spec.hash
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.cfg.save(run_dir / "config.yaml")
    step = step or _default_step(results_dir)
    t0 = time.time()
    row: dict[str, Any] = {"grid": spec.grid, "hash": spec.hash, "dataset": spec.dataset,
                           "dataset_id": spec.dataset_id, "method": spec.method, "variant": spec.variant,
                           "seed": spec.seed, "aliases": " ".join(spec.aliases)}
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
    row.update(wall_time_s=round(time.time() - t0, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               code=code_digest(), method_version=METHOD_VERSION)
    row.update(_config_columns(spec.cfg))
    row.update(metrics)
    if row["status"] == "failed" and (read_row(results_dir, spec.hash) or {}).get("status") == "ok":
        # a failed re-run (--rerun-stale, a published run trained again) keeps the finished row it meant to refresh
        print(f"pbip run: {spec.label}: the re-run failed; its earlier finished row is kept", file=sys.stderr)
        return row
    atomic_write_json(run_dir / ROW_FILE, row)
    return row


def _unique(specs_by_grid: Mapping[str, Sequence[RunSpec]]) -> list[RunSpec]:
    """Every run once, in plan order (runs shared by several grids belong to the first)."""
    seen: dict[str, RunSpec] = {}
    for specs in specs_by_grid.values():
        for s in specs:
            seen.setdefault(s.hash, s)
    return list(seen.values())


def run_grid(grid: Grid | str | Path | Mapping[str, Any], results_dir: str | Path = "results", jobs: int | None = 1,
             dry_run: bool = False, step: Step | None = None, executor: str = "local",
             slurm: SlurmOptions | None = None, rerun_stale: bool = False, wait: bool = False,
             poll_s: float = 5.0) -> pd.DataFrame:
    """Run every pending run of ``grid`` and return its rows of the results table (see :func:`run_grids`)."""
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    return run_grids([grid], results_dir, jobs, dry_run, step, executor, slurm, rerun_stale, wait, poll_s)[grid.name]


def run_grids(grids: Sequence[Grid], results_dir: str | Path = "results", jobs: int | None = None,
              dry_run: bool = False, step: Step | None = None, executor: str = "local",
              slurm: SlurmOptions | None = None, rerun_stale: bool = False, wait: bool = False,
              poll_s: float = 5.0) -> dict[str, pd.DataFrame]:
    """Run every pending run of ``grids`` (each run once, however many grids share it) and return, per grid name,
    its rows of the results table (also written to ``RESULTS/<grid>.csv``).

    ``step(spec, run_dir) -> {metric column: value}`` defaults to the real pipeline (:func:`pipeline_step`).
    ``executor``: ``local`` (``jobs`` processes, default one per visible GPU; :func:`~.executors.run_local`) or
    ``slurm`` (submitit, ``slurm`` options; :func:`~.executors.run_submitit`). ``dry_run`` prints the plan and what
    is missing and runs nothing. ``rerun_stale`` also redoes finished runs recorded with other code
    (:func:`stale_runs`). Runs another live process holds are skipped (that process writes their rows); with
    ``wait`` (local executor), this call waits for them, checking every ``poll_s`` seconds, and runs any that the
    other process did not finish. In quiet mode (:func:`quiet_mode`) the runner's lines go to
    :func:`grid_log_path` and one :func:`summary_line` per grid is printed.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if dry_run:
        frames = {}
        for g in grids:
            text, frames[g.name] = dry_run_report(g, plan(g), results_dir)
            print(text)
        return frames
    log = grid_log_path(grids, results_dir) if quiet_mode() else None
    with output_to(log):                              # plan()'s notes too
        if log is not None:
            print(f"== {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}", flush=True)
        specs_by_grid = {g.name: plan(g) for g in grids}
    unique = _unique(specs_by_grid)
    done = done_runs(unique, results_dir)
    frames: dict[str, pd.DataFrame] = {}
    try:
        with output_to(log):
            _run_pending(grids, specs_by_grid, unique, done, results_dir, jobs, step, executor, slurm, rerun_stale,
                         wait, poll_s)
    finally:
        frames = {g.name: collect(g, specs_by_grid[g.name], results_dir) for g in grids}
        if log is not None:
            for g in grids:
                print(summary_line(g, specs_by_grid[g.name], done, frames[g.name], log), flush=True)
    return frames


def _run_pending(grids: Sequence[Grid], specs_by_grid: Mapping[str, Sequence[RunSpec]], unique: Sequence[RunSpec],
                 done: set[str], results_dir: str | Path, jobs: int | None, step: Step | None, executor: str,
                 slurm: SlurmOptions | None, rerun_stale: bool, wait: bool, poll_s: float) -> None:
    """Run the runs of ``unique`` that are not ``done`` (and stale ones with ``rerun_stale``) on ``executor``."""
    stale = set(stale_runs(unique, results_dir))
    if stale:
        print(f"pbip run: note: {len(stale)} finished run(s) were computed by other code (code digest differs, method "
              f"version {METHOD_VERSION} the same): " + ", ".join(sorted(stale)[:5])
              + (" ..." if len(stale) > 5 else "")
              + ("; recomputing them (--rerun-stale)" if rerun_stale else "; reused (--rerun-stale recomputes them)"),
              flush=True)
    todo = [s for s in unique if s.hash not in done or (rerun_stale and s.hash in stale)]
    names = ", ".join(specs_by_grid)
    print(f"pbip run: {'grid' if len(grids) == 1 else f'{len(grids)} grids'} {names}: {len(unique)} runs, "
          f"{len(unique) - len(todo)} done, {len(todo)} to run -> {Path(results_dir)}", flush=True)
    work = functools.partial(execute, results_dir=results_dir, step=step, rerun=rerun_stale)
    if todo and executor == "slurm":
        run_submitit(todo, work, results_dir, slurm, jobs)
    elif todo:
        rows = run_local(todo, work, jobs)
        held = {r["hash"] for r in rows if r.get("claimed")}
        if wait and held:
            _wait_for([s for s in todo if s.hash in held], results_dir, step, poll_s)
        elif held:
            print(f"pbip run: {len(held)} run(s) skipped: held by another process (it writes their rows)",
                  flush=True)


def _wait_for(specs: list[RunSpec], results_dir: str | Path, step: Step | None, poll_s: float
              ) -> list[dict[str, Any]]:
    """Wait until no live process holds these runs, then run each one that is not ``ok`` by then."""
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


def run_only(grids: Sequence[Grid], run_hash: str, results_dir: str | Path = "results",
             step: Step | None = None) -> dict[str, Any]:
    """Run the one run of ``grids`` whose hash starts with ``run_hash``, in this process, and return its row (for
    any scheduler: one task per ``pbip run PLAN --only HASH``). Results tables are not touched (``--collect``)."""
    unique = _unique({g.name: plan(g, quiet=True) for g in grids})
    hits = [s for s in unique if s.hash.startswith(str(run_hash))]
    if len(hits) != 1:
        what = "no run" if not hits else f"{len(hits)} runs"
        raise ConfigError(f"--only {run_hash}: {what} of the plan has this hash "
                          "(`pbip run PLAN --hashes` lists the pending ones, --dry-run all)")
    spec = hits[0]
    print(f"pbip run: {spec.label} ({spec.hash})", flush=True)
    row = execute(spec, results_dir, step)
    print(f"pbip run: {spec.hash}: {row['status']} in {row['wall_time_s']} s", flush=True)
    return row


def pending_runs(grids: Sequence[Grid], results_dir: str | Path = "results") -> list[RunSpec]:
    """The runs of ``grids`` (each once) that have no ``ok`` row yet."""
    unique = _unique({g.name: plan(g, quiet=True) for g in grids})
    done = done_runs(unique, results_dir)
    return [s for s in unique if s.hash not in done]


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
    done = done_runs(specs, results_dir)
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
