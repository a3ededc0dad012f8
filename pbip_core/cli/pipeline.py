"""The method's commands: ``config``, ``bank``, ``train``, ``pseudo``, ``stage2``, ``evaluate``, ``checkpoint``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist

from ..config import config_table, load_config
from ..engine.bank import build_bank, save_bank
from ..engine.checkpoint import convert_legacy
from ..engine.metrics import evaluate_dir, format_table
from ..engine.pseudo import write_pseudo_masks
from ..engine.runtime import device_for
from ..engine.stage1 import train
from ..engine.stage2 import train_stage2
from ..errors import DataError
from ..io import atomic_write_json, check_output_file
from .options import add_config_options, config_from, device_of


# ---------------------------------------------------------------------------------------------------- config
def config_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p, device=False)


def config_main(args: argparse.Namespace) -> int:
    print(config_table(config_from(args)))
    return 0


# ---------------------------------------------------------------------------------------------------- bank
def bank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--encoder", default=None, help="encoder name (default: the profile's bank.encoder)")
    p.add_argument("--k", type=int, default=None, help="clusters per class K (default: profile)")
    p.add_argument("--nk", type=int, default=None, help="images per cluster N_K (default: profile)")
    p.add_argument("--cache", default="cache", help="feature cache folder (default: ./cache)")
    add_config_options(p)


def bank_main(args: argparse.Namespace) -> int:
    extra = [f"{key}={val}" for key, val in (("bank.encoder", args.encoder), ("bank.k", args.k), ("bank.nk", args.nk))
             if val is not None]
    cfg = config_from(args, extra)
    if not Path(args.data).is_dir():
        raise DataError(f"{args.data}: dataset folder not found")
    check_output_file(args.out, "--out", example="bank.pt")      # before the bank is computed
    device = device_for(cfg, device_of(args, cfg))
    bank = build_bank(args.data, cfg.bank, cache_dir=args.cache, device=device)
    save_bank(bank, args.out)
    st = bank.info["stats"]
    print(f"bank: {bank.n_classes} classes x K={bank.k} prototypes of d={bank.dim} ({bank.encoder}) -> {args.out}")
    print(f"  encoder weights: {bank.info.get('encoder_source') or 'unknown'}; device {device}")
    for n, c in enumerate(bank.classes):
        sizes = [len(m) for m in bank.members[n]]
        print(f"  {c:>6}: {st['single_class'][n]} single-class, {st['dropped_white'][n]} dropped as white, "
              f"sub-bank sizes {sizes}")
    return 0


# ---------------------------------------------------------------------------------------------------- train
def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--bank", required=True, help="prototype bank (.pt from `pbip bank`, or the official pickle)")
    p.add_argument("--out", required=True, help="run folder")
    add_config_options(p, resume=True)


def train_main(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    m = train(cfg, args.data, args.bank, args.out, resume=args.resume, device=args.device, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in m.items() if k != "val"}, indent=None))
        if m.get("val"):
            print(f"best epoch {m['best_epoch']}: val pseudo-mask mIoU {m['val']['miou']:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------- pseudo
def pseudo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="stage-1 run folder (from `pbip train`)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="output folder for the PNG masks")
    p.add_argument("--labels", default=None, choices=["gt", "predicted"],
                   help="val/test: restrict the argmax to the classes present in the GT mask (the official code's "
                        "protocol; the paper is silent) or to the classifier's predicted classes "
                        "(default: the run config's pseudo.labels)")
    p.add_argument("--checkpoint", default=None,
                   help="best.pt (best validation epoch) or last.pt (default: best.pt; on val/test last.pt when the run "
                        "config's pseudo.test_checkpoint is last)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: auto)")


def pseudo_main(args: argparse.Namespace) -> int:
    out = write_pseudo_masks(args.run, args.data, args.split, args.out, args.labels, args.device, args.checkpoint)
    labels = args.labels or f"{load_config(Path(args.run) / 'config.yaml').pseudo.labels} (run config)"
    print(f"pseudo masks ({args.split}, labels={labels}) -> {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- stage 2
def stage2_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (docs/DESIGN.md format)")
    p.add_argument("--masks", required=True, help="pseudo masks of the training images (`pbip pseudo --split train`)")
    p.add_argument("--out", required=True, help="run folder for checkpoints, predictions and metrics.json")
    add_config_options(p, resume=True)


def stage2_main(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    res = train_stage2(cfg, args.data, args.masks, args.out, resume=args.resume, device=args.device,
                       overwrite=args.overwrite)
    if "val" in res:
        for split in ("val", "test"):
            m = res[split]
            print(f"stage 2 {split}: " + "  ".join(f"{k} {100 * m[k]:.2f}%" for k in ("miou", "fwiou", "biou", "dice")
                                                  if isinstance(m.get(k), (int, float))))
        print(json.dumps({"metrics": str(Path(args.out) / "metrics.json")}))
    return 0


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of prediction PNGs (class indices)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (docs/DESIGN.md format)")
    p.add_argument("--split", required=True, choices=("val", "test"))
    p.add_argument("--json", metavar="OUT", default=None, help="write the metrics as JSON here")
    p.add_argument("--ignore-extra", action="store_true",
                   help="allow files in --pred that are not predictions of the split's masks (default: an error)")


def evaluate_main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json", example="metrics.json")   # before the evaluation
    result = evaluate_dir(args.pred, args.data, args.split, progress=True, ignore_extra=args.ignore_extra)
    print(f"{result['dataset']} {args.split}: {args.pred}")
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------- checkpoint
def checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("convert", help="rewrite a checkpoint of an earlier pbip (a full pickle) in the safe format; "
                                       "this runs the file's pickle once: only for files you trust")
    c.add_argument("file", help="last.pt / best.pt of a run folder")
    c.add_argument("--out", default=None, help="write here instead of in place")


def checkpoint_main(args: argparse.Namespace) -> int:
    out, converted = convert_legacy(args.file, args.out)
    if converted:
        print(f"converted {args.file} -> {out} (tensors and plain data only)")
    else:
        print(f"{args.file}: already in the safe format (tensors and plain data only); nothing converted"
              + (f", copied to {out}" if args.out else ""))
    return 0
