"""Declarative, resumable grids of experiments: dataset x method x variant x seed -> one tidy results table.

A grid is a small YAML file (see ``pbip_core/grids/``)::

    name: table1-demo
    profile: demo
    datasets: [data/synth]
    methods: [pbip, cam]
    variants: {default: {}}          # name -> dict of --set overrides, e.g. {no_bgs: {loss.bgs: false}}
    seeds: [0, 1, 2]
    stage2: true                     # stage 2 (DeepLab-v2) on the train-split pseudo masks
    splits: [val, test]              # pseudo-mask splits scored after stage 1
    overrides: {}                    # optional: --set overrides applied to every run

Each run resolves ``make_config(profile, {"method": m, **variant, "train.seed": s, "data.root": dataset})`` and is
named by a content hash (config hash + dataset path + the grid's stage flags). The pipeline is: prototype bank
(cached per dataset and bank config; ``bank.seed`` stays fixed unless a variant sets it, so seeds vary the
training only) -> stage-1 training -> pseudo masks of ``splits`` -> scores -> optionally train pseudo masks ->
stage 2 -> scores. Every finished (or failed) run becomes one row of ``RESULTS/<name>.csv``: grid, hash, dataset,
method, variant, seed, status, wall time, every flat config key (dotted), and every metric as
``<stage>.<split>.<metric>`` (per-class IoU as ``<stage>.<split>.iou.<class>``). Rows are written atomically under
a file lock. Rerunning a grid skips runs whose hash already has status ``ok`` and resumes half-finished run
folders (``RESULTS/runs/<hash>/``) from their checkpoints.

Command line: ``pbip run GRID.yaml [--dry-run] [--jobs N] [--results DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import yaml

from .config import Config, load_yaml, make_config
from .errors import ConfigError, PBIPError
from .io import atomic_path

GRIDS_DIR = Path(__file__).with_name("grids")
ID_COLUMNS = ["grid", "hash", "dataset", "method", "variant", "seed", "aliases", "status", "wall_time_s", "finished", "error"]
Step = Callable[["RunSpec", Path], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------------- grid
@dataclass
class Grid:
    name: str
    profile: str = "demo"
    datasets: list[str] = field(default_factory=lambda: ["data/synth"])
    methods: list[str] = field(default_factory=lambda: ["pbip"])
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    seeds: list[int] = field(default_factory=lambda: [0])
    stage2: bool = False
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    overrides: dict[str, Any] = field(default_factory=dict)
    config: str | None = None          # optional YAML of config keys applied before the method preset
    source: str | None = None          # file the grid was read from


@dataclass
class RunSpec:
    grid: str
    dataset: str
    method: str
    variant: str
    seed: int
    overrides: dict[str, Any]
    cfg: Config
    hash: str
    stage2: bool
    splits: list[str]
    aliases: list[str] = field(default_factory=list)   # other method/variant labels with the identical config

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.method}/{self.variant} seed={self.seed}"


def load_grid(path_or_dict: str | Path | Mapping[str, Any]) -> Grid:
    """Read a grid from a YAML file, a grid name in ``pbip_core/grids/`` or a dict."""
    source = None
    if isinstance(path_or_dict, Mapping):
        data = dict(path_or_dict)
    else:
        p = Path(path_or_dict)
        if not p.is_file() and (GRIDS_DIR / f"{p.name}.yaml").is_file():
            p = GRIDS_DIR / f"{p.name}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(q.stem for q in GRIDS_DIR.glob("*.yaml")))
            raise ConfigError(f"{p}: grid file not found (built-in grids: {known})")
        data = load_yaml(p, "a grid is a mapping with keys name, profile, datasets, methods, ...", "grid file")
        data.setdefault("name", p.stem)
        source = str(p)
    known_keys = {f.name for f in dataclasses.fields(Grid)} - {"source"}
    unknown = set(data) - known_keys
    where = source or "grid"
    if unknown:
        raise ConfigError(f"{where}: unknown grid keys {sorted(unknown)}; allowed: {sorted(known_keys)}")
    if "name" not in data:
        raise ConfigError(f"{where}: the grid needs a name")
    for key in ("datasets", "methods", "seeds", "splits"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    variants = data.get("variants", {"default": {}})
    if isinstance(variants, list):  # [a, b] -> {a: {}, b: {}}
        variants = {str(v): {} for v in variants}
    if not isinstance(variants, Mapping) or not all(isinstance(v, Mapping) or v is None for v in variants.values()):
        raise ConfigError(f"{where}: variants must map a name to a dict of config overrides")
    data["variants"] = {str(k): dict(v or {}) for k, v in variants.items()}
    data["seeds"] = [int(s) for s in data.get("seeds", [0])]
    grid = Grid(**data, source=source)
    for split in grid.splits:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"{where}: split {split!r} must be train, val or test")
    return grid


def run_hash(cfg: Config, dataset: str, stage2: bool, splits: Sequence[str]) -> str:
    """Content hash of a run: the config hash, the dataset path as written in the grid and the stage flags."""
    blob = json.dumps({"config": cfg.hash(), "dataset": Path(dataset).as_posix(), "stage2": bool(stage2),
                       "splits": sorted(splits)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan(grid: Grid, quiet: bool = False) -> list[RunSpec]:
    """Every run of the grid, in dataset -> method -> variant -> seed order.

    Two grid cells that resolve to the same configuration (e.g. method ``cam``, which already switches the
    similarity losses off, with a variant ``{loss.bgs: false}``) are one run: the later one is recorded in the
    first one's ``aliases`` (and the table's ``aliases`` column) instead of being run twice.
    """
    specs: list[RunSpec] = []
    by_hash: dict[str, RunSpec] = {}
    for dataset, method, (vname, variant), seed in itertools.product(
            grid.datasets, grid.methods, grid.variants.items(), grid.seeds):
        overrides = {**grid.overrides, "method": method, **variant, "train.seed": int(seed), "data.root": dataset}
        if "stage2.seed" not in variant and "stage2.seed" not in grid.overrides:
            overrides["stage2.seed"] = int(seed)
        cfg = make_config(grid.profile, overrides, grid.config)
        h = run_hash(cfg, dataset, grid.stage2, grid.splits)
        if h in by_hash:
            first = by_hash[h]
            first.aliases.append(f"{method}/{vname}")
            if not quiet:
                # information, not a problem: stdout, so notebooks show no stderr block for it
                print(f"pbip run: note: {method}/{vname} seed={seed} on {dataset} has the same configuration as "
                      f"{first.method}/{first.variant} ({h}); it is run once")
            continue
        spec = RunSpec(grid=grid.name, dataset=dataset, method=method, variant=vname, seed=int(seed),
                       overrides=overrides, cfg=cfg, hash=h, stage2=grid.stage2, splits=list(grid.splits))
        by_hash[h] = spec
        specs.append(spec)
    return specs


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
    """Add (or replace, by hash) one row of the table: read, update, write a temp file, rename; under a lock."""
    path = Path(path)
    with _locked(path):
        df = load_results(path)
        if len(df) and "hash" in df.columns:
            df = df[df["hash"].astype(str) != str(row["hash"])]
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
    from . import bank as bank_mod
    from . import pseudo, train
    from .metrics import evaluate_dir

    cfg, data = spec.cfg, spec.dataset
    bank_path = bank_path_for(spec, results_dir)
    with _locked(bank_path):  # two parallel runs on one dataset build its bank once
        if not bank_path.is_file():
            bank_mod.build_bank(data, cfg.bank, cache_dir=bank_path.parent / "cache").save(bank_path)
    s1 = run_dir / "stage1"
    train.train(cfg, data, bank_path, s1, resume=(s1 / "last.pt").is_file())
    out: dict[str, Any] = {}
    for split in spec.splits:
        masks = pseudo.write_pseudo_masks(s1, data, split, run_dir / f"pseudo_{split}")
        if split != "train":
            out.update(flatten_metrics("stage1", split, evaluate_dir(masks, data, split)))
    if spec.stage2:
        from .stage2 import train_stage2

        masks = run_dir / "pseudo_train"
        if "train" not in spec.splits:
            masks = pseudo.write_pseudo_masks(s1, data, "train", masks)
        s2 = run_dir / "stage2"
        res = train_stage2(cfg, data, masks, s2, resume=(s2 / "last.pt").is_file())
        for split in ("val", "test"):
            out.update(flatten_metrics("stage2", split, res[split]))
    return out


def _default_step(results_dir: str | Path) -> Step:
    return lambda spec, run_dir: pipeline_step(spec, run_dir, results_dir)


def execute(spec: RunSpec, results_dir: str | Path, step: Step | None = None) -> dict[str, Any]:
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
    import torch

    torch.set_num_threads(max(1, threads))


def run_grid(grid: Grid | str | Path | Mapping[str, Any], results_dir: str | Path = "results", jobs: int = 1,
             dry_run: bool = False, step: Step | None = None) -> pd.DataFrame:
    """Run every pending run of ``grid`` and return its rows of the results table.

    ``step(spec, run_dir) -> {metric column: value}`` defaults to the real pipeline (:func:`pipeline_step`).
    ``jobs > 1`` runs that many processes (spawn); each uses ``cores // jobs`` torch threads and, on a machine
    with GPUs, one GPU chosen round-robin. ``dry_run`` prints the plan and what is missing and runs nothing.
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
        for i, spec in enumerate(todo, 1):
            print(f"pbip run: [{i}/{len(todo)}] {spec.label} ({spec.hash})", flush=True)
            row = execute(spec, results_dir, step)
            print(f"pbip run: [{i}/{len(todo)}] {row['status']} in {row['wall_time_s']} s", flush=True)
    else:
        _run_parallel(todo, results_dir, jobs, step)
    df = load_results(table)
    hashes = [s.hash for s in specs]
    if df.empty:
        return df
    df = df[df["hash"].astype(str).isin(hashes)]
    order = {h: i for i, h in enumerate(hashes)}
    return df.sort_values("hash", key=lambda s: s.astype(str).map(order)).reset_index(drop=True)


