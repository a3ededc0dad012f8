"""The ``pbip`` command line.

Every command is a pair ``(add_arguments(parser), main(args) -> int)`` registered in :data:`COMMANDS`; the options
that several commands share come from :mod:`pbip_core.cli.options`. User errors
(:class:`~pbip_core.errors.PBIPError`) and file-system errors a user can fix (permission denied, a file where a folder
is expected) are printed as one line ``pbip <cmd>: error: <reason>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import PBIPError

# command -> (module in pbip_core.cli, arguments function, main function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "data": ("data", "add_arguments", "main",
             "datasets: `pbip data check DIR`, `list`, `fetch NAME`, `kather-mosaic`, `synth`, `import ebhi-seg SRC`"),
    "synth": ("data", "add_synth_arguments", "synth", "write the synthetic H&E-like dataset (= `pbip data synth`)"),
    "config": ("pipeline", "config_arguments", "config_main", "print the resolved configuration of a profile / preset"),
    "bank": ("pipeline", "bank_arguments", "bank_main", "build the prototype image bank (sec. 3.2, eq. 1)"),
    "train": ("pipeline", "train_arguments", "train_main", "stage 1: train ClassNet + ImgMatchNet (sec. 3.3-3.5)"),
    "pseudo": ("pipeline", "pseudo_arguments", "pseudo_main", "write pseudo masks from a stage-1 run (sec. 3.1)"),
    "stage2": ("pipeline", "stage2_arguments", "stage2_main", "stage 2: DeepLab-v2 trained on pseudo masks"),
    "evaluate": ("pipeline", "evaluate_arguments", "evaluate_main", "score prediction PNGs: mIoU, FwIoU, bIoU, Dice"),
    "checkpoint": ("pipeline", "checkpoint_arguments", "checkpoint_main",
                   "checkpoint tools: `pbip checkpoint convert FILE` (older pbip runs)"),
    "run": ("experiments", "run_arguments", "run_main", "run a grid of experiments (resumable) into a results table"),
    "report": ("experiments", "report_arguments", "report_main", "mean +- std over seeds and t-tests from results"),
    "figure": ("book", "figure_arguments", "figure_main", "write a figure (e.g. the README's dataset grid)"),
    "book": ("book", "book_arguments", "book_main", "execute the book's chapters with papermill and build the HTML"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command's module is imported (fast ``pbip <cmd> --help``; ``""``: none)."""
    parser = argparse.ArgumentParser(
        prog="pbip",
        description="PBIP: prototype-based image prompting for weakly supervised histopathology segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"pbip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, args_fn, main_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"{__name__}.{module_name}")   # command modules import torch: load on use
        getattr(module, args_fn)(p)
        p.set_defaults(_main=getattr(module, main_fn))
    return parser


# Modules of the optional extras (pyproject.toml) -> the extra that installs them.
EXTRA_OF_MODULE = {m: "book" for m in ("papermill", "nbformat", "nbclient", "jupyter_client", "ipywidgets", "IPython",
                                       "ipykernel", "sphinx", "jupyter_book", "seaborn")}


def os_error_line(e: OSError) -> str:
    """``PATH: Permission denied`` for a file-system error a user can fix (permissions, a file where a folder is
    expected, ...)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {e.strerror or e}" if where else f"{type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        # no command (`pbip --version`, `pbip --help`): list the commands without importing any of them
        args = build_parser(only=chosen or "").parse_args(argv)
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"pbip {chosen}: error: needs the optional package {e.name!r}: pip install 'pbip-core[{extra}]' "
              f"(or `make setup` in the repository)", file=sys.stderr)
        return 2
    try:
        return int(args._main(args) or 0)
    except PBIPError as e:
        print(f"pbip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        print(f"pbip {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pbip {args.command}: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
