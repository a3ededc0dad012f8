"""Shared test fixtures.

``make_dataset(tmp_path, ...)`` writes a tiny valid dataset folder (docs/DESIGN.md format) and returns its path;
import it in a test module with ``from conftest import make_dataset`` or use the ``tiny_dataset`` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import yaml
from PIL import Image

# Distinct tissue-ish colours per class (the images are not meant to look real, only to differ per class).
_COLOURS = np.array([(200, 60, 90), (230, 150, 200), (70, 40, 160), (150, 30, 60), (120, 200, 120),
                     (200, 180, 60), (60, 160, 200), (90, 90, 90)], dtype=np.float64)


def _label_name(stem: str, label: Sequence[int], style: str) -> str:
    if style == "spaced":   # LUAD-HistoSeg: name-[1 0 0 1].png
        return f"{stem}-[{' '.join(str(int(v)) for v in label)}].png"
    if style == "compact":  # BCSS-WSSS: name+0[1001].png
        return f"{stem}+0[{''.join(str(int(v)) for v in label)}].png"
    raise ValueError(style)


def _blocky_mask(rng: np.random.Generator, size: int, classes: Sequence[int], background_index: int | None,
                 block: int = 8) -> np.ndarray:
    """(size, size) uint8: random classes (and some background) on a block grid."""
    nb = -(-size // block)
    choices = list(classes) + ([background_index] if background_index is not None else [])
    grid = rng.choice(np.array(choices), size=(nb, nb))
    return np.kron(grid, np.ones((block, block), dtype=np.int64))[:size, :size].astype(np.uint8)


def _render(rng: np.random.Generator, mask: np.ndarray, n_classes: int) -> np.ndarray:
    """RGB image (H, W, 3) uint8 coloured by class (background white) plus noise."""
    colours = np.vstack([_COLOURS[np.arange(n_classes) % len(_COLOURS)], np.full((256 - n_classes, 3), 245.0)])
    img = colours[mask] + rng.normal(0, 12, size=mask.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(
    tmp_path: Path,
    n_train: int = 8,
    n_val: int = 3,
    n_test: int = 3,
    size: int = 32,
    n_classes: int = 4,
    name: str = "toy",
    write_yaml: bool = True,
    label_style: str = "spaced",
    classes: Sequence[str] | None = None,
    background_index: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``tmp_path/<name>/`` with train/, val/{img,mask}/, test/{img,mask}/ and (optionally) dataset.yaml.

    Training labels cycle so that every class appears, some images are single-class and some multi-class;
    each training image shows exactly the classes of its label. Masks are P-mode PNGs with random blocks of the
    classes and of background (``background_index``, default ``n_classes``).
    """
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / name
    bg = n_classes if background_index is None else background_index
    classes = list(classes) if classes is not None else [f"C{i}" for i in range(n_classes)]
    assert len(classes) == n_classes
    (root / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        label = np.zeros(n_classes, dtype=np.int64)
        label[i % n_classes] = 1
        if i % 3 == 2:  # every third image is multi-class
            label[(i + 1) % n_classes] = 1
        present = np.flatnonzero(label).tolist()
        mask = _blocky_mask(rng, size, present, None)
        Image.fromarray(_render(rng, mask, n_classes)).save(root / "train" / _label_name(f"img{i:03d}", label, label_style))
    for split, n in (("val", n_val), ("test", n_test)):
        (root / split / "img").mkdir(parents=True, exist_ok=True)
        (root / split / "mask").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = _blocky_mask(rng, size, list(range(n_classes)), bg)
            fname = f"{split}{i:03d}.png"
            Image.fromarray(_render(rng, mask, n_classes)).save(root / split / "img" / fname)
            m = Image.fromarray(mask, mode="P")
            m.putpalette([v for c in range(256) for v in (_COLOURS[c % len(_COLOURS)].astype(int).tolist())])
            m.save(root / split / "mask" / fname)
    if write_yaml:
        palette = [list(map(int, _COLOURS[c % len(_COLOURS)])) for c in range(n_classes)] + [[255, 255, 255]]
        (root / "dataset.yaml").write_text(yaml.safe_dump(
            {"name": name, "classes": classes, "background_index": bg, "palette": palette}, sort_keys=False))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A valid 4-class dataset folder: 8 train (32x32), 3 val, 3 test."""
    return make_dataset(tmp_path)


@pytest.fixture(scope="module")
def isolated_pbip_cache(tmp_path_factory):
    """Converted weights go to a fresh PBIP_CACHE for the module: the conversion itself is under test."""
    import os

    old = os.environ.get("PBIP_CACHE")
    os.environ["PBIP_CACHE"] = str(tmp_path_factory.mktemp("pbip_cache"))
    yield
    if old is None:
        os.environ.pop("PBIP_CACHE", None)
    else:
        os.environ["PBIP_CACHE"] = old