def _run_parallel(todo: list[RunSpec], results_dir: str | Path, jobs: int, step: Step | None) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    try:
        import torch

        n_gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n_gpus = 0
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, n_gpus, threads)) as pool:
        futures = {pool.submit(execute, spec, results_dir, step): spec for spec in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            spec = futures[fut]
            row = fut.result()
            print(f"pbip run: [{n}/{len(todo)}] {spec.label}: {row['status']} in {row['wall_time_s']} s", flush=True)


# ---------------------------------------------------------------------------------------------------- dry run
def _manifest_hint(dataset: str) -> str:
    """What ``data_manifest.yaml`` says about obtaining ``dataset`` (empty string if nothing is known)."""
    name = Path(dataset).name.lower()
    entry = None
    try:  # the data package's own reader, if it has one
        from .data import manifest as manifest_mod  # type: ignore[attr-defined]

        for fn in ("dataset_entry", "get_dataset", "find_dataset"):
            if hasattr(manifest_mod, fn):
                with contextlib.suppress(Exception):
                    entry = getattr(manifest_mod, fn)(name)
                if entry:
                    break
    except Exception:  # noqa: BLE001
        entry = None
    if not entry:
        for cand in (Path.cwd() / "data_manifest.yaml", Path(__file__).resolve().parents[1] / "data_manifest.yaml"):
            if cand.is_file():
                with contextlib.suppress(Exception):
                    entry = _find_entry(yaml.safe_load(cand.read_text()), name)
                break
    if not entry:
        return ""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, Mapping):
        entry = vars(entry) if hasattr(entry, "__dict__") else {}
    parts = []
    for k in ("instructions", "source", "url", "licence", "license", "local_dir", "layout"):
        if entry.get(k):
            v = entry[k]
            v = " ".join(str(v).split()) if not isinstance(v, (list, dict)) else json.dumps(v)
            parts.append(f"{k}: {v}")
    return "; ".join(parts)


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def _find_entry(manifest: Any, name: str) -> Any:
    if not isinstance(manifest, Mapping):
        return None
    pools = [manifest.get("datasets", manifest)]
    for pool in pools:
        if isinstance(pool, Mapping):
            for k, v in pool.items():
                if _norm(str(k)) == _norm(name) or (isinstance(v, Mapping) and _norm(str(v.get("name", ""))) == _norm(name)):
                    return v
        elif isinstance(pool, list):
            for v in pool:
                if isinstance(v, Mapping) and any(_norm(str(v.get(f, ""))) == _norm(name) for f in ("name", "id", "slug")):
                    return v
    return None


