"""``pbip book`` (plan the chapters' runs, execute the chapters with papermill, build the HTML) and ``pbip figure``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

from ..book.build import (
    CHAPTERS,
    build_html,
    chapter_order,
    run_chapters,
    stage_book,
    strip_outputs,
)
from ..book.chapter import (
    BUILTIN_DATASETS,
    Chapter,
    chapter_setup,
    ensure_dataset,
    repo_root,
)
from ..book.figures import FIGURES, save_figure
from ..book.plan import (
    GPU_TFLOPS,
    book_plan,
    missing_message,
    plan_summary,
    write_book_plan,
)
from ..book.publish import book_selection, index, publish, published_dir, restore
from ..config import PROFILES
from ..errors import PBIPError
from ..experiments.runner import pending_runs, run_grids


def book_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", choices=PROFILES,
                   help="smoke (minutes, CI), demo (the built-in dataset on a CPU), paper (GPU, real data)")
    p.add_argument("--chapters", default=None,
                   help="comma-separated chapter ids, e.g. 01,04 (their dependencies run too; default: all)")
    p.add_argument("--no-deps", action="store_true", help="run only the named chapters, not their dependencies")
    p.add_argument("--no-html", action="store_true", help="execute the chapters but do not build the HTML")
    p.add_argument("--html-only", action="store_true",
                   help="build the HTML from the chapters executed before (in _build/src), executing nothing")
    p.add_argument("--out-dir", default=None, help="where chapters write results (default results/book/PROFILE)")
    p.add_argument("--strict", action="store_true", help="jupyter-book -W: warnings fail the build")
    p.add_argument("--strip", action="store_true",
                   help="remove outputs and widget state from the committed chapter notebooks (after running them in "
                        "place, e.g. in JupyterLab) and exit; `pbip book` itself never writes them")
    p.add_argument("--book-root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    p.add_argument("--dataset", default=None,
                   help="the chapters' dataset: a folder or a built-in name (default: the profile's)")
    p.add_argument("--encoder", default=None, help="the chapters' prototype encoder (default: the profile's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run of the book (and the chapters' config), repeatable")
    p.add_argument("--device", default=None, help="where the chapters compute: cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--plan", action="store_true",
                   help="write the plan of every run the chapters read (--out) and exit; run it with `pbip run`")
    p.add_argument("--out", default="plan.yaml", help="with --plan: the plan file (default plan.yaml)")
    p.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS,
                   help=f"with --plan: effective TFLOP/s per GPU of the GPU-hour estimate (default {GPU_TFLOPS:g})")
    p.add_argument("--jobs", type=int, default=None,
                   help="smoke/demo: run the chapters' missing runs with N local processes before executing them")
    p.add_argument("--no-train", action="store_true",
                   help="chapters never train: a missing run is an error naming it (the paper profile always)")
    p.add_argument("--fresh", action="store_true",
                   help="do not copy the published runs (published/PROFILE) into the results folder first: every "
                        "run the chapters read that is not in the results folder is trained")
    p.add_argument("--publish", action="store_true",
                   help="write published/PROFILE from the finished runs of the results folder and exit")


def book_main(args: argparse.Namespace) -> int:
    root = Path(args.book_root).resolve() if args.book_root else repo_root()
    if not (root / "_config.yml").is_file():
        raise PBIPError(f"{root}: no _config.yml here; run `pbip book` from the repository")
    chapters = chapter_order(args.chapters.split(",") if args.chapters else None, with_deps=not args.no_deps)
    if args.strip:
        for ch in chapters:
            path = root / "book" / CHAPTERS[ch][0]
            nbformat.write(strip_outputs(nbformat.read(path, as_version=4)), path)
            print(f"stripped {path.relative_to(root)}")
        return 0
    t0 = time.perf_counter()
    out = Path(args.out_dir).resolve() if args.out_dir else (root / "results" / "book" / args.profile).resolve()
    if args.plan:
        return _plan(args, root, out, chapters)
    if args.publish:
        return _publish(args, root, out)
    work = stage_book(root)          # _build/src: the chapters run and the HTML is built there, never in book/
    if not args.html_only:
        ch = _setup(args, root, out)
        published = published_dir(root, args.profile)
        if not args.fresh and args.out_dir is None and (published / "runs").is_dir():
            n = restore(published, out / "experiments")
            meta = index(published)
            print(f"pbip book: {n} published run(s) copied from {published.relative_to(root)} (published "
                  f"{meta.get('published', '?')}; --fresh trains them instead)", flush=True)
        bp = book_plan(ch, chapters)
        missing = pending_runs(bp.grids, out / "experiments") if bp.grids else []
        if missing and (args.profile == "paper" or args.no_train):
            print(f"pbip book: {len(missing)} of the {len(bp.specs)} runs the chapters read are missing; nothing was "
                  "executed.\n" + missing_message(ch, bp.grids[0], missing, out / "experiments"), file=sys.stderr)
            return 2
        if missing and args.jobs:
            print(f"pbip book: running the chapters' {len(missing)} missing runs with {args.jobs} processes first",
                  flush=True)
            run_grids(bp.grids, out / "experiments", jobs=args.jobs)
        times = run_chapters(root, chapters, args.profile, out, extra_parameters=_parameters(args),
                             log_output=args.log_output, work_root=work)
        print(f"executed {len(times)} chapter(s) in {sum(times.values()):.1f} s into {work / 'book'}: "
              + ", ".join(f"{c} {t:.1f}s" for c, t in times.items()))
    if not args.no_html:
        t1 = time.perf_counter()
        html = build_html(work, path_output=root, strict=args.strict)
        print(f"built the HTML book in {time.perf_counter() - t1:.1f} s: {html / 'index.html'}")
    print(f"pbip book: done in {time.perf_counter() - t0:.1f} s")
    return 0


def _dataset_parameter(dataset: str | None) -> str | None:
    """``--dataset`` as the chapters (cwd ``book/``) read it: a built-in name as is, a folder as an absolute path."""
    if dataset is None or dataset in BUILTIN_DATASETS:
        return dataset
    return str(Path(dataset).resolve())


def _parameters(args: argparse.Namespace) -> dict:
    """The chapters' parameters beyond profile and out_dir (only those given)."""
    params = {"dataset": _dataset_parameter(args.dataset), "encoder": args.encoder, "device": args.device,
              "overrides": list(args.overrides) or None, "train": False if args.no_train else None}
    return {k: v for k, v in params.items() if v is not None}


