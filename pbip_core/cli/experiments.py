"""``pbip run`` (a grid of runs, resumable) and ``pbip report`` (statistics and t-tests from results tables)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..config import PROFILES
from ..errors import DataError, PBIPError
from ..experiments.grid import load_grid
from ..experiments.report import DEFAULT_REPORT_METRICS, compare, parse_selector, selector_text, summary_markdown
from ..experiments.runner import run_grid


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid YAML file, or the name of a built-in grid (pbip_core/experiments/grids/)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="profile (default: the grid's own)")
    p.add_argument("--dataset", default=None, help="dataset folder for every run (replaces the grid's datasets)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs and what is missing; run nothing (exit status 2 when something is missing)")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --dry-run: exit 0 even when datasets or weights are missing (only list them)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes; GPUs assigned round-robin)")
    p.add_argument("--wait", action="store_true",
                   help="wait for runs another `pbip run` is executing (default: skip them; that process writes "
                        "their rows)")
    p.add_argument("--results", default="results", help="results folder (default: results/)")


def run_main(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, profile=args.profile, dataset=args.dataset)
    df = run_grid(grid, results_dir=args.results, jobs=args.jobs, dry_run=args.dry_run, wait=args.wait)
    if args.dry_run:
        missing = df.attrs.get("missing", [])
        if missing and not args.allow_missing:
            raise PBIPError(f"{len(missing)} requirement{'s' if len(missing) > 1 else ''} missing (listed above), "
                            f"first: {missing[0].split(' -- ')[0]}; pass --allow-missing to only list them")
        return 0
    failed = int((df["status"] != "ok").sum()) if len(df) else 0
    print(f"pbip run: {len(df)} rows, {failed} failed")
    return 1 if failed else 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results tables written by `pbip run` (results/<grid>.csv)")
    p.add_argument("--by", default="method,variant", help="columns that define a group (default: method,variant)")
    p.add_argument("--metrics", default=",".join(DEFAULT_REPORT_METRICS), help="comma-separated metric columns")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="t-test of group A against group B on every metric; a group is METHOD, METHOD:VARIANT "
                        "(e.g. pbip:pooled) or col=value[,col=value]")
    p.add_argument("--paired", action="store_true", help="paired t-test by seed instead of Welch's")


def report_main(args: argparse.Namespace) -> int:
    frames = []
    for path in args.results:
        if not Path(path).is_file():
            raise DataError(f"{path}: results table not found (run `pbip run GRID.yaml` first)")
        frames.append(pd.read_csv(path))
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
