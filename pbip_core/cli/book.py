"""``pbip book`` (execute the chapters with papermill, build the HTML) and ``pbip figure`` (a named figure)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat

from ..book.build import CHAPTERS, build_html, chapter_order, run_chapters, stage_book, strip_outputs
from ..book.chapter import repo_root
from ..book.figures import FIGURES, save_figure
from ..config import PROFILES
from ..errors import PBIPError


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
    work = stage_book(root)          # _build/src: the chapters run and the HTML is built there, never in book/
    if not args.html_only:
        out = Path(args.out_dir).resolve() if args.out_dir else None
        times = run_chapters(root, chapters, args.profile, out, log_output=args.log_output, work_root=work)
        print(f"executed {len(times)} chapter(s) in {sum(times.values()):.1f} s into {work / 'book'}: "
              + ", ".join(f"{c} {t:.1f}s" for c, t in times.items()))
    if not args.no_html:
        t1 = time.perf_counter()
        html = build_html(work, path_output=root, strict=args.strict)
        print(f"built the HTML book in {time.perf_counter() - t1:.1f} s: {html / 'index.html'}")
    print(f"pbip book: done in {time.perf_counter() - t0:.1f} s")
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