def _setup(args: argparse.Namespace, root: Path, out: Path) -> Chapter:
    """The chapters' set-up as they will resolve it (a built-in dataset is made now: its identity is in the hashes)."""
    ch = chapter_setup(args.profile, _dataset_parameter(args.dataset), args.encoder, None, str(out),
                       overrides=list(args.overrides), device=args.device)
    if ch.builtin is not None:
        ensure_dataset(ch)
    return ch


def _plan(args: argparse.Namespace, root: Path, out: Path, chapters: list[str]) -> int:
    """``pbip book --plan``: write the plan of the chapters' runs and print its summary."""
    ch = _setup(args, root, out)
    bp = book_plan(ch, chapters)
    meta = write_book_plan(bp, ch, args.out, args.gpu_tflops)
    print(plan_summary(bp, meta))
    print(f"wrote {args.out}: run it with `pbip run {args.out}` (one GPU; --jobs N for N GPUs of a node; "
          "--executor slurm for a cluster), then `pbip book" + (f" --profile {args.profile}" if args.profile != "demo"
                                                                   else "") + "`")
    return 0


def figure_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(FIGURES), help="; ".join(f"{k}: {v[1]}" for k, v in FIGURES.items()))
    p.add_argument("--out", required=True, help="output image file (.png, .pdf, .svg)")
    p.add_argument("--data", default=None, help="dataset folder to draw tiles from (default: render in memory)")
    p.add_argument("--seed", type=int, default=0, help="random seed for tiles rendered in memory")
    p.add_argument("--dpi", type=int, default=85)


def figure_main(args: argparse.Namespace) -> int:
    fig = FIGURES[args.name][0](args)
    path = save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {path}")
    return 0


def _publish(args: argparse.Namespace, root: Path, out: Path) -> int:
    """``pbip book --publish``: the small files of the finished runs into ``published/<profile>``."""
    ch = _setup(args, root, out)
    masks = book_selection(ch)
    dest = published_dir(root, args.profile)
    idx = publish(out / "experiments", dest, masks, command=f"pbip book --publish --profile {args.profile}")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"published {len(idx['runs'])} runs into {dest.relative_to(root)} ({size / 2**20:.1f} MiB; masks of "
          f"{len(masks)} runs)")
    return 0
