"""Import EBHI-Seg (Shi et al. 2023) into the dataset-folder format (DESIGN.md, "Dataset folder format").

EBHI-Seg: Shi L, Li X, Hu W, et al. "EBHI-Seg: A novel enteroscope biopsy histopathological hematoxylin and eosin
image dataset for image segmentation tasks." Frontiers in Medicine 10:1114673 (2023); data: figshare article
21540159, CC BY 4.0. 224 x 224 px H&E images of colorectal biopsies at 400x, each with a greyscale mask.

Release layout (``src`` may be the folder holding ``EBHI-SEG`` or the ``EBHI-SEG`` folder itself)::

    SRC/EBHI-SEG/<class folder>/image/<name>.png    RGB image
    SRC/EBHI-SEG/<class folder>/label/<name>.png    greyscale mask, same name: 255 lesion/epithelium, 0 elsewhere

Classes, in this fixed order (the order of the release's readme, benign to malignant; label-vector order = mask
index order)::

    0 NOR  Normal            1 POL  Polyp                 2 LGIN  Low-grade IN (intraepithelial neoplasia)
    3 HGIN High-grade IN     4 SA   Serrated adenoma      5 ADC   Adenocarcinoma
    6 background: mask value < 128 in the release (stroma, lumen, everything outside the labelled tissue)

Every image holds one class: its label pixels ``>= 128`` become the class index of its folder, the others 6. The
release's masks have antialiased edges (about 3 % of pixels strictly between 0 and 255, and some Adenocarcinoma
masks mark the lesion 253 instead of 255), hence the threshold at 128. Output::

    OUT/train/<CLS>_<name>-[0 0 1 0 0 0].png   one-hot image-level label in the name; the class prefix keeps names
                                                unique across class folders
    OUT/train_mask/<same name>                  the train masks, kept aside (weak supervision reads train/ only)
    OUT/val/img/<CLS>_<name>.png  OUT/val/mask/<CLS>_<name>.png  OUT/test/img/...  OUT/test/mask/...
    OUT/meta.csv        per image: output name, split, class, source image and label (relative to EBHI-SEG),
                        foreground share, share of antialiased label pixels (strictly between 0 and 255)
    OUT/dataset.yaml    name ebhi-seg, classes, class_names, background_index 6, palette, citation, split

Split: stratified per class and seeded. For each class (its files sorted by name, then shuffled by a generator
seeded from ``(seed, class index)``), the counts are the largest-remainder rounding of ``n * fractions`` (equal
remainders go to the split with fewer images so far, so classes with few images do not all round the same way); if
that leaves a split without any image of the class although the class has at least 3 images, one image moves there
from the largest split. The counts per class and split, the seed and the fractions go into ``dataset.yaml``; the
split of every file is in ``meta.csv``. (The release's own experiments used 4:4:2 train/val/test; the default here is
0.6/0.2/0.2 because weakly supervised training needs no masks and val only selects checkpoints.) The split is per
image, like the release's own random split, not per patient: file names begin with a case id (e.g. ``GT2100256``),
a case often has several images and some case ids occur in several class folders, so images of one case can fall
into different splits and test scores may be optimistic.

Caveat for stage 1 (paper sec. 3.1): with one class per image, scoring stage-1 pseudo masks with the
ground-truth-present classes (the usual WSSS protocol, in which the argmax runs over the classes of the image-level
label) is trivial: every non-background pixel gets the one present class, and background pixels are ignored by the
metrics (DESIGN.md), so the score would be 100 % whatever the CAMs. On EBHI-Seg the classes must come from the
classifier (``pseudo.labels=predicted``) or the masks must be scored after stage 2.

Input problems raise :class:`~pbip_core.errors.DataError` with one line naming the file: a label without an image
or an image without a label, image/label size mismatch, an unknown class folder, an unreadable PNG, a class folder
without ``image``/``label`` subfolders, an empty source. The output is built in a temporary sibling folder and
renamed into place at the end, so on any error nothing is left behind.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from ..io import atomic_write_text, rgb_from_pil, save_png
from .staging import staged_folder
from .synth import label_string

NAME = "ebhi-seg"
IMPORTER_VERSION = "1.0"
# (short name, release folder), in label-vector order
CLASS_TABLE: tuple[tuple[str, str], ...] = (
    ("NOR", "Normal"),
    ("POL", "Polyp"),
    ("LGIN", "Low-grade IN"),
    ("HGIN", "High-grade IN"),
    ("SA", "Serrated adenoma"),
    ("ADC", "Adenocarcinoma"),
)
CLASSES: tuple[str, ...] = tuple(c for c, _ in CLASS_TABLE)
CLASS_FOLDERS: tuple[str, ...] = tuple(f for _, f in CLASS_TABLE)
CLASS_NAMES: dict[str, str] = {
    "NOR": "Normal", "POL": "Polyp", "LGIN": "Low-grade intraepithelial neoplasia",
    "HGIN": "High-grade intraepithelial neoplasia", "SA": "Serrated adenoma", "ADC": "Adenocarcinoma",
}
BACKGROUND_INDEX = 6
THRESHOLD = 128
# Okabe-Ito colours (colour-blind friendly), then white for background
PALETTE: list[tuple[int, int, int]] = [(0, 158, 115), (86, 180, 233), (240, 228, 66), (230, 159, 0),
                                       (204, 121, 167), (213, 94, 0), (255, 255, 255)]
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
SPLITS = ("train", "val", "test")
MARKER = ".pbip-ebhi-seg"
CITATION = (
    "Shi L, Li X, Hu W, Chen H, Chen J, Fan Z, Gao M, Jing Y, Lu G, Ma D, Ma Z, Meng Q, Tang D, Sun H, Grzegorzek M, "
    "Qi S, Teng Y, Li C. EBHI-Seg: A novel enteroscope biopsy histopathological hematoxylin and eosin image dataset "
    "for image segmentation tasks. Frontiers in Medicine 10, 1114673 (2023). doi:10.3389/fmed.2023.1114673. Data: "
    "figshare article 21540159, CC BY 4.0."
)
DESCRIPTION = (
    "EBHI-Seg (Shi et al. 2023): 224 x 224 px H&E images of enteroscope (colorectal) biopsies at 400x, six "
    "diagnostic classes, one class per image. Release masks (255 = lesion / gland epithelium of the image's class, "
    "0 = everything else) thresholded at 128: >= 128 -> the class index of the image's folder, else background 6. "
    "Training names carry one-hot labels. With one class per image, scoring stage-1 pseudo masks with the "
    "ground-truth classes is trivial (background is ignored by the metrics): take the classes from the classifier "
    "(pseudo.labels=predicted) or score after stage 2. train_mask/ holds the train masks, hidden from weak "
    "supervision."
)


def _key(name: str) -> str:
    """Folder-name key: case, spaces, hyphens and underscores do not matter ('low_grade_in' == 'Low-grade IN')."""
    return re.sub(r"[\s_\-]+", "", name).lower()


_FOLDER_KEYS = {_key(f): i for i, f in enumerate(CLASS_FOLDERS)}


def release_root(src: str | Path) -> Path:
    """The ``EBHI-SEG`` folder of a release: ``src/EBHI-SEG`` or ``src`` itself."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: EBHI-Seg source folder not found")
    inner = [p for p in src.iterdir() if p.is_dir() and _key(p.name) == "ebhiseg"]
    if inner:
        return inner[0]
    if _key(src.name) == "ebhiseg" or any(p.is_dir() and _key(p.name) in _FOLDER_KEYS for p in src.iterdir()):
        return src
    raise DataError(f"{src}: no EBHI-SEG folder and no class folders (expected SRC/EBHI-SEG/<class>/image/*.png)")


