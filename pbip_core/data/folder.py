"""Dataset folders in the LUAD-HistoSeg / BCSS-WSSS format (paper sec. 4.1; DESIGN.md "Dataset folder format").

::

    DIR/train/*.png                 image-level labels in the name: ``...-[1 0 0 1].png`` or ``...[1101].png``
    DIR/val/img/*.png  DIR/val/mask/*.png      an image and its mask share the file-name stem
    DIR/test/img/*.png DIR/test/mask/*.png
    DIR/dataset.yaml                name, classes, background_index, palette (optional for the known datasets)

Images may be PNG, JPEG or TIFF (:data:`IMAGE_SUFFIXES`); masks must be lossless, PNG or TIFF
(:data:`MASK_SUFFIXES`): JPEG would change class indices at region edges. ``img/x.jpg`` pairs with ``mask/x.png``.
Masks are single-channel class indices ``0..N-1`` in label-vector order; ``background_index`` (usually N)
marks white background / excluded pixels, which the metrics ignore. Predictions and pseudo masks written by the
library are PNGs named ``<image stem>.png`` (:func:`prediction_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset

from ..errors import DataError
from ..io import read_mask, read_rgb
from .augment import dihedral, item_generator, random_dihedral

SPLITS = ("train", "val", "test")
MASK_SPLITS = ("val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")   # what a dataset folder's images may be
MASK_SUFFIXES = (".png", ".tif", ".tiff")                      # lossless only
IMAGE_KINDS = "PNG, JPEG or TIFF"

# Known datasets (Han et al. 2022, the MLPS release): no dataset.yaml needed.
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "luad-histoseg": {
        "classes": ("TE", "NEC", "LYM", "TAS"),
        "palette": ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
        "background_index": 4,
    },
    "bcss-wsss": {
        "classes": ("TUM", "STR", "LYM", "NEC"),
        "palette": ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
        "background_index": 4,
    },
}
# BCSS (Amgad et al. 2019) as used in the paper: the same four classes as BCSS-WSSS (after mapping its labels).
KNOWN_DATASETS["bcss"] = dict(KNOWN_DATASETS["bcss-wsss"])

YAML_HELP = (
    "write DIR/dataset.yaml with the keys: name: my-dataset, classes: [A, B, C] (label-vector order = mask "
    "index order), background_index: 3 (mask value of background/excluded pixels, usually the number of "
    "classes), palette: [[r,g,b], ...] (optional; one RGB per class, then one for background)"
)

# A colour-blind-friendly default palette for folders whose dataset.yaml gives none (Okabe-Ito, then grey).
_DEFAULT_COLOURS = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (0, 0, 0), (128, 128, 128), (153, 153, 51),
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset folder is about: class names (label-vector order == mask index order) and colours."""

    name: str
    classes: tuple[str, ...]
    background_index: int
    palette: tuple[tuple[int, int, int], ...]   # len == n_classes + 1 (the last one is the background's)
    root: Path

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def palette_list(self) -> list[tuple[int, int, int]]:
        """Palette indexed by mask value, ready for :func:`pbip_core.io.save_png` (background at its index)."""
        size = max(self.n_classes, self.background_index) + 1
        out = [(0, 0, 0)] * size
        for i, rgb in enumerate(self.palette[: self.n_classes]):
            out[i] = rgb
        out[self.background_index] = self.palette[-1]
        return out


# ---------------------------------------------------------------------------------------------- info
def known_name(text: str) -> str | None:
    """``'LUAD-HistoSeg'`` -> ``'luad-histoseg'``; ``'BCSS-WSSS'`` -> ``'bcss-wsss'``; ``'BCSS'`` -> ``'bcss'``; else None."""
    t = text.lower()
    if "luad" in t:
        return "luad-histoseg"
    if "bcss" in t:
        return "bcss-wsss" if "wsss" in t else "bcss"
    return None


