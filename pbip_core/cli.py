"""The ``pbip`` command line.

Each sub-command lives next to the idea it runs: the module named in :data:`COMMANDS` provides
``add_arguments(parser)`` and ``main(args) -> int``. User errors (:class:`~pbip_core.errors.PBIPError`) are
printed as one line ``pbip <cmd>: error: <reason>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import PBIPError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pbip_core.data.synth", "write the synthetic H&E-like dataset (the embedded default)"),
    "data": ("pbip_core.data.check", "dataset tools: `pbip data check DIR`, `pbip data list`"),
    "config": ("pbip_core.config_cli", "print the resolved configuration of a profile / preset"),
    "bank": ("pbip_core.bank", "build the prototype image bank (sec. 3.2, eq. 1)"),
    "train": ("pbip_core.train", "stage 1: train ClassNet + ImgMatchNet (sec. 3.3-3.5)"),
    "pseudo": ("pbip_core.pseudo", "write pseudo masks from a stage-1 run (sec. 3.1)"),
    "stage2": ("pbip_core.stage2", "stage 2: DeepLab-v2 trained on pseudo masks"),
    "evaluate": ("pbip_core.metrics", "score prediction PNGs: mIoU, FwIoU, bIoU, Dice"),
    "run": ("pbip_core.experiments", "run a grid of experiments (resumable) into a results table"),
    "report": ("pbip_core.report", "mean +- std over seeds and t-tests from results tables"),
    "figure": ("pbip_core.viz", "write a figure (e.g. the README's synthetic-tissue grid)"),
    "book": ("pbip_core.book", "execute the book's chapters with papermill and build the HTML"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbip",
        description="PBIP: prototype-based image prompting for weakly supervised histopathology segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue  # only the chosen command's module is imported
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except PBIPError as e:
        print(f"pbip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pbip {args.command}: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