def _pngs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"
            and not p.name.startswith(".")}


def find_pairs(src: str | Path) -> list[tuple[int, Path, Path]]:
    """``[(class index, image path, label path), ...]`` of a release, sorted by class then file name.

    Checks the layout (class folders, image/ and label/ subfolders, pairing by file name); reads no image.
    """
    root = release_root(src)
    pairs: list[tuple[int, Path, Path]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cls = _FOLDER_KEYS.get(_key(folder.name))
        if cls is None:
            raise DataError(f"{folder}: unknown class folder; expected one of {list(CLASS_FOLDERS)}")
        img_dir, lab_dir = folder / "image", folder / "label"
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise DataError(f"{d}: folder not found (expected {folder.name}/image/*.png and "
                                f"{folder.name}/label/*.png)")
        imgs, labs = _pngs(img_dir), _pngs(lab_dir)
        for name in sorted(set(labs) - set(imgs)):
            raise DataError(f"{labs[name]}: label without an image (no {img_dir / name})")
        for name in sorted(set(imgs) - set(labs)):
            raise DataError(f"{imgs[name]}: image without a label (no {lab_dir / name})")
        pairs += [(cls, imgs[n], labs[n]) for n in sorted(imgs)]
    if not pairs:
        raise DataError(f"{root}: no EBHI-Seg images found (expected {root}/<class>/image/*.png with "
                        f"<class>/label/*.png)")
    pairs.sort(key=lambda t: (t[0], t[1].name))
    return pairs


def split_counts(n: int, fractions: Sequence[float], so_far: Sequence[int] | None = None) -> list[int]:
    """Images of one class per split: largest-remainder rounding of ``n * fractions``; equal remainders go to the
    split with fewer images so far (``so_far``, over the classes already split), then to the earlier split. Then, if
    ``n >= 3``, a split left without an image of the class gets one from the largest split."""
    quota = np.asarray(fractions, float) * n
    counts = np.floor(quota).astype(int)
    rest = np.round(quota - counts, 9)
    before = list(so_far) if so_far is not None else [0] * len(counts)
    for i in sorted(range(len(counts)), key=lambda i: (-rest[i], before[i], i))[: n - int(counts.sum())]:
        counts[i] += 1
    if n >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return [int(c) for c in counts]


def stratified_split(pairs: Sequence[tuple[int, Path, Path]], fractions: Sequence[float], seed: int
                     ) -> list[str]:
    """Split name for every pair (same order), stratified per class; see the module docstring."""
    out = [""] * len(pairs)
    totals = [0] * len(SPLITS)
    for cls in range(len(CLASSES)):
        idx = [i for i, p in enumerate(pairs) if p[0] == cls]
        if not idx:
            continue
        idx.sort(key=lambda i: pairs[i][1].name)
        order = np.random.default_rng(np.random.SeedSequence([int(seed), cls])).permutation(len(idx))
        counts = split_counts(len(idx), fractions, totals)
        totals = [t + c for t, c in zip(totals, counts)]
        bounds = np.cumsum([0] + counts)
        for s, split in enumerate(SPLITS):
            for j in order[bounds[s]:bounds[s + 1]]:
                out[idx[j]] = split
    return out


def _check_args(fractions: Any, seed: Any) -> tuple[float, float, float]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"import_ebhi_seg: seed must be a non-negative integer, got {seed!r}")
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DataError(f"import_ebhi_seg: fractions must be three numbers (train, val, test), got {fractions!r}"
                        ) from None
    if len(fr) != 3 or any(not f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"import_ebhi_seg: fractions must be three positive numbers (train, val, test) summing to "
                        f"1, got {fractions!r}")
    return fr  # type: ignore[return-value]