def load_info(root: str | Path, name: str | None = None) -> DatasetInfo:
    """Read ``root/dataset.yaml``, or the defaults of a known dataset (LUAD-HistoSeg, BCSS-WSSS).

    A known dataset is recognised by ``name`` or by the folder name containing 'luad' or 'bcss'
    (case-insensitive). Anything else without a ``dataset.yaml`` raises :class:`DataError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    yaml_path = root / "dataset.yaml"
    if yaml_path.is_file():
        return _info_from_yaml(yaml_path, root, name)
    key = known_name(name) if name else known_name(root.resolve().name)
    if key is None:
        raise DataError(f"{yaml_path}: missing, and {root.name!r} is not a known dataset; {YAML_HELP}")
    d = KNOWN_DATASETS[key]
    return DatasetInfo(key, tuple(d["classes"]), int(d["background_index"]), tuple(d["palette"]), root)


def _info_from_yaml(path: Path, root: Path, name: str | None) -> DatasetInfo:
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping; {YAML_HELP}")
    # Other keys (description, generator settings, ...) are allowed and ignored.
    ds_name = str(data.get("name") or name or root.resolve().name)
    classes = data.get("classes")
    if classes is None:
        key = known_name(ds_name)
        if key is None:
            raise DataError(f"{path}: 'classes' is missing; {YAML_HELP}")
        classes = KNOWN_DATASETS[key]["classes"]
        data.setdefault("palette", KNOWN_DATASETS[key]["palette"])
        data.setdefault("background_index", KNOWN_DATASETS[key]["background_index"])
    if (not isinstance(classes, (list, tuple)) or not classes
            or not all(isinstance(c, (str, int)) and str(c).strip() for c in classes)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of class names; {YAML_HELP}")
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: 'classes' has duplicate names {list(classes)}")
    n = len(classes)
    bg = data.get("background_index", n)
    if not isinstance(bg, int) or isinstance(bg, bool) or not (n <= bg <= 255):
        raise DataError(f"{path}: 'background_index' must be an integer in {n}..255 (not a class index), got {bg!r}")
    palette = data.get("palette")
    if palette is None:
        palette = [_DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)] for i in range(n)] + [(255, 255, 255)]
    if (not isinstance(palette, (list, tuple)) or len(palette) != n + 1
            or not all(isinstance(c, (list, tuple)) and len(c) == 3
                       and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)):
        raise DataError(
            f"{path}: 'palette' must be {n + 1} RGB triples of integers 0..255 (one per class, then background)"
        )
    return DatasetInfo(ds_name, classes, int(bg), tuple(tuple(int(v) for v in c) for c in palette), root)


# ---------------------------------------------------------------------------------------------- labels
_LABEL_RE = re.compile(r"\[([^\[\]]*)\]")


def parse_label(filename: str, n_classes: int) -> np.ndarray:
    """Image-level label vector from a training file name -> (N,) int64 of 0/1.

    Both styles of the known datasets are accepted: LUAD-HistoSeg ``...-[1 0 0 1].png`` and BCSS-WSSS
    ``...+0[1101].png``. The last ``[...]`` group of the name is used.
    """
    stem = Path(filename).name
    groups = _LABEL_RE.findall(stem)
    if not groups:
        raise DataError(
            f"{filename}: no image-level label vector in the file name "
            f"(expected e.g. name-[1 0 0 1].png or name[1001].png with {n_classes} digits)"
        )
    body = groups[-1].strip()
    # "1 0 0 1" (separated) or "1001" (one digit per class)
    tokens = [t for t in re.split(r"[\s,]+", body) if t] if re.search(r"[\s,]", body) else list(body)
    if not all(t in ("0", "1") for t in tokens):
        raise DataError(f"{filename}: label vector [{body}] must contain only 0 and 1")
    if len(tokens) != n_classes:
        raise DataError(
            f"{filename}: label vector [{body}] has {len(tokens)} entries, expected {n_classes} (one per class)"
        )
    return np.array([int(t) for t in tokens], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- listing
def image_files(folder: Path) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`, any case) directly in ``folder``, sorted by file name."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.name)


def prediction_name(image: str | Path) -> str:
    """File name of the prediction / pseudo mask of an image or mask: ``x.jpg`` -> ``x.png`` (always PNG)."""
    return f"{Path(image).stem}.png"


def lossy_mask_problem(path: Path) -> str | None:
    """The one-line problem of a mask file that is not lossless (JPEG), else None."""
    if path.suffix.lower() in MASK_SUFFIXES:
        return None
    return (f"{path}: masks must be lossless (PNG or TIFF): JPEG compression changes class indices at region "
            "edges; save the masks as PNG")


def pair_split(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Images and masks of ``root/<split>/{img,mask}`` matched by file-name stem, and every problem found.

    Returns ``([(image, mask), ...] sorted by image name, [problem lines])``: a missing folder, a mask without an
    image or the reverse, two files with the same stem, a JPEG mask, an empty split.
    """
    base = Path(root) / split
    img_dir, mask_dir = base / "img", base / "mask"
    problems = [f"{d}: folder not found (expected DIR/{split}/img/<images> and DIR/{split}/mask/<masks>)"
                for d in (img_dir, mask_dir) if not d.is_dir()]
    if problems:
        return [], problems
    imgs, masks = by_stem(image_files(img_dir), problems), by_stem(image_files(mask_dir), problems)
    for stem in sorted(set(masks) - set(imgs)):
        problems.append(f"{masks[stem]}: mask without an image (no {img_dir / stem}.png, .jpg or .tif)")
    for stem in sorted(set(imgs) - set(masks)):
        problems.append(f"{imgs[stem]}: image without a mask (no {mask_dir / stem}.png)")
    for stem in sorted(masks):
        bad = lossy_mask_problem(masks[stem])
        if bad:
            problems.append(bad)
    if not imgs and not masks:
        problems.append(f"{base}: split is empty (no {IMAGE_KINDS} files in {img_dir} or {mask_dir})")
    pairs = [(imgs[s], masks[s]) for s in sorted(set(imgs) & set(masks), key=lambda s: imgs[s].name)]
    return pairs, problems


