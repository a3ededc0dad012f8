"""``pbip config``: print every key of a resolved configuration."""

from __future__ import annotations

import argparse

from .config import config_table, make_config


def add_config_arguments(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """The options every configurable command shares: --profile, --config, --set (and --resume)."""
    p.add_argument("--profile", default="demo", help="smoke | demo | paper (default: demo)")
    p.add_argument("--config", default=None, help="YAML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method=cam --set train.lr=1e-5 (`pbip config` lists keys)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args.profile, args.overrides, args.config)
    print(config_table(cfg))
    return 0
