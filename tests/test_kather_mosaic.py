"""kather-mosaic: the built-in dataset composed from real Kather 2016 tiles (pbip_core.data.kather_mosaic).

Nothing here reads outside the repository: the tiles come from the package assets.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pbip_core.data import kather_mosaic as km
from pbip_core.data.check import inspect_dataset
from pbip_core.data.folder import list_pairs, list_train, load_info
from pbip_core.errors import DataError

ASSETS = Path(km.__file__).parent / "assets" / "kather2016"
SMALL = dict(n_train=60, n_val=30, n_test=30)

# The documented split (module docstring); pinned so a change of the assets or of the search is noticed.
EXPECTED_SPLIT = {
    "train": ["CRC-Prim-HE-02", "CRC-Prim-HE-03", "CRC-Prim-HE-05", "CRC-Prim-HE-06", "CRC-Prim-HE-08"],
    "val": ["CRC-Prim-HE-07", "CRC-Prim-HE-09", "CRC-Prim-HE-10"],
    "test": ["CRC-Prim-HE-01", "CRC-Prim-HE-04"],
}
EXPECTED_TILES = {
    "train": {"TUM": 12, "STR": 17, "LYM": 15, "NEC": 13, "ADI": 20, "EMP": 28},
    "val": {"TUM": 11, "STR": 5, "LYM": 5, "NEC": 5, "ADI": 6, "EMP": 2},
    "test": {"TUM": 7, "STR": 8, "LYM": 10, "NEC": 12, "ADI": 4, "EMP": 0},
}


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return km.generate_kather_mosaic(tmp_path_factory.mktemp("km") / "kather", seed=0, **SMALL)


def _meta(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((root / "meta.csv").read_text())))


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- assets
def test_assets_are_lossless_copies_of_the_tifs():
    """Every shipped tile decodes to exactly the pixels of its original TIF (sha256 recorded at conversion)."""
    rows = list(csv.DictReader(io.StringIO((ASSETS / "tiles.csv").read_text())))
    assert len(rows) == 180
    for row in rows:
        with Image.open(ASSETS / row["file"]) as im:
            assert im.format == "WEBP" and im.size == (150, 150)
            rgb = np.asarray(im.convert("RGB"))
        assert km.pixel_sha256(rgb) == row["pixel_sha256"], row["file"]
        assert Path(row["file"]).stem == Path(row["original"]).stem          # original stems kept
        assert row["slide"] == km.slide_of(row["original"])
        assert row["file"].split("/")[0] == km.TEXTURE_DIRS[row["texture"]]


def test_assets_checksums_cover_exactly_the_shipped_files():
    sums = dict(reversed(line.split(None, 1)) for line in (ASSETS / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*.webp"))
    assert sorted(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name
    for folder in km.TEXTURE_DIRS.values():
        assert len(list((ASSETS / folder).glob("*.webp"))) == 30
    attribution = (ASSETS / "ATTRIBUTION.md").read_text()
    for needle in ("CC BY 4.0", "10.5281/zenodo.53169", "27988", "Kather", "lossless"):
        assert needle in attribution


def test_read_tile_rejects_a_modified_asset(monkeypatch):
    tile = km._tiles()[0]
    monkeypatch.setitem(km._sha256sums(), tile.file, "0" * 64)
    with pytest.raises(DataError, match="checksum"):
        km.read_tile(tile)


def test_runtime_code_reads_no_absolute_paths():
    for module in ("kather_mosaic.py", "ebhi_seg.py", "staging.py"):
        text = (Path(km.__file__).parent / module).read_text()
        assert "/work" not in text and "shared/datasets" not in text, module


# ------------------------------------------------------------------------------------------------- split
def test_slide_split_is_the_documented_one():
    assert km.slide_split() == EXPECTED_SPLIT
    assert km.tiles_per_split() == EXPECTED_TILES
    for split in ("val", "test"):
        assert all(EXPECTED_TILES[split][c] >= km.MIN_EVAL_TILES for c in km.CLASSES)
    for split, slides in EXPECTED_SPLIT.items():
        for slide in slides:
            assert slide in km.__doc__


def test_source_tiles_table():
    df = km.source_tiles()
    assert len(df) == 180
    assert set(df.columns) >= {"file", "path", "texture", "kind", "mask_index", "slide", "split", "original"}
    assert df.groupby("slide")["split"].nunique().max() == 1            # a slide lives in one split
    for split, slides in EXPECTED_SPLIT.items():
        assert sorted(df.loc[df.split == split, "slide"].unique()) == slides
    assert set(df.loc[df.kind == "background", "mask_index"]) == {4}
    assert all(Path(p).is_file() for p in df["path"])


def test_search_slide_split_on_a_toy_problem():
    # columns: A, B (tissue), X (background). Slide 0 is big, slides 1-3 small.
    counts = np.array([[10, 10, 1], [2, 2, 1], [2, 2, 1], [1, 1, 0]])
    assign = km.search_slide_split(counts, min_eval_tiles=2, n_tissue=2)
    assert list(assign) == [0, 1, 2, 0]     # most tissue in train; val/test each >= 2 per class and a background tile
    with pytest.raises(DataError, match="no split"):
        km.search_slide_split(counts, min_eval_tiles=5, n_tissue=2)


# ------------------------------------------------------------------------------------------------- dataset
def test_folder_is_valid_and_complete(mosaic):
    rep = inspect_dataset(mosaic)
    assert rep.problems == []
    info = load_info(mosaic)
    assert info.name == "kather-mosaic" and info.classes == ("TUM", "STR", "LYM", "NEC")
    assert info.background_index == 4 and info.palette[-1] == (255, 255, 255)
    assert info.palette[:4] == ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255))
    assert len(list_train(mosaic)) == 60 and len(list_pairs(mosaic, "val")) == 30
    doc = yaml.safe_load((mosaic / "dataset.yaml").read_text())
    assert doc["slide_split"] == EXPECTED_SPLIT
    assert doc["generator"]["seed"] == 0 and doc["generator"]["rescaled"] is False
    assert "zenodo.53169" in doc["citation"]
    assert not [p for p in mosaic.parent.iterdir() if p.name != mosaic.name]    # no temporary folders left


def test_labels_in_names_equal_classes_in_train_masks(mosaic):
    for path, label in list_train(mosaic):
        mask = np.asarray(Image.open(mosaic / "train_mask" / path.name))
        present = [int(np.any(mask == c)) for c in range(4)]
        assert present == label.tolist(), path.name
        shares = np.bincount(mask.ravel(), minlength=5)[:4] / mask.size
        assert all(shares[c] >= km.MIN_AREA_SHARE for c in range(4) if label[c]), path.name


def test_masks_hold_only_classes_and_background(mosaic):
    for split in ("val", "test"):
        seen = set()
        for img, mask_path in list_pairs(mosaic, split):
            with Image.open(mask_path) as m:
                assert m.mode == "P"
                mask = np.asarray(m)
            assert mask.shape == (150, 150) == np.asarray(Image.open(img)).shape[:2]
            assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3, 4}
            seen |= set(np.unique(mask).tolist())
        assert seen == {0, 1, 2, 3, 4}, split   # every class and some background texture in every split


def test_every_split_holds_every_class(mosaic):
    rows = _meta(mosaic)
    for split in ("train", "val", "test"):
        classes = {c for r in rows if r["split"] == split for c in r["classes"].split("+")}
        assert classes == set(km.CLASSES), split
        assert any(r["background_texture"] for r in rows if r["split"] == split), split


def test_no_tile_and_no_slide_in_two_splits(mosaic):
    rows = _meta(mosaic)
    slides = {s: set() for s in ("train", "val", "test")}
    tiles = {s: set() for s in ("train", "val", "test")}
    of = {sl: split for split, sls in EXPECTED_SPLIT.items() for sl in sls}
    for r in rows:
        files = r["region_tiles"].split(";")
        tiles[r["split"]] |= set(files)
        slides[r["split"]] |= {km.slide_of(f) for f in files}
        assert all(of[km.slide_of(f)] == r["split"] for f in files), r["name"]
        assert set(r["slides"].split(";")) == {km.slide_of(f) for f in files}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not slides[a] & slides[b] and not tiles[a] & tiles[b]


def test_regions_meta_and_single_class_images(mosaic):
    rows = _meta(mosaic)
    single = [r for r in rows if r["n_classes"] == "1"]
    assert 0.25 <= len(single) / len(rows) <= 0.55
    multi_tile = 0
    for r in rows:
        textures, files = r["region_textures"].split(";"), r["region_tiles"].split(";")
        shares = [float(x) for x in r["region_shares"].split(";")]
        assert len(textures) == len(files) == len(shares)
        assert abs(sum(shares) - 1) < 2e-3
        tissue = [f for t, f in zip(textures, files) if t in km.CLASSES]
        assert len(tissue) == len(set(tissue)), r["name"]     # regions never share a tile within an image
        assert {t for t in textures if t in km.CLASSES} == set(r["classes"].split("+"))
        if r in single and len(tissue) >= 2:
            multi_tile += 1
    assert multi_tile >= 0.8 * len(single)     # single-class images are not just one tile


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = km.generate_kather_mosaic(tmp_path / "a", seed=3, n_train=6, n_val=3, n_test=3)
    b = km.generate_kather_mosaic(tmp_path / "b", seed=3, n_train=6, n_val=3, n_test=3)
    c = km.generate_kather_mosaic(tmp_path / "c", seed=4, n_train=6, n_val=3, n_test=3)
    assert _tree_digest(a) == _tree_digest(b)
    da, dc = _tree_digest(a), _tree_digest(c)
    va = {k: v for k, v in da.items() if k.startswith("val/img")}
    vc = {k: v for k, v in dc.items() if k.startswith("val/img")}
    assert va.keys() == vc.keys() and all(va[k] != vc[k] for k in va)


@pytest.mark.parametrize("size", [64, 200])
def test_other_sizes_without_rescaling(tmp_path, size):
    out = km.generate_kather_mosaic(tmp_path / "s", seed=1, size=size, n_train=4, n_val=2, n_test=2)
    assert inspect_dataset(out).problems == []
    for img, _ in list_pairs(out, "test"):
        assert Image.open(img).size == (size, size)


def test_single_region_crop_is_an_exact_tile_transform():
    """A region at size <= 150 shows the tile's own pixels (a flip/rotation and crop), never resampled."""
    tile = km.read_tile(km._tiles()[0])
    tex = km._texture(np.random.default_rng(0), tile, [tile], 150)
    variants = [np.rot90(tile, k)[:, ::-1] if f else np.rot90(tile, k) for k in range(4) for f in (0, 1)]
    assert any(np.array_equal(tex.astype(np.uint8), v) for v in variants)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_train=-1), "n_train"),
    (dict(n_val=1.5), "n_val"),
    (dict(n_train=0, n_val=0, n_test=0), "nothing to write"),
    (dict(size=10), "size"),
    (dict(size=True), "size"),
    (dict(seed=-2), "seed"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, kwargs, needle):
    with pytest.raises(DataError) as e:
        km.generate_kather_mosaic(tmp_path / "out", **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = km.generate_kather_mosaic(tmp_path / "out", n_train=2, n_val=1, n_test=1)
    with pytest.raises(DataError, match="overwrite") as e:
        km.generate_kather_mosaic(out, n_train=2, n_val=1, n_test=1)
    assert "\n" not in str(e.value)
    km.generate_kather_mosaic(out, seed=5, n_train=3, n_val=1, n_test=1, overwrite=True)
    assert len(list((out / "train").iterdir())) == 3
    assert yaml.safe_load((out / "dataset.yaml").read_text())["generator"]["seed"] == 5
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        km.generate_kather_mosaic(other, n_train=2, n_val=1, n_test=1, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = km._image_row

    def flaky(split, index, *args):
        calls.append(index)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(split, index, *args)

    monkeypatch.setattr(km, "_image_row", flaky)
    with pytest.raises(RuntimeError):
        km.generate_kather_mosaic(tmp_path / "out", n_train=6, n_val=2, n_test=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_checked_folder(tmp_path, capsys):
    from pbip_core.cli import main

    out = tmp_path / "km"
    assert main(["data", "kather-mosaic", "--out", str(out), "--n-train", "12", "--n-val", "4", "--n-test", "4"]) == 0
    assert "test 01, 04" in capsys.readouterr().out                    # the slide split is printed
    assert main(["data", "check", str(out)]) == 0
    assert main(["data", "kather-mosaic", "--out", str(out), "--n-train", "12"]) == 2   # exists, no --overwrite