def by_stem(files: list[Path], problems: list[str]) -> dict[str, Path]:
    """``{stem: path}``; a second file with a stem already seen is left out and reported in ``problems``."""
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            problems.append(f"{p}: same name stem as {out[p.stem].name} (an image and its mask are paired by stem; "
                            "keep one)")
            continue
        out[p.stem] = p
    return out


def list_train(root: str | Path, info: DatasetInfo | None = None) -> list[tuple[Path, np.ndarray]]:
    """``[(image path, label (N,) int64), ...]`` of ``root/train``, sorted by file name."""
    root = Path(root)
    info = info or load_info(root)
    folder = root / "train"
    if not folder.is_dir():
        raise DataError(f"{folder}: training folder not found (expected DIR/train/<images with labels in the names>)")
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: no training images ({IMAGE_KINDS})")
    problems: list[str] = []
    by_stem(files, problems)           # pseudo masks are named by stem: two images may not share one
    if problems:
        raise DataError(problems[0])
    return [(p, parse_label(str(p), info.n_classes)) for p in files]


def list_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``[(image path, mask path), ...]`` of ``root/<split>/img`` and ``root/<split>/mask`` paired by stem, sorted
    by image name; the first problem (see :func:`pair_split`) raises :class:`DataError`."""
    pairs, problems = pair_split(root, split)
    if problems:
        raise DataError(problems[0])
    return pairs


# ---------------------------------------------------------------------------------------------- tensors
def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb)  # PIL arrays are read-only
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def resize_image(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """(3, H, W) -> (3, size, size), bilinear with antialiasing; unchanged when ``size`` is None or equal."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)


def subset_indices(n: int, max_items: int, seed: int = 0) -> list[int]:
    """The first ``max_items`` of a seeded permutation of ``range(n)`` (then sorted), so classes stay mixed."""
    if max_items <= 0 or max_items >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_items].tolist())


class TrainDataset(Dataset):
    """Training images with image-level labels (stage 1).

    Item: ``{"image": (3, H, W) float32 RGB in [0, 1], "label": (N,) float32, "name": str, "index": int}``.
    ``augment``: random horizontal/vertical flips + random rot90 (:mod:`pbip_core.data.augment`; the official code's
    augmentation, the paper's text names none). Draws depend only on ``(seed, epoch, index)``; call
    :meth:`set_epoch` each epoch for fresh draws. ``max_items`` keeps a subset chosen by ``subset_seed`` (fixed by
    default, so every seed and both stages train on the same images).
    """

    def __init__(self, root: str | Path, image_size: int | None = None, augment: bool = False, max_items: int = 0,
                 info: DatasetInfo | None = None, seed: int = 0, subset_seed: int = 0) -> None:
        self.root = Path(root)
        self.info = info or load_info(self.root)
        items = list_train(self.root, self.info)
        self.items = [items[i] for i in subset_indices(len(items), max_items, subset_seed)]
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        """(len, N) int64 label matrix, without reading any image."""
        return np.stack([lab for _, lab in self.items]) if self.items else np.zeros((0, self.info.n_classes), np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        x = resize_image(to_tensor(read_rgb(path)), self.image_size)
        if self.augment:
            x = dihedral(x, *random_dihedral(item_generator(self.seed, self.epoch, index)))
        return {"image": x.contiguous(), "label": torch.from_numpy(label).float(), "name": path.name, "index": index}


def validate_mask(mask: np.ndarray, path: Path, info: DatasetInfo, image_hw: tuple[int, int] | None = None) -> None:
    """DataError naming ``path`` if the mask's size differs from the image's or a value is not a class/background."""
    if image_hw is not None and tuple(mask.shape[:2]) != tuple(image_hw):
        raise DataError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {image_hw[1]}x{image_hw[0]}"
        )
    bad = bad_mask_values(mask, info)
    if bad:
        raise DataError(
            f"{path}: mask values {bad} outside the classes 0..{info.n_classes - 1} and background "
            f"{info.background_index}"
        )


