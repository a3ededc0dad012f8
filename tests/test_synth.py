"""Synthetic H&E generator (pbip_core.data.synth) and the figure helpers it feeds (pbip_core.book.figures)."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pbip_core import cli
from pbip_core.book import figures
from pbip_core.data import synth
from pbip_core.errors import PBIPError

SMALL = dict(size=64, n_train=24, n_val=4, n_test=4, progress=False)
LABEL_RE = re.compile(r"-\[([01](?: [01])*)\]\.png$")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "d", seed=0, workers=1, **SMALL)


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """300 default-distribution tiles rendered in memory (small, for statistics)."""
    return [synth.render_tile(synth.tile_rng(3, "train", i), 48) for i in range(300)]


# ---------------------------------------------------------------------------------------------------- folder
def test_layout_and_dataset_yaml(dataset: Path) -> None:
    info = yaml.safe_load((dataset / "dataset.yaml").read_text())
    assert info["name"] == "synth"
    assert info["classes"] == ["TUM", "STR", "LYM", "NEC"]
    assert info["background_index"] == 4
    assert [tuple(c) for c in info["palette"]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255),
                                                  (255, 255, 255)]
    assert "heterogeneity" in info["description"] and "homogeneity" in info["description"]
    assert info["generator"]["seed"] == 0 and info["generator"]["size"] == 64
    assert all(len(v) >= 3 for v in info["sub_styles"].values())

    train = sorted(p.name for p in (dataset / "train").glob("*.png"))
    assert len(train) == 24 and all(LABEL_RE.search(n) for n in train)
    assert sorted(p.name for p in (dataset / "train_mask").glob("*.png")) == train
    for split in ("val", "test"):
        imgs = sorted(p.name for p in (dataset / split / "img").glob("*.png"))
        assert len(imgs) == 4
        assert sorted(p.name for p in (dataset / split / "mask").glob("*.png")) == imgs
    with Image.open(dataset / "train" / train[0]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    # no temporary files left behind by the atomic writes
    assert not [p for p in dataset.rglob("*.tmp")]


def test_masks_are_palette_pngs_with_valid_indices(dataset: Path) -> None:
    for p in list((dataset / "train_mask").glob("*.png")) + list(dataset.glob("*/mask/*.png")):
        with Image.open(p) as im:
            assert im.mode == "P"
            assert tuple(im.getpalette()[:15]) == (255, 0, 0, 0, 255, 0, 0, 0, 255, 153, 0, 255, 255, 255, 255)
            m = np.asarray(im)
        assert m.shape == (64, 64) and m.max() <= 4


def test_label_in_name_follows_area_rule(dataset: Path) -> None:
    rows = {r["name"]: r for r in csv.DictReader(open(dataset / "meta.csv"))}
    assert len(rows) == 24 + 4 + 4
    for p in (dataset / "train").glob("*.png"):
        label = [int(v) for v in LABEL_RE.search(p.name).group(1).split()]
        with Image.open(dataset / "train_mask" / p.name) as im:
            mask = np.asarray(im)
        share = np.bincount(mask.ravel(), minlength=5)[:4] / mask.size
        assert label == [int(s >= synth.MIN_AREA_SHARE) for s in share], p.name
        assert sum(label) >= 1
        # no class below the threshold hides in the mask: label == classes present in the mask
        assert label == [int(s > 0) for s in share], p.name
        assert rows[p.name]["label"] == " ".join(map(str, label))
        assert float(rows[p.name]["share_background"]) == pytest.approx((mask == 4).mean(), abs=1e-4)


def test_same_seed_same_bytes_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = synth.generate(tmp_path / "again", seed=0, workers=2, **SMALL)
    assert _hashes(again) == _hashes(dataset)
    other = synth.generate(tmp_path / "other", seed=1, workers=1, **SMALL)
    h0, h1 = _hashes(dataset), _hashes(other)
    pngs = [k for k in h0 if k.startswith("val/img/")]
    assert pngs and all(h0[k] != h1.get(k) for k in pngs)


# ------------------------------------------------------------------------------------------------ statistics
def test_class_mix_white_and_single_class_shares(tiles: list) -> None:
    metas = [t[2] for t in tiles]
    single = np.mean([len(m["classes"]) == 1 for m in metas])
    assert 0.28 <= single <= 0.52                      # target ~38 % (image-bank candidates)
    assert {len(m["classes"]) for m in metas} == {1, 2, 3}
    mostly_white = [m for m in metas if m["background_share"] > 0.6]
    assert 0.02 <= len(mostly_white) / len(metas) <= 0.12   # target ~6 %: the bank's white filter drops them
    assert all(len(m["classes"]) == 1 for m in mostly_white)
    some_white = np.mean([0 < m["background_share"] <= 0.6 for m in metas])
    assert 0.18 <= some_white <= 0.45                  # target 30 % with 5-40 % glass
    for rgb, mask, m in tiles:
        assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {synth.CLASSES.index(c) for c in m["classes"]} | {4}


def test_at_least_three_sub_styles_per_class_appear(tiles: list) -> None:
    seen = defaultdict(set)
    for _, _, m in tiles:
        for c, s in m["styles"].items():
            seen[c].add(s)
    for c in synth.CLASSES:
        assert len(seen[c]) >= 3, (c, seen[c])
        assert seen[c] <= set(synth.STYLES[c])


def test_confusable_pairs_name_real_sub_styles() -> None:
    for a, b in synth.CONFUSABLE:
        (ca, sa), (cb, sb) = a.split("/"), b.split("/")
        assert ca != cb and sa in synth.STYLES[ca] and sb in synth.STYLES[cb]


def _single(cls: str, style: str, seed: int, white: float = 0.0, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rgb, mask, _ = synth.render_tile(np.random.default_rng(seed), size, [cls], {cls: style}, white_share=white)
    return rgb.astype(float), mask


def test_colours_are_h_and_e_like() -> None:
    # Haematoxylin absorbs red more than blue, so dark nuclei transmit more blue than red: B > R.
    for style in ("dense", "pale"):
        rgb, _ = _single("LYM", style, 0)
        dark = rgb[rgb.sum(-1) <= np.quantile(rgb.sum(-1), 0.15)]
        assert dark[:, 2].mean() > dark[:, 0].mean(), style
    # Eosin-rich stroma is pinker (R - B larger) than lymphocyte sheets, style for style on average.
    pink = lambda x: (x[..., 0] - x[..., 2]).mean()  # noqa: E731
    stroma = np.mean([pink(_single("STR", s, k)[0]) for s in synth.STYLES["STR"] for k in range(2)])
    lym = np.mean([pink(_single("LYM", s, k)[0]) for s in synth.STYLES["LYM"] for k in range(2)])
    assert stroma > lym + 5
    # Tumour "solid" carries more haematoxylin (darker) than loose stroma.
    assert _single("TUM", "solid", 1)[0].mean() < _single("STR", "loose", 1)[0].mean() - 20
    # glass reads near white (240-250 by design) with faint noise
    rgb, mask = _single("NEC", "granular", 2, white=0.5)
    glass = rgb[mask == 4]
    assert 232 <= glass.mean() <= 252 and glass.std() < 8


def test_sub_styles_differ_visibly() -> None:
    # intra-class heterogeneity: sub-styles of one class differ in mean darkness or colour by a visible margin
    for cls in synth.CLASSES:
        means = np.array([_single(cls, s, 5, size=64)[0].reshape(-1, 3).mean(0) for s in synth.STYLES[cls]])
        spread = np.abs(means[:, None] - means[None]).max(-1)
        assert spread[np.triu_indices(len(means), 1)].max() > 20, cls


def test_render_tile_sizes_and_errors() -> None:
    rgb, mask, meta = synth.render_tile(np.random.default_rng(0), 40, ["TUM", "STR"])
    assert rgb.shape == (40, 40, 3) and mask.shape == (40, 40)
    assert meta["label"][2:] == [0, 0]
    with pytest.raises(PBIPError):
        synth.render_tile(np.random.default_rng(0), 64, ["XYZ"])
    with pytest.raises(PBIPError):
        synth.render_tile(np.random.default_rng(0), 64, ["TUM"], {"TUM": "nope"})


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw", [dict(n_train=-1), dict(n_val=-2), dict(size=16), dict(seed=-1),
                                dict(n_train=0, n_val=0, n_test=0)])
def test_bad_arguments_raise(tmp_path: Path, kw: dict) -> None:
    args = {**SMALL, **kw}
    with pytest.raises(PBIPError):
        synth.generate(tmp_path / "x", **args)
    assert not (tmp_path / "x" / "dataset.yaml").exists()


def test_overwrite_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(PBIPError, match="not empty"):
        synth.generate(foreign, **SMALL)
    with pytest.raises(PBIPError, match="not written by"):
        synth.generate(foreign, overwrite=True, **SMALL)
    assert (foreign / "keep.txt").read_text() == "user data"

    own = synth.generate(tmp_path / "own", **SMALL)
    with pytest.raises(PBIPError):
        synth.generate(own, **SMALL)
    synth.generate(own, overwrite=True, **{**SMALL, "n_train": 5})
    assert len(list((own / "train").glob("*.png"))) == 5      # stale tiles of the first run are gone
    assert len(list((own / "train_mask").glob("*.png"))) == 5


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    rc = cli.main(["synth", "--out", str(out), "--size", "48", "--n-train", "6", "--n-val", "2", "--n-test", "2",
                   "--workers", "1"])
    assert rc == 0 and (out / "dataset.yaml").exists()
    assert cli.main(["synth", "--out", str(out), "--n-train", "6"]) == 2   # not empty, no --overwrite
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- figures
def test_mask_to_rgb_and_overlay() -> None:
    mask = np.array([[0, 1], [3, 4]], np.uint8)
    rgb = figures.mask_to_rgb(mask, synth.PALETTE)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [153, 0, 255]
    img = np.full((2, 2, 3), 100, np.uint8)
    assert (figures.overlay(img, mask, synth.PALETTE, alpha=0.0) == img).all()
    assert (figures.overlay(img, mask, synth.PALETTE, alpha=1.0) == rgb).all()
    half = figures.overlay(img, mask, synth.PALETTE, alpha=0.5, ignore_index=4)
    assert half[0, 0].tolist() == [178, 50, 50] and half[1, 1].tolist() == [100, 100, 100]
    assert [h.get_label() for h in figures.legend_handles(["A", "B"], synth.PALETTE)] == ["A", "B"]
    with pytest.raises(PBIPError):
        figures.overlay(img, np.zeros((3, 3), np.uint8), synth.PALETTE)


def test_figure_synth_grid_writes_png(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "grid.png"
    assert cli.main(["figure", "synth-grid", "--out", str(out), "--dpi", "40"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > im.size[0]
    out2 = tmp_path / "grid_data.png"
    assert cli.main(["figure", "synth-grid", "--out", str(out2), "--data", str(dataset), "--dpi", "40"]) == 0
    assert out2.stat().st_size > 10_000
    assert cli.main(["figure", "synth-grid", "--out", str(tmp_path / "x.png"), "--data", str(tmp_path)]) == 2
