"""A tiny real pipeline for tests: synthetic data (64 px), a bank from the offline ImageNet EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

from pbip_core.config import make_config
from pbip_core.data.synth import generate
from pbip_core.engine.bank import build_bank, save_bank


def tiny_data(root: Path, seed: int = 5) -> Path:
    out = root / "synth"
    if not (out / "dataset.yaml").is_file():
        generate(out, seed=seed, size=64, n_train=48, n_val=8, n_test=8)
    return out


def tiny_bank(root: Path, data: Path) -> Path:
    path = root / "bank.pt"
    if not path.is_file():
        cfg = make_config("smoke")
        save_bank(build_bank(data, cfg.bank, cache_dir=root / "cache", progress=False), path)
    return path
