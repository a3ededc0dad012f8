"""What a chapter sees: its parameters cell resolved into paths and a configuration, and small batch helpers.

Chapters call :func:`chapter_setup` right after their parameters cell (``profile``, ``dataset``, ``encoder``,
``seeds``, ``out_dir``, ``overrides``, ``device``, ``train``) and :func:`ensure_dataset` to make the built-in dataset
when none is given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import make_config, parse_overrides
from ..data import SegDataset
from ..data.kather_mosaic import generate_kather_mosaic
from ..data.manifest import dataset_entry
from ..data.synth import generate as synth_generate
from ..engine.runtime import device_for, resolve_device
from ..errors import ConfigError, DataError
from ..method.pseudo import gt_present

#: The built-in datasets a chapter can make itself: name -> (generator, size per profile). ``kather-mosaic`` (real
#: H&E tiles, :mod:`pbip_core.data.kather_mosaic`) is the default of the CPU profiles; ``synth`` (rendered H&E-like
#: tiles, :mod:`pbip_core.data.synth`) stays selectable with ``dataset="synth"``.
BUILTIN_DATASETS: dict[str, tuple[Callable[..., Path], dict[str, dict[str, int]]]] = {
    "kather-mosaic": (generate_kather_mosaic, {
        "smoke": {"n_train": 48, "n_val": 8, "n_test": 8},
        "demo": {"n_train": 600, "n_val": 60, "n_test": 100},
        "paper": {"n_train": 600, "n_val": 60, "n_test": 100},
    }),
    "synth": (functools.partial(synth_generate, workers=0), {
        "smoke": {"size": 64, "n_train": 48, "n_val": 8, "n_test": 8},
        "demo": {"size": 128, "n_train": 600, "n_val": 60, "n_test": 100},
        "paper": {"size": 224, "n_train": 1000, "n_val": 100, "n_test": 200},
    }),
}
#: The dataset a chapter uses when its ``dataset`` parameter is None.
DEFAULT_DATASET = {"smoke": "kather-mosaic", "demo": "kather-mosaic", "paper": "bcss-wsss"}
#: Seeds per profile (mean +- std over seeds in the result tables).
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0,), "demo": (0,), "paper": (0, 1, 2)}
#: Profiles whose chapters may train a missing run in the notebook kernel. The paper profile's runs come from a plan
#: (`pbip book --plan`, `pbip run`); its chapters only read results and say which runs are missing.
TRAIN_IN_KERNEL: tuple[str, ...] = ("smoke", "demo")


@dataclass
class Chapter:
    """A chapter's resolved parameters (absolute paths). ``builtin`` names the built-in dataset it uses, if any."""

    profile: str
    cfg: Any  # pbip_core.config.Config
    dataset: Path
    encoder: str
    seeds: tuple[int, ...]
    out_dir: Path
    builtin: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)   # config overrides applied to every run of the chapter
    device: str = "cpu"                # where the chapter's own computations run (resolved from ``device``/auto)
    train: bool = True                 # may the chapter train a missing run in the kernel?

    @property
    def compute_device(self) -> str:
        """:attr:`device` for a heavy computation (encoding a whole training set): the paper profile refuses a CPU
        unless ``train.allow_cpu`` (:func:`~pbip_core.engine.runtime.device_for`)."""
        return device_for(self.cfg, self.device)

    @property
    def synthetic(self) -> bool:
        """True when the chapter runs on the rendered (not real) tissue of ``pbip data synth``."""
        return self.builtin == "synth"

    def summary(self) -> str:
        """One line with the resolved parameters; paths relative to the repository root (:func:`repo_root`), so a
        built page shows no machine path."""
        return (f"profile={self.profile} dataset={shown_path(self.dataset)} encoder={self.encoder} "
                f"seeds={list(self.seeds)} out_dir={shown_path(self.out_dir)} device={self.device}"
                + (f" overrides={self.overrides}" if self.overrides else ""))


