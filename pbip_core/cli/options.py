"""The options every command shares, so they read the same everywhere: ``--profile`` (validated), ``--config``,
``--set key=value``, ``--device`` and ``--resume`` / ``--overwrite``."""

from __future__ import annotations

import argparse

from ..config import PROFILES, Config, make_config


def add_config_options(p: argparse.ArgumentParser, resume: bool = False, device: bool = True) -> None:
    """--profile, --config, --set (and --resume / --overwrite, --device) on a command that resolves a configuration."""
    p.add_argument("--profile", default="demo", choices=PROFILES,
                   help="smoke (minutes, CI) | demo (the built-in dataset on a CPU) | paper (sec. 4.1, GPU, real data)")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of config keys (applied after --profile)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method=cam --set train.lr=1e-5 (`pbip config` lists keys)")
    if device:
        p.add_argument("--device", default=None,
                       help="cpu | cuda | cuda:N | auto (default: the config's train.device, i.e. auto)")
    if resume:
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
        again.add_argument("--overwrite", action="store_true",
                           help="delete the run already in OUT (finished or partial) and start over")


def config_from(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    """The configuration of a command's ``--profile/--config/--set`` options (``extra`` overrides appended)."""
    return make_config(args.profile, [*args.overrides, *(extra or [])], args.config)


def device_of(args: argparse.Namespace, cfg: Config) -> str:
    """``--device`` when given, else the config's ``train.device``."""
    return getattr(args, "device", None) or cfg.train.device
