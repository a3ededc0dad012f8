"""``pbip run`` (a grid or a plan of runs, resumable, on an executor) and ``pbip report`` (statistics and t-tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..config import PROFILES, parse_overrides
from ..errors import ConfigError, DataError, PBIPError
from ..experiments.executors import EXECUTORS, SUBMITIT_CLUSTERS, SlurmOptions
from ..experiments.grid import load_grids, plan
from ..experiments.report import (
    DEFAULT_REPORT_METRICS,
    compare,
    parse_selector,
    selector_text,
    summary_markdown,
)
from ..experiments.runner import collect, pending_runs, run_grids, run_only


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="a plan (from `pbip book --plan`), a grid YAML file, or a built-in grid's name "
                                "(pbip_core/experiments/grids/)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="profile (default: the grid's own)")
    p.add_argument("--dataset", default=None, help="dataset folder for every run (replaces the grid's datasets; the "
                                                   "same data under another path gives the same runs)")
    p.add_argument("--results", default=None,
                   help="results folder (default: the plan's `results`, else results/)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N for every run (default: auto)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs and what is missing; run nothing (exit status 2 when something is missing)")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --dry-run: exit 0 even when datasets or weights are missing (only list them)")
    p.add_argument("--wait", action="store_true",
                   help="wait for runs another `pbip run` is executing (default: skip them; that process writes "
                        "their rows)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: processes on this machine (--jobs); slurm: one job-array task per run via submitit")
    p.add_argument("--jobs", type=int, default=None,
                   help="local: runs at once (default: one per visible GPU, else 1); slurm with "
                        "--submitit-cluster local: tasks at once")
    p.add_argument("--only", default=None, metavar="HASH",
                   help="run just this run (a hash or its prefix) in this process: one task of any scheduler")
    p.add_argument("--hashes", action="store_true", help="print the pending runs' hashes, one per line, and exit")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: gather the runs' rows into RESULTS/<grid>.csv and print the counts")
    p.add_argument("--rerun-stale", action="store_true",
                   help="also redo finished runs recorded with another version of the method code")
    s = p.add_argument_group("slurm (--executor slurm, through submitit)")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--time-min", type=int, default=720, help="time limit per task in minutes (default 720); a run "
                                                             "cut off by it is requeued and resumes from last.pt")
    s.add_argument("--gpus-per-run", type=int, default=1)
    s.add_argument("--cpus-per-run", type=int, default=8)
    s.add_argument("--mem-gb", type=float, default=None)
    s.add_argument("--array-parallelism", type=int, default=64, help="tasks running at once (default 64)")
    s.add_argument("--max-requeue", type=int, default=3, help="requeues after a time-out (preemption: unlimited)")
    s.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="shell line run before each task, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch option, e.g. account=mylab or qos=high (repeatable)")
    s.add_argument("--no-wait", action="store_true", help="submit and return; collect later with --collect")
    s.add_argument("--submitit-cluster", default="slurm", choices=SUBMITIT_CLUSTERS,
                   help="submitit's executor: slurm, or local/debug to try a plan without a cluster (tests, CI)")
    s.add_argument("--submitit-folder", default=None, help="submitit's job files and logs (default RESULTS/submitit)")


def _slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(cluster=args.submitit_cluster, folder=args.submitit_folder, partition=args.partition,
                        time_min=args.time_min, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                        mem_gb=args.mem_gb, array_parallelism=args.array_parallelism, max_requeue=args.max_requeue,
                        setup=list(args.slurm_setup), extra=parse_overrides(args.slurm_opt),
                        wait=not args.no_wait)


def run_main(args: argparse.Namespace) -> int:
    grids, meta = load_grids(args.grid, profile=args.profile, dataset=args.dataset)
    results = args.results or meta.get("results") or "results"
    if args.device:
        for g in grids:                      # train.device is not part of a run's hash: same runs, this device
            g.overrides["train.device"] = args.device
    if sum(map(bool, (args.only, args.hashes, args.collect, args.dry_run))) > 1:
        raise ConfigError("--only, --hashes, --collect and --dry-run exclude each other")
    if args.only:
        row = run_only(grids, args.only, results)
        return 0 if row["status"] == "ok" else 1
    if args.hashes:
        for s in pending_runs(grids, results):
            print(s.hash)
        return 0
    if args.collect:
        n_rows = n_ok = n_runs = 0
        for g in grids:
            specs = plan(g, quiet=True)
            df = collect(g, specs, results)
            ok = int((df["status"] == "ok").sum()) if len(df) else 0
            print(f"{g.name}: {ok} of {len(specs)} runs done -> {Path(results) / (g.name + '.csv')}")
            n_rows, n_ok, n_runs = n_rows + len(df), n_ok + ok, n_runs + len(specs)
        print(f"pbip run: collected {n_ok} finished of {n_runs} runs ({n_rows - n_ok} failed)")
        return 0 if n_ok == n_runs else 1
    frames = run_grids(grids, results, jobs=args.jobs, dry_run=args.dry_run, executor=args.executor,
                       slurm=_slurm_options(args), rerun_stale=args.rerun_stale, wait=args.wait)
    if args.dry_run:
        missing = list(dict.fromkeys(m for df in frames.values() for m in df.attrs.get("missing", [])))
        if missing and not args.allow_missing:
            raise PBIPError(f"{len(missing)} requirement{'s' if len(missing) > 1 else ''} missing (listed above), "
                            f"first: {missing[0].split(' -- ')[0]}; pass --allow-missing to only list them")
        return 0
    if args.executor == "slurm" and args.no_wait:
        return 0
    n_rows = sum(len(df) for df in frames.values())
    failed = sum(int((df["status"] != "ok").sum()) for df in frames.values() if len(df))
    missing = len(pending_runs(grids, results)) - failed
    print(f"pbip run: {n_rows} rows, {failed} failed" + (f", {missing} not run yet" if missing > 0 else ""))
    return 1 if failed or missing > 0 else 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results tables written by `pbip run` (results/<grid>.csv), or a plan / "
                                              "grid YAML whose runs' rows are collected first (see --results)")
    p.add_argument("--results", dest="results_dir", default=None,
                   help="for a plan or grid: its results folder (default: the plan's `results`, else results/)")
    p.add_argument("--by", default="method,variant", help="columns that define a group (default: method,variant)")
    p.add_argument("--metrics", default=",".join(DEFAULT_REPORT_METRICS), help="comma-separated metric columns")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="t-test of group A against group B on every metric; a group is METHOD, METHOD:VARIANT "
                        "(e.g. pbip:pooled) or col=value[,col=value]")
    p.add_argument("--paired", action="store_true", help="paired t-test by seed instead of Welch's")


def _report_frames(sources: list[str], results_dir: str | None) -> list[pd.DataFrame]:
    """The tables named on the command line: CSV files as they are, plans and grids collected from their runs."""
    frames = []
    for src in sources:
        if str(src).endswith((".yaml", ".yml")) or not Path(src).suffix:
            grids, meta = load_grids(src)
            folder = results_dir or meta.get("results") or "results"
            frames += [collect(g, plan(g, quiet=True), folder) for g in grids]
            continue
        if not Path(src).is_file():
            raise DataError(f"{src}: results table not found (run `pbip run GRID.yaml` first)")
        frames.append(pd.read_csv(src))
    return [f for f in frames if len(f)]


def report_main(args: argparse.Namespace) -> int:
    frames = _report_frames(args.results, args.results_dir)
    if not frames:
        raise DataError(f"{' '.join(args.results)}: no finished runs to report (run `pbip run` first)")
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"] == "ok"] if "status" in df.columns else df
    by = [c for c in args.by.split(",") if c]
    metrics = [m for m in args.metrics.split(",") if m]
    print(summary_markdown(df, by, metrics))
    if args.compare:
        a, b = args.compare
        try:
            sel_a, sel_b = parse_selector(a), parse_selector(b)
            for m in metrics:
                if m not in df.columns:
                    continue
                r = compare(df, sel_a, sel_b, m, paired=args.paired)
                print(f"{m}: {selector_text(sel_a)} {100 * r['mean_a']:.2f} vs {selector_text(sel_b)} "
                      f"{100 * r['mean_b']:.2f} (n={r['n_a']}/{r['n_b']}), {r['test']}: t={r['t']:.3f}, p={r['p']:.4g}")
        except (KeyError, ValueError) as err:                # an unknown column or an empty group
            raise DataError(f"--compare: {err.args[0]}") from None
    return 0