def bad_mask_values(mask: np.ndarray, info: DatasetInfo) -> list[int]:
    values = np.unique(mask)
    ok = (values < info.n_classes) | (values == info.background_index)
    return [int(v) for v in values[~ok]]


class SegDataset(Dataset):
    """Validation/test images with pixel masks.

    Item: ``{"image": (3, h, w) float32 in [0, 1] (resized to image_size if given), "mask": (H, W) int64 at the
    original size, "name": str, "index": int}``. Each mask is validated when read (size, values).
    """

    def __init__(self, root: str | Path, split: str, image_size: int | None = None, info: DatasetInfo | None = None,
                 max_items: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.info = info or load_info(self.root)
        pairs = list_pairs(self.root, split)
        self.pairs = pairs[:max_items] if max_items > 0 else pairs
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, mask_path = self.pairs[index]
        rgb = read_rgb(img_path)
        mask = read_mask(mask_path)
        validate_mask(mask, mask_path, self.info, rgb.shape[:2])
        return {
            "image": resize_image(to_tensor(rgb), self.image_size).contiguous(),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "name": img_path.name,
            "index": index,
        }


def collate_seg(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (a list if their sizes differ); masks are stacked when equal in size, else kept as a list."""
    images = [b["image"] for b in batch]
    masks = [b["mask"] for b in batch]
    same_img = all(t.shape == images[0].shape for t in images)
    same_mask = all(t.shape == masks[0].shape for t in masks)
    return {
        "image": torch.stack(images) if same_img else images,
        "mask": torch.stack(masks) if same_mask else masks,
        "name": [b["name"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }


class PseudoMaskDataset(Dataset):
    """Training images (``DIR/train/*``) paired with pseudo masks ``masks_dir/<image stem>.png`` (stage 2).

    Item: ``{"image": (3, S, S) float [0, 1], "mask": (S, S) int64, "name": str}``. ``max_items`` keeps the same subset
    as stage 1's :class:`TrainDataset` (``subset_seed``). ``augment``: the same flip/rot90 on image and mask.
    """

    def __init__(self, root: str | Path, masks_dir: str | Path, image_size: int | None = None,
                 augment: bool = False, seed: int = 0, max_items: int = 0, subset_seed: int = 0) -> None:
        self.masks_dir = Path(masks_dir)
        if not self.masks_dir.is_dir():
            raise DataError(f"{self.masks_dir}: pseudo-mask folder not found (write it with `pbip pseudo --split train`)")
        items = [Path(p) for p, _ in list_train(root)]
        items = [items[i] for i in subset_indices(len(items), max_items, subset_seed)]
        missing = [p for p in items if not (self.masks_dir / prediction_name(p)).is_file()]
        if missing:
            raise DataError(
                f"{self.masks_dir / prediction_name(missing[0])}: pseudo mask missing for training image {missing[0]} "
                f"({len(missing)} of {len(items)} training images have no mask in {self.masks_dir})"
            )
        self.items = items
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.items[i]
        img = to_tensor(read_rgb(p))
        mask = torch.from_numpy(read_mask(self.masks_dir / prediction_name(p)).astype(np.int64))
        if mask.shape != img.shape[-2:]:
            raise DataError(
                f"{self.masks_dir / prediction_name(p)}: mask is {tuple(mask.shape)} but image {p} is "
                f"{tuple(img.shape[-2:])}"
            )
        img = resize_image(img, self.image_size)
        if self.image_size and mask.shape[-1] != self.image_size:
            mask = F.interpolate(mask[None, None].float(), size=(self.image_size,) * 2, mode="nearest")[0, 0].long()
        if self.augment:
            t = random_dihedral(item_generator(self.seed, self.epoch, i))
            img, mask = dihedral(img, *t), dihedral(mask, *t)
        return {"image": img.contiguous(), "mask": mask.contiguous(), "name": p.name}