def _available(module: str, fn: str) -> dict[str, str | None] | None:
    """``pbip_core.<module>.<fn>()`` as name -> None (available) or the reason it is not; None if the module or
    function does not exist. Accepts a dict name -> "available" / reason / bool, or an iterable of names."""
    try:
        mod = __import__(f"pbip_core.{module}", fromlist=[fn])
        res = getattr(mod, fn)()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(res, Mapping):
        out: dict[str, str | None] = {}
        for k, v in res.items():
            if v is True or (isinstance(v, str) and v.strip().lower() in ("available", "ok", "yes")):
                out[str(k)] = None
            else:
                out[str(k)] = str(v) if isinstance(v, str) and v else "not available"
        return out
    return {str(x): None for x in res}


def _missing_line(kind: str, name: str, status: dict[str, str | None], where: str) -> str | None:
    if name not in status:
        return f"{kind} {name}: not known to {where}"
    if status[name] is not None:
        return f"{kind} {name}: weights not available offline -- {status[name]}"
    return None


def missing_requirements(specs: Sequence[RunSpec]) -> list[str]:
    """Human-readable lines: datasets not on disk (with the manifest's instructions), weights not available."""
    lines = []
    for ds in dict.fromkeys(s.dataset for s in specs):
        if not Path(ds).is_dir():
            hint = _manifest_hint(ds)
            lines.append(f"dataset {ds}: folder not found" + (f" -- {hint}" if hint else
                                                                " (see data_manifest.yaml / `pbip data list`)"))
    encoders = _available("encoders", "available_encoders")
    if encoders is not None:
        for enc in dict.fromkeys(s.cfg.bank.encoder for s in specs):
            line = _missing_line("encoder", enc, encoders, "pbip_core.encoders.available_encoders()")
            if line:
                lines.append(line)
    backbones = _available("backbones", "available_backbones")
    if backbones is not None:
        needed = {}
        for s in specs:
            if s.cfg.model.pretrained:
                needed[s.cfg.model.backbone] = "stage-1 backbone"
            if s.stage2 and s.cfg.stage2.pretrained:
                needed.setdefault(s.cfg.stage2.backbone, "stage-2 backbone")
        for bb, role in needed.items():
            line = _missing_line(role, bb, backbones, "pbip_core.backbones.available_backbones()")
            if line:
                lines.append(line)
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


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid YAML file, or the name of a built-in grid in pbip_core/grids/")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what is missing; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes; GPUs assigned round-robin)")
    p.add_argument("--results", default="results", help="results folder (default: results/)")


def main(args: argparse.Namespace) -> int:
    df = run_grid(args.grid, results_dir=args.results, jobs=args.jobs, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    failed = int((df["status"] != "ok").sum()) if len(df) else 0
    print(f"pbip run: {len(df)} rows, {failed} failed")
    return 1 if failed else 0
