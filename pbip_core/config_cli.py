"""``pbip config``: print every key of a resolved configuration."""

from __future__ import annotations

import argparse

from .config import config_table, make_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", help="smoke | demo | paper (default: demo)")
    p.add_argument("--config", default=None, help="YAML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args.profile, args.overrides, args.config)
    print(config_table(cfg))
    return 0
