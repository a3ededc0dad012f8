"""What ``pbip data check DIR`` and ``pbip data list`` print.

``check`` reads a dataset folder the way training and evaluation will and reports every problem at once,
one line each (``<file or folder>: <reason>``), so a new dataset can be fixed in one pass.

A folder of a dataset the manifest knows (``luad-histoseg``, ``bcss-wsss``, ... by folder name or by the ``name`` of
its ``dataset.yaml``) is also compared with its manifest entry (:func:`compare_with_manifest`):

* other class names, or another order, than the manifest's -> a **problem** (labels and masks would be read as
  the wrong classes);
* other split sizes than the manifest's (the paper's, sec. 4.1) -> a **warning** line only: a subset, or a copy cut
  differently, is legitimate (the tests and the smoke profile use such folders), but a truncated download is not,
  so the warning says what is missing. ``pbip data check --strict`` turns warnings into problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..io import image_header, read_mask, read_rgb, rgb_mode_problem
from .folder import (IMAGE_KINDS, MASK_SPLITS, MASK_SUFFIXES, SPLITS, DatasetInfo, bad_mask_values, by_stem,
                     image_files, list_pairs, list_train, load_info, pair_split, parse_label, validate_mask)
from .manifest import load_manifest


@dataclass
class CheckReport:
    """What :func:`inspect_dataset` found: the problems and, for the OK line, the counts."""

    root: Path
    info: DatasetInfo | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # differences from the manifest that may be intended
    n_train: int = 0
    label_counts: np.ndarray | None = None      # (N,) images carrying each class
    single_counts: np.ndarray | None = None     # (N,) images carrying only that class
    n_split: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        info = self.info
        assert info is not None
        names = info.classes
        per = ", ".join(f"{c} {int(v)}" for c, v in zip(names, self.label_counts))
        single = ", ".join(f"{c} {int(v)}" for c, v in zip(names, self.single_counts))
        return (
            f"OK: {info.name}, {info.n_classes} classes [{', '.join(names)}], train {self.n_train} images "
            f"(labels per class: {per}; single-class: {single}), "
            + ", ".join(f"{s} {self.n_split.get(s, 0)}" for s in MASK_SPLITS)
        )


def check_dataset(root: str | Path, max_images: int = 0) -> list[str]:
    """Every problem of a dataset folder, one line each (empty list = the folder is fine).

    ``max_images > 0`` reads at most that many image files per split (names and pairing are always checked).
    A missing ``root`` raises :class:`DataError`.
    """
    return inspect_dataset(root, max_images).problems


def inspect_dataset(root: str | Path, max_images: int = 0, progress: bool = False,
                    manifest: dict | None = None) -> CheckReport:
    """Check ``root`` (problems, counts) and compare it with its manifest entry when it is a known dataset."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    rep = CheckReport(root)
    try:
        rep.info = load_info(root)
    except DataError as e:
        rep.problems.append(str(e))
    _check_train(rep, max_images, progress)
    for split in MASK_SPLITS:
        _check_split(rep, split, max_images, progress)
    if rep.info is not None:
        problems, warnings = compare_with_manifest(rep, manifest if manifest is not None else load_manifest())
        rep.problems.extend(problems)
        rep.warnings.extend(warnings)
    return rep


