"""``pbip data ...``: check and list datasets, write the built-in ones (``kather-mosaic``, ``synth``; ``pbip synth`` is
the same command as ``pbip data synth``), download released ones (``fetch NAME``) and import them
(``import ebhi-seg``)."""

from __future__ import annotations

import argparse

from ..data.check import format_manifest, inspect_dataset
from ..data.ebhi_seg import import_ebhi_seg
from ..data.fetch import FetchUnavailable, fetch_dataset
from ..data.kather_mosaic import generate_kather_mosaic, slide_split
from ..data.manifest import load_manifest
from ..data.synth import generate

IMPORTERS = {"ebhi-seg": import_ebhi_seg}


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


def kather_mosaic(args: argparse.Namespace) -> int:
    out = generate_kather_mosaic(args.out, seed=args.seed, size=args.size, n_train=args.n_train, n_val=args.n_val,
                                 n_test=args.n_test, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.n_train} train, {args.n_val} val, {args.n_test} test images to {out} (slides: "
          + "; ".join(f"{k} {', '.join(s.removeprefix('CRC-Prim-HE-') for s in v)}" for k, v in slide_split().items())
          + ")")
    return 0


def import_dataset(args: argparse.Namespace) -> int:
    out = IMPORTERS[args.format](args.src, args.out, seed=args.seed, overwrite=args.overwrite, progress=True)
    print(f"imported {args.format} from {args.src} -> {out} (check it with `pbip data check {out}`)")
    return 0


def check(args: argparse.Namespace) -> int:
    rep = inspect_dataset(args.dir, max_images=args.max_images, progress=True)
    for line in rep.warnings:
        print(f"warning: {line}")
    if args.strict:
        rep.problems.extend(rep.warnings)
    if rep.problems:
        for line in rep.problems:
            print(line)
        n = len(rep.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found in {rep.root}")
        return 2
    print(rep.summary())
    return 0


def fetch(args: argparse.Namespace) -> int:
    try:
        res = fetch_dataset(args.name, out=args.out, cache=args.cache, overwrite=args.overwrite, progress=True)
    except FetchUnavailable as e:
        print(f"{args.name} cannot be downloaded here. To get it by hand:")
        for line in e.steps:
            print(f"  {line}")
        raise
    for path, sha in res.files.items():
        print(f"{path}: sha256 {sha}")
    for note in res.notes:
        print(note)
    print(f"fetched {args.name} -> {res.out}")
    return 0


def list_manifest(args: argparse.Namespace) -> int:
    print(format_manifest(load_manifest()))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("check", help="check a dataset folder and report every problem",
                       description="Check a dataset folder (docs/DESIGN.md format) and report every problem at once. "
                       "A known dataset (manifest) is also compared with the manifest: other classes are a "
                       "problem, other split sizes a warning.")
    c.add_argument("dir", metavar="DIR", help="dataset folder")
    c.add_argument("--max-images", type=int, default=0,
                   help="read at most N image files per split (0 = all; names and pairs are always checked)")
    c.add_argument("--strict", action="store_true",
                   help="treat differences from the manifest's split sizes (warnings) as problems (exit 2)")
    c.set_defaults(_run=check)
    sub.add_parser("list", help="list the datasets and weights of the manifest and where to get them"
                   ).set_defaults(_run=list_manifest)
    f = sub.add_parser("fetch", help="download a manifest dataset (checksums verified), unpack and convert it",
                       description="Download a dataset of the manifest with pooch, verify its checksum, unpack it "
                       "and convert it into the dataset-folder format. Without a download URL or without network it "
                       "prints what to download by hand and where to put it, and exits 2.")
    f.add_argument("name", help="dataset name from `pbip data list` (e.g. ebhi-seg, kather2016, bcss-wsss)")
    f.add_argument("--out", default=None, help="output folder (default: the manifest's local_dir, e.g. data/NAME)")
    f.add_argument("--cache", default=None, help="where downloads are kept and looked for (default data/downloads)")
    f.add_argument("--overwrite", action="store_true", help="replace a folder previously written by this command")
    f.set_defaults(_run=fetch)
    k = sub.add_parser("kather-mosaic", help="write the real-tissue built-in dataset (Kather 2016 tiles, split by slide)")
    k.add_argument("--out", required=True, help="output dataset folder")
    k.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    k.add_argument("--size", type=int, default=150, help="image side in pixels (150 = the tiles' native size)")
    k.add_argument("--n-train", type=int, default=600, help="training images (image-level labels)")
    k.add_argument("--n-val", type=int, default=60, help="validation images (with masks)")
    k.add_argument("--n-test", type=int, default=100, help="test images (with masks)")
    k.add_argument("--overwrite", action="store_true", help="replace a folder previously written by this command")
    k.set_defaults(_run=kather_mosaic)
    s = sub.add_parser("synth", help="write the synthetic H&E-like dataset (tests, and a stand-in without real tissue)")
    add_synth_arguments(s)
    s.set_defaults(_run=synth)
    i = sub.add_parser("import", help="convert a released dataset into the dataset-folder format",
                       description="Convert a released dataset (as downloaded) into the dataset-folder format.")
    i.add_argument("format", choices=sorted(IMPORTERS), help="ebhi-seg: EBHI-SEG/<class>/{image,label}/*.png")
    i.add_argument("src", help="the release folder (the one holding EBHI-SEG/, or EBHI-SEG itself)")
    i.add_argument("--out", required=True, help="output dataset folder")
    i.add_argument("--seed", type=int, default=0, help="seed of the stratified train/val/test split")
    i.add_argument("--overwrite", action="store_true", help="replace a folder previously written by this command")
    i.set_defaults(_run=import_dataset)


def main(args: argparse.Namespace) -> int:
    return args._run(args)
