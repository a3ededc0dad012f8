"""``pbip data ...``: check, list, and write the built-in datasets (``synth``; ``pbip synth`` is the same command)."""

from __future__ import annotations

import argparse

from ..data.check import format_manifest, inspect_dataset
from ..data.manifest import load_manifest
from ..data.synth import generate


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--size", type=int, default=224, help="tile side in pixels (>= 32)")
    p.add_argument("--n-train", type=int, default=1000, help="training tiles (image-level labels)")
    p.add_argument("--n-val", type=int, default=100, help="validation tiles (with masks)")
    p.add_argument("--n-test", type=int, default=200, help="test tiles (with masks)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all CPU cores); output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace a folder previously written by pbip synth")


def synth(args: argparse.Namespace) -> int:
    out = generate(args.out, seed=args.seed, size=args.size, n_train=args.n_train, n_val=args.n_val,
                   n_test=args.n_test, workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {args.n_train} train, {args.n_val} val, {args.n_test} test tiles to {out}")
    return 0


def check(args: argparse.Namespace) -> int:
    rep = inspect_dataset(args.dir, max_images=args.max_images, progress=True)
    if rep.problems:
        for line in rep.problems:
            print(line)
        n = len(rep.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found in {rep.root}")
        return 2
    print(rep.summary())
    return 0


def list_manifest(args: argparse.Namespace) -> int:
    print(format_manifest(load_manifest()))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("check", help="check a dataset folder and report every problem",
                       description="Check a dataset folder (docs/DESIGN.md format) and report every problem at once.")
    c.add_argument("dir", metavar="DIR", help="dataset folder")
    c.add_argument("--max-images", type=int, default=0,
                   help="read at most N image files per split (0 = all; names and pairs are always checked)")
    c.set_defaults(_run=check)
    sub.add_parser("list", help="list the datasets and weights of the manifest and where to get them"
                   ).set_defaults(_run=list_manifest)
    s = sub.add_parser("synth", help="write the synthetic H&E-like dataset (smoke profile and tests)")
    add_synth_arguments(s)
    s.set_defaults(_run=synth)


def main(args: argparse.Namespace) -> int:
    return args._run(args)