def compare_with_manifest(rep: CheckReport, manifest: dict) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of a checked folder against the manifest entry named like its dataset.

    Classes (names and order) must equal the entry's ``classes``; split sizes are compared with ``splits``
    (warnings). Folders of datasets the manifest does not list, and entries without classes/splits, give nothing.
    """
    info = rep.info
    entry = manifest.get("datasets", {}).get(info.name) if info is not None else None
    if not entry:
        return [], []
    problems, warnings = [], []
    where = f"the manifest's {info.name!r} entry"
    classes = entry.get("classes")
    if classes and tuple(str(c) for c in classes) != tuple(info.classes):
        problems.append(f"{rep.root}: classes [{', '.join(info.classes)}] differ from {where} "
                        f"[{', '.join(str(c) for c in classes)}] (label vectors and mask values follow that order)")
    bg = entry.get("background_index")
    if bg is not None and int(bg) != info.background_index:
        problems.append(f"{rep.root}: background_index {info.background_index} differs from {where} ({bg})")
    splits = entry.get("splits") or {}
    found = {"train": rep.n_train, **{s: rep.n_split.get(s, 0) for s in MASK_SPLITS}}
    diffs = [f"{s} {found[s]} (manifest {splits[s]})" for s in SPLITS if s in splits and found[s] != splits[s]]
    if diffs:
        warnings.append(f"{rep.root}: split sizes differ from {where} (the paper's, sec. 4.1): {', '.join(diffs)}; "
                        "fine for a subset, otherwise the download is incomplete (`pbip data fetch "
                        f"{info.name}` says where to get it)")
    return problems, warnings


def _limit(items: list, max_images: int) -> list:
    return items[:max_images] if max_images > 0 else items


def _check_train(rep: CheckReport, max_images: int, progress: bool) -> None:
    folder = rep.root / "train"
    if not folder.is_dir():
        rep.problems.append(f"{folder}: training folder not found "
                            "(expected DIR/train/<images with labels in the names>)")
        return
    files = image_files(folder)
    if not files:
        rep.problems.append(f"{folder}: split is empty (no {IMAGE_KINDS} training images)")
        return
    by_stem(files, rep.problems)
    rep.n_train = len(files)
    info = rep.info
    labels = []
    if info is not None:
        for p in files:
            try:
                labels.append(parse_label(str(p), info.n_classes))
            except DataError as e:
                rep.problems.append(str(e))
        lab = np.stack(labels) if labels else np.zeros((0, info.n_classes), np.int64)
        rep.label_counts = lab.sum(0)
        rep.single_counts = (lab * (lab.sum(1, keepdims=True) == 1)).sum(0)
    for p in tqdm(_limit(files, max_images), desc="check train", disable=not progress, leave=False):
        try:
            read_rgb(p)
        except DataError as e:
            rep.problems.append(str(e))


def _check_split(rep: CheckReport, split: str, max_images: int, progress: bool) -> None:
    pairs, problems = pair_split(rep.root, split)
    rep.problems.extend(problems)
    rep.n_split[split] = len(pairs)
    for img_path, mask_path in tqdm(_limit(pairs, max_images), desc=f"check {split}", disable=not progress,
                                    leave=False):
        image = mask = None
        try:
            image = read_rgb(img_path)
        except DataError as e:
            rep.problems.append(str(e))
        if mask_path.suffix.lower() not in MASK_SUFFIXES:
            continue                                     # a JPEG mask: already reported by pair_split
        try:
            mask = read_mask(mask_path)
        except DataError as e:
            rep.problems.append(str(e))
        if mask is None:
            continue
        if image is not None and mask.shape[:2] != image.shape[:2]:
            rep.problems.append(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        if rep.info is not None:
            bad = bad_mask_values(mask, rep.info)
            if bad:
                rep.problems.append(
                    f"{mask_path}: mask values {bad} outside the classes 0..{rep.info.n_classes - 1} and "
                    f"background {rep.info.background_index}"
                )


# ---------------------------------------------------------------------------------------------- before a long run
def preflight_dataset(root: str | Path, splits: tuple[str, ...] = MASK_SPLITS, train: bool = True) -> DatasetInfo:
    """The cheap checks a command runs before its first step, so a bad file fails in seconds, not after an epoch.

    ``train``: every training file name carries a label vector and every image's mode (from its header) is one
    :func:`pbip_core.io.read_rgb` accepts. Each split of ``splits``: images and masks pair up, every mask is read and
    validated (values, size against its image's header), every image's mode is accepted. Raises DataError with the
    first problem (one line naming the file) and how many more there are.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    info = load_info(root)
    problems: list[str] = []
    if train:
        for path, _ in list_train(root, info):
            mode, _ = image_header(path)
            if (why := rgb_mode_problem(mode)) is not None:
                problems.append(f"{path}: {why}")
    for split in splits:
        for img, mask_path in list_pairs(root, split):
            try:
                mode, hw = image_header(img)
                if (why := rgb_mode_problem(mode)) is not None:
                    raise DataError(f"{img}: {why}")
                validate_mask(read_mask(mask_path), mask_path, info, hw)
            except DataError as e:
                problems.append(str(e))
    if problems:
        more = (f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}; "
                f"`pbip data check {root}` lists them all)") if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return info


# ---------------------------------------------------------------------------------------------- the manifest
def format_manifest(m: dict) -> str:
    lines = ["Datasets (pbip_core/data/manifest.yaml):"]
    for name, d in m["datasets"].items():
        splits = d.get("splits") or {}
        sizes = "/".join(str(splits.get(s, "?")) for s in ("train", "val", "test")) if splits else "-"
        lines.append(f"  {name:<14} {d.get('title', '')}; classes {d.get('classes') or '-'}; "
                     f"train/val/test {sizes}; expected at {d.get('local_dir')}")
        lines.append(f"  {'':<14} source: {d.get('source')}; licence: {d.get('licence')}")
        manual = " ".join(str(d.get("manual") or "").split())
        how = (f"`pbip data fetch {name}` downloads it" if d.get("download")
               else manual if manual.startswith("Nothing to download")
               else f"by hand (`pbip data fetch {name}` prints how)")
        lines.append(f"  {'':<14} get it: {how}")
    lines.append("Weights:")
    for name, w in m["weights"].items():
        where = w.get("pypi") or w.get("hub_id") or w.get("source")
        lines.append(f"  {name:<28} {where}; licence: {w.get('licence')}; offline: env {w.get('env')}")
    return "\n".join(lines)
