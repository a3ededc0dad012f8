"""EBHI-Seg import (pbip_core.data.ebhi_seg): release layout -> dataset folder.

Uses the 12 real pairs in tests/fixtures/ebhi-seg (CC BY 4.0, see its ATTRIBUTION.md) and tiny synthetic releases
written in tmp_path; nothing outside the repository is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pbip_core.data import ebhi_seg as eb
from pbip_core.data.check import check_dataset
from pbip_core.data.folder import list_pairs, list_train, load_info
from pbip_core.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "ebhi-seg"
# label grey values to test the threshold: below 128 -> background, from 128 on -> the class
GREYS = np.array([0, 1, 64, 127, 128, 129, 200, 253, 254, 255], dtype=np.uint8)


def _meta(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((root / "meta.csv").read_text())))


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_release(root: Path, per_class: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """A tiny synthetic release ``root/EBHI-SEG/<folder>/{image,label}/*.png`` with antialiased label values."""
    rng = np.random.default_rng(seed)
    base = root / "EBHI-SEG"
    for folder, n in per_class.items():
        (base / folder / "image").mkdir(parents=True, exist_ok=True)
        (base / folder / "label").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"GT{eb._key(folder)[:4]}{i:03d}-1-400-{i:03d}.png"
            rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            grey = rng.choice(GREYS, (size, size))
            Image.fromarray(rgb, "RGB").save(base / folder / "image" / name)
            Image.fromarray(grey, "L").save(base / folder / "label" / name)
    return root


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory) -> Path:
    return eb.import_ebhi_seg(FIXTURES, tmp_path_factory.mktemp("eb") / "ebhi")


# ------------------------------------------------------------------------------------------------- real fixtures
def test_fixtures_convert_to_a_valid_folder(fixture_out):
    assert check_dataset(fixture_out) == []
    info = load_info(fixture_out)
    assert info.name == "ebhi-seg"
    assert info.classes == ("NOR", "POL", "LGIN", "HGIN", "SA", "ADC")
    assert info.background_index == 6 and len(info.palette) == 7 and info.palette[-1] == (255, 255, 255)
    doc = yaml.safe_load((fixture_out / "dataset.yaml").read_text())
    assert doc["class_names"]["LGIN"] == "Low-grade intraepithelial neoplasia"
    assert doc["class_folders"] == dict(zip(eb.CLASSES, eb.CLASS_FOLDERS))
    assert "10.3389/fmed.2023.1114673" in doc["citation"] and doc["split"]["seed"] == 0
    assert not [p for p in fixture_out.parent.iterdir() if p.name != fixture_out.name]   # no temporary folders


def test_fixture_split_counts_and_one_hot_names(fixture_out):
    rows = _meta(fixture_out)
    assert len(rows) == 12
    counts = yaml.safe_load((fixture_out / "dataset.yaml").read_text())["split"]["counts"]
    for cls in eb.CLASSES:                       # 2 images per class: 1 train, 1 val or test
        assert counts["train"][cls] == 1 and counts["val"][cls] + counts["test"][cls] == 1
    assert sum(counts["val"].values()) == 3 and sum(counts["test"].values()) == 3   # ties alternate
    for r in rows:
        assert counts[r["split"]][r["class"]] >= 1
    train = list_train(fixture_out)
    assert len(train) == 6
    for path, label in train:
        cls = path.name.split("_", 1)[0]
        assert label.tolist() == [int(c == cls) for c in eb.CLASSES]
        mask = np.asarray(Image.open(fixture_out / "train_mask" / path.name))
        assert set(np.unique(mask).tolist()) <= {eb.CLASSES.index(cls), 6}


def test_fixture_masks_match_the_release_labels(fixture_out):
    rows = {r["name"]: r for r in _meta(fixture_out)}
    for split in ("val", "test"):
        for img_path, mask_path in list_pairs(fixture_out, split):
            r = rows[img_path.name]
            src_img = FIXTURES / "EBHI-SEG" / r["source_image"]
            grey = np.asarray(Image.open(FIXTURES / "EBHI-SEG" / r["source_label"]))
            with Image.open(mask_path) as m:
                assert m.mode == "P"
                mask = np.asarray(m)
            cls = eb.CLASSES.index(r["class"])
            assert np.array_equal(mask, np.where(grey >= 128, cls, 6))
            assert img_path.read_bytes() == src_img.read_bytes()       # RGB PNGs copied unchanged


def test_src_may_be_the_ebhi_seg_folder_itself(fixture_out, tmp_path):
    out = eb.import_ebhi_seg(FIXTURES / "EBHI-SEG", tmp_path / "direct")
    assert _digest(out) == _digest(fixture_out)


# ------------------------------------------------------------------------------------------------- synthetic releases
def test_threshold_at_128_with_antialiased_values(tmp_path):
    src = make_release(tmp_path / "src", {"Normal": 5, "Adenocarcinoma": 5})
    out = eb.import_ebhi_seg(src, tmp_path / "out")
    assert check_dataset(out) == []
    seen = set()
    for r in _meta(out):
        grey = np.asarray(Image.open(src / "EBHI-SEG" / r["source_label"]))
        folder = "train_mask" if r["split"] == "train" else f"{r['split']}/mask"
        mask = np.asarray(Image.open(out / folder / r["name"]))
        cls = eb.CLASSES.index(r["class"])
        expected = np.where(grey >= 128, cls, 6)
        assert np.array_equal(mask, expected), r["name"]
        for g in GREYS:
            seen |= {(int(g), int(v)) for v in np.unique(mask[grey == g])}
        assert float(r["share_foreground"]) == pytest.approx((grey >= 128).mean(), abs=1e-4)
    assert (127, 6) in seen and (128, 0) in seen and (128, 5) in seen and (1, 6) in seen and (253, 5) in seen


def test_stratified_split_counts_and_seed(tmp_path):
    src = make_release(tmp_path / "src", {"Normal": 10, "Polyp": 10, "High-grade IN": 3, "Serrated adenoma": 7})
    out = eb.import_ebhi_seg(src, tmp_path / "out", seed=0)
    counts = yaml.safe_load((out / "dataset.yaml").read_text())["split"]["counts"]
    got = {c: [counts[s][c] for s in eb.SPLITS] for c in eb.CLASSES}
    assert got["NOR"] == [6, 2, 2] and got["POL"] == [6, 2, 2]
    assert got["HGIN"] == [1, 1, 1]                      # >= 1 per split once a class has 3 images
    assert sum(got["SA"]) == 7 and got["SA"][0] == 4 and sorted(got["SA"][1:]) == [1, 2]
    assert got["NOR"] != [0, 0, 0] and got["LGIN"] == [0, 0, 0]
    rows = _meta(out)
    for s in eb.SPLITS:                                   # yaml counts agree with meta.csv and the files
        for c in eb.CLASSES:
            assert sum(r["split"] == s and r["class"] == c for r in rows) == counts[s][c]
    assert len(list((out / "train").iterdir())) == sum(counts["train"].values())
    same = eb.import_ebhi_seg(src, tmp_path / "same", seed=0)
    other = eb.import_ebhi_seg(src, tmp_path / "other", seed=1)
    assert _digest(same) == _digest(out)
    split_of = lambda root: {r["source_image"]: r["split"] for r in _meta(root)}   # noqa: E731
    assert split_of(other) != split_of(out)


@pytest.mark.parametrize("n, fractions, expected", [
    (10, (0.6, 0.2, 0.2), [6, 2, 2]),
    (3, (0.6, 0.2, 0.2), [1, 1, 1]),
    (2, (0.6, 0.2, 0.2), [1, 1, 0]),
    (1, (0.6, 0.2, 0.2), [1, 0, 0]),
    (100, (0.4, 0.4, 0.2), [40, 40, 20]),
    (7, (0.5, 0.25, 0.25), [3, 2, 2]),
])
def test_split_counts(n, fractions, expected):
    assert eb.split_counts(n, fractions) == expected
    assert eb.split_counts(2, (0.6, 0.2, 0.2), so_far=[1, 1, 0]) == [1, 0, 1]


# ------------------------------------------------------------------------------------------------- bad input
def _break_missing_label(base):
    p = base / "Normal" / "label" / sorted(p.name for p in (base / "Normal" / "label").iterdir())[0]
    p.unlink()
    return base / "Normal" / "image" / p.name


def _break_label_without_image(base):
    p = base / "Polyp" / "image" / sorted(p.name for p in (base / "Polyp" / "image").iterdir())[1]
    p.unlink()
    return base / "Polyp" / "label" / p.name


def _break_size(base):
    p = sorted((base / "Polyp" / "label").iterdir())[2]
    Image.fromarray(np.zeros((8, 10), np.uint8), "L").save(p)
    return p


def _break_unknown_folder(base):
    (base / "Hyperplasia" / "image").mkdir(parents=True)
    (base / "Hyperplasia" / "label").mkdir(parents=True)
    return base / "Hyperplasia"


def _break_corrupt_image(base):
    p = sorted((base / "Normal" / "image").iterdir())[-1]     # read late: fails after writing has begun
    p.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return p


def _break_corrupt_label(base):
    p = sorted((base / "Polyp" / "label").iterdir())[-1]
    p.write_bytes(b"")
    return p


def _break_no_label_folder(base):
    shutil.rmtree(base / "Polyp" / "label")
    return base / "Polyp" / "label"


def _break_empty(base):
    for d in list(base.iterdir()):
        if d.is_dir():
            shutil.rmtree(d)
    return base


@pytest.mark.parametrize("breaker", [_break_missing_label, _break_label_without_image, _break_size,
                                     _break_unknown_folder, _break_corrupt_image, _break_corrupt_label,
                                     _break_no_label_folder, _break_empty])
def test_bad_input_names_the_file_and_leaves_nothing(tmp_path, breaker):
    src = make_release(tmp_path / "src", {"Normal": 5, "Polyp": 5})
    culprit = breaker(src / "EBHI-SEG")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError) as e:
        eb.import_ebhi_seg(src, dest / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(culprit) in msg, msg
    assert list(dest.iterdir()) == []          # no output folder, no temporary folder


def test_missing_source_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="not found"):
        eb.import_ebhi_seg(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(DataError, match="no EBHI-SEG folder"):
        eb.import_ebhi_seg(tmp_path / "unrelated", tmp_path / "out")
    src = make_release(tmp_path / "src", {"Normal": 5})
    for fractions in [(0.5, 0.5), (0.6, 0.3, 0.3), (1.0, 0.0, 0.0), "abc"]:
        with pytest.raises(DataError, match="fractions"):
            eb.import_ebhi_seg(src, tmp_path / "out", fractions=fractions)
    with pytest.raises(DataError, match="seed"):
        eb.import_ebhi_seg(src, tmp_path / "out", seed=-1)
    tiny = make_release(tmp_path / "tiny", {"Normal": 1})
    with pytest.raises(DataError, match="would be empty"):
        eb.import_ebhi_seg(tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    src = make_release(tmp_path / "src", {"Normal": 5})
    out = eb.import_ebhi_seg(src, tmp_path / "out")
    with pytest.raises(DataError, match="overwrite"):
        eb.import_ebhi_seg(src, out)
    eb.import_ebhi_seg(src, out, seed=2, overwrite=True)
    assert yaml.safe_load((out / "dataset.yaml").read_text())["split"]["seed"] == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="refusing"):
        eb.import_ebhi_seg(src, mine, overwrite=True)
    assert (mine / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------- command line
def test_cli_import_then_check(tmp_path, capsys):
    """`pbip data import ebhi-seg SRC --out DIR` then `pbip data check DIR`; a second import without --overwrite
    and a missing source are one-line errors (exit 2)."""
    from pbip_core.cli import main

    out = tmp_path / "ebhi"
    assert main(["data", "import", "ebhi-seg", str(FIXTURES), "--out", str(out)]) == 0
    assert main(["data", "check", str(out)]) == 0
    assert "OK: ebhi-seg, 6 classes" in capsys.readouterr().out
    assert main(["data", "import", "ebhi-seg", str(FIXTURES), "--out", str(out)]) == 2
    assert main(["data", "import", "ebhi-seg", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("pbip data: error:") == 2 and not (tmp_path / "o2").exists()