def shown_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as a reader should see it: relative to ``root`` (default :func:`repo_root`), never absolute
    (``results/book/demo``; ``../results`` for a results folder beside the repository)."""
    base = Path(root) if root is not None else repo_root()
    return os.path.relpath(Path(path).resolve(), base.resolve())


def chapter_setup(profile: str = "demo", dataset: str | None = None, encoder: str | None = None,
                  seeds: Sequence[int] | None = None, out_dir: str | None = None,
                  overrides: Sequence[str] | dict[str, Any] | None = None, device: str | None = None,
                  train: bool | None = None) -> Chapter:
    """Resolve a chapter's parameters cell.

    ``None`` means "the profile's default": ``out_dir`` -> ``results/book/<profile>`` in the repository
    (:func:`repo_root`); ``dataset`` -> :data:`DEFAULT_DATASET` (``kather-mosaic``, made
    in ``<out_dir>/kather-mosaic`` by :func:`ensure_dataset`, for smoke and demo; the manifest's BCSS-WSSS folder for
    paper). A built-in name (``kather-mosaic``, ``synth``) selects that dataset, anything else is a folder.
    ``encoder`` -> the profile's ``bank.encoder``; ``seeds`` -> :data:`DEFAULT_SEEDS`. ``overrides`` (``key=value``
    strings or a mapping) apply to the chapter's config and to every run it reads. ``device`` -> ``train.device``
    (auto: the GPU when there is one). ``train`` -> whether a missing run may be trained in the kernel: None = yes for
    :data:`TRAIN_IN_KERNEL` (smoke, demo); the paper profile never trains in a kernel.
    """
    ov = parse_overrides(overrides or {})
    cfg = make_config(profile, overrides=ov)
    if train and profile not in TRAIN_IN_KERNEL:
        raise ConfigError(f"train=True: profile {profile} does not train in a notebook kernel; make its runs with "
                          f"`pbip book --plan --profile {profile}` and `pbip run` (docs/paper-scale.md)")
    out = Path(out_dir) if out_dir else repo_root() / "results" / "book" / profile
    out = out.resolve()
    name = DEFAULT_DATASET[profile] if dataset is None else str(dataset)
    builtin = name if name in BUILTIN_DATASETS else None
    if builtin:
        dataset_path = out / builtin
    elif dataset is None:
        dataset_path = _manifest_dir(name)
    else:
        dataset_path = Path(dataset).resolve()
    cfg.data.root = str(dataset_path)
    if encoder:
        cfg.bank.encoder = str(encoder)
    out.mkdir(parents=True, exist_ok=True)
    return Chapter(profile=profile, cfg=cfg, dataset=dataset_path, encoder=cfg.bank.encoder,
                   seeds=tuple(int(s) for s in (seeds if seeds is not None else DEFAULT_SEEDS[profile])),
                   out_dir=out, builtin=builtin, overrides={k: v for k, v in ov.items() if k != "method"},
                   device=resolve_device(device or cfg.train.device),
                   train=(profile in TRAIN_IN_KERNEL) if train is None else bool(train))


def _manifest_dir(name: str) -> Path:
    local = dataset_entry(name).get("local_dir") or f"data/{name}"
    return (repo_root() / local).resolve()


def ensure_dataset(ch: Chapter, seed: int = 0) -> Path:
    """The chapter's dataset folder: a built-in one is generated (profile-sized) unless a complete one is there."""
    if (ch.dataset / "dataset.yaml").is_file():
        return ch.dataset
    if ch.builtin is None:
        raise DataError(f"{ch.dataset}: dataset folder not found (see `pbip data list` for how to get it)")
    generate, sizes = BUILTIN_DATASETS[ch.builtin]
    return generate(ch.dataset, seed=seed, **sizes[ch.profile], overwrite=True)


ROOT_POINTER = ".pbip-book-root"   # written by pbip_core.book.build.stage_book into its build copy


def repo_root() -> Path:
    """The book root: the folder holding ``_config.yml`` (the repository root), searched from the working directory.

    Inside the build copy ``_build/src`` that ``pbip book`` executes the chapters in, its ``.pbip-book-root`` file
    points back to the repository, so ``data/`` and ``results/`` are the repository's.
    """
    return find_root(Path.cwd()) or Path(__file__).resolve().parents[2]


def find_root(start: Path) -> Path | None:
    """The first folder from ``start`` upwards holding ``_config.yml`` and ``_toc.yml`` (a book root), with its
    ``.pbip-book-root`` pointer followed (a build copy points at the repository); None when there is none."""
    start = Path(start).resolve()
    for base in (start, *start.parents):
        if (base / "_config.yml").is_file() and (base / "_toc.yml").is_file():
            pointer = base / ROOT_POINTER
            if pointer.is_file():
                return (base / pointer.read_text().strip()).resolve()
            return base
    return None


# ---------------------------------------------------------------------------------------------------- batches
def val_batch(data_root: str | Path, split: str, image_size: int, n: int, start: int = 0
              ) -> tuple[torch.Tensor, list[np.ndarray], list[str]]:
    """``n`` images of a split from index ``start``, resized to ``image_size``.

    Returns x (B, 3, S, S) in [0, 1], the GT masks (S, S) resized with nearest neighbours (so they line up with
    the maps), and the file names.
    """
    ds = SegDataset(data_root, split, image_size=image_size)
    if len(ds) == 0:
        raise DataError(f"{data_root}/{split}: no images")
    items = [ds[i] for i in range(min(start, len(ds) - 1), min(start + n, len(ds)))]
    x = torch.stack([it["image"] for it in items])
    masks = [F.interpolate(it["mask"][None, None].float(), size=tuple(x.shape[-2:]), mode="nearest")[0, 0]
             .to(torch.uint8).numpy() for it in items]
    return x, masks, [it["name"] for it in items]


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """Images (B, 3, H, W) in [0, 1] -> list of (H, W, 3) uint8 arrays (for plotting)."""
    return list((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def present_classes(masks: Sequence[np.ndarray], n_classes: int) -> torch.Tensor:
    """Classes in each GT mask (background ignored): (B, N) bool."""
    return torch.stack([gt_present(m, n_classes) for m in masks])


def largest_class(mask: np.ndarray, n_classes: int) -> int:
    """The tissue class with the most pixels in a GT mask (background ignored)."""
    return int(np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=n_classes + 1)[:n_classes].argmax())