def _read(path: Path, kind: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            fmt = im.format
            im = im.copy()
            im.format = fmt     # copy() drops it; _write_image uses it
            return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt {kind} PNG ({type(e).__name__}: {e})") from None


def convert_pair(cls: int, image: Path, label: Path) -> tuple[Any, np.ndarray, dict[str, float]]:
    """Read one pair: (PIL image, (H, W) uint8 mask with ``cls`` / 6, stats). DataError naming the bad file."""
    img = _read(image, "image")
    lab = _read(label, "label")
    if lab.size != img.size:
        raise DataError(f"{label}: label size {lab.size[0]}x{lab.size[1]} differs from image size "
                        f"{img.size[0]}x{img.size[1]} ({image.name})")
    if lab.mode not in ("L", "1", "P", "RGB", "RGBA", "LA"):            # 16/32-bit, CMYK, ...: no 8-bit grey value
        raise DataError(f"{label}: label of mode {lab.mode}; EBHI-Seg labels are 8-bit black-and-white images")
    grey = np.asarray(lab if lab.mode == "L" else lab.convert("L"))   # RGB / palette masks: their grey value
    mask = np.where(grey >= THRESHOLD, cls, BACKGROUND_INDEX).astype(np.uint8)
    stats = {"share_foreground": float((mask == cls).mean()),
             "share_antialiased": float(((grey > 0) & (grey < 255)).mean())}
    return img, mask, stats


def _write_image(img: Any, src: Path, dst: Path) -> None:
    """RGB PNG images are copied byte for byte; anything else is converted to RGB following the image-mode policy of
    :func:`pbip_core.io.rgb_from_pil` (a mode it refuses is a DataError naming ``src``) and written as PNG."""
    if img.mode == "RGB" and img.format == "PNG":
        shutil.copyfile(src, dst)
    else:
        Image.fromarray(rgb_from_pil(img, src)).save(dst, format="PNG")


def import_ebhi_seg(src: str | Path, out: str | Path, seed: int = 0,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, overwrite: bool = False,
                    progress: bool = False) -> Path:
    """Convert the EBHI-Seg release at ``src`` into the dataset folder ``out`` (layout in the module docstring).

    Same input and arguments -> same output bytes. With ``overwrite`` a folder previously written by this function
    is replaced; any other non-empty folder is refused. Raises :class:`DataError` (one line naming the file) on bad
    input; nothing is left at ``out`` then.
    """
    fr = _check_args(fractions, seed)
    out = Path(out)
    pairs = find_pairs(src)
    root = release_root(src)
    splits = stratified_split(pairs, fr, int(seed))
    for split in SPLITS:
        if split not in splits:
            raise DataError(f"{root}: split {split!r} would be empty ({len(pairs)} images, fractions {list(fr)}); "
                            f"add images or change the fractions")
    from tqdm.auto import tqdm

    with staged_folder(out, overwrite, MARKER, "pbip_core.data.ebhi_seg") as tmp:
        for d in ("train", "train_mask", "val/img", "val/mask", "test/img", "test/mask"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        rows = []
        for (cls, image, label), split in tqdm(list(zip(pairs, splits)), desc="import EBHI-Seg", unit="image",
                                               disable=not progress):
            img, mask, stats = convert_pair(cls, image, label)
            stem = f"{CLASSES[cls]}_{image.stem}"
            if split == "train":
                onehot = [int(i == cls) for i in range(len(CLASSES))]
                name = f"{stem}-{label_string(onehot)}.png"
                _write_image(img, image, tmp / "train" / name)
                save_png(mask, tmp / "train_mask" / name, PALETTE)
            else:
                name = f"{stem}.png"
                _write_image(img, image, tmp / split / "img" / name)
                save_png(mask, tmp / split / "mask" / name, PALETTE)
            rows.append({"name": name, "split": split, "class": CLASSES[cls],
                         "source_image": image.relative_to(root).as_posix(),
                         "source_label": label.relative_to(root).as_posix(),
                         "share_foreground": f"{stats['share_foreground']:.4f}",
                         "share_antialiased": f"{stats['share_antialiased']:.4f}"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(tmp / "meta.csv", buf.getvalue())
        counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
        for (cls, _, _), split in zip(pairs, splits):
            counts[split][CLASSES[cls]] += 1
        atomic_write_text(tmp / "dataset.yaml", dataset_yaml(int(seed), fr, counts))
    return out


def dataset_yaml(seed: int, fractions: Sequence[float], counts: dict[str, dict[str, int]]) -> str:
    import yaml

    doc = {
        "name": NAME,
        "classes": list(CLASSES),
        "background_index": BACKGROUND_INDEX,
        "palette": [list(c) for c in PALETTE],
        "class_names": dict(CLASS_NAMES),
        "class_folders": dict(zip(CLASSES, CLASS_FOLDERS)),
        "description": DESCRIPTION,
        "citation": CITATION,
        "licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
        "mask_threshold": THRESHOLD,
        "split": {"seed": int(seed), "fractions": [float(f) for f in fractions], "stratified_by": "class",
                  "counts": counts, "files": "meta.csv (columns name, split)"},
        "importer": {"module": "pbip_core.data.ebhi_seg", "version": IMPORTER_VERSION},
        "stage1_note": "one class per image: use pseudo.labels=predicted (or stage 2) to score pseudo masks",
        "extras": {"train_mask": "pixel masks of train/ (same names); hidden from weak supervision",
                   "meta": "meta.csv: name, split, class, source_image, source_label, share_foreground, "
                           "share_antialiased"},
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
