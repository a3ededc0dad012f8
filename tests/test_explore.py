"""Chapter helpers (pbip_core.explore): the bank's steps kept apart agree with pbip_core.bank; eq. 2 by hand; eq. 4
foreground shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _fakes import TinyBackbone
from pbip_core import explore
from pbip_core.bank import build_prototypes
from pbip_core.model import ClassNet


def _pool(seed=0, n_per=(9, 7, 2), d=6):
    g = torch.Generator().manual_seed(seed)
    label = np.concatenate([np.full(n, c) for c, n in enumerate(n_per)])
    feats = torch.randn(len(label), d, generator=g) + 3 * torch.eye(d)[label]
    white = np.linspace(0.9, 0, len(label))
    return explore.Pool([Path(f"t{i}.png") for i in range(len(label))], label, feats, white, white <= 0.8,
                        ("A", "B", "C"), 0.8, 40, np.array([20, 15, 10]))


def test_cluster_pool_matches_the_bank():
    pool = _pool()
    cl = explore.cluster_pool(pool, k=3, nk=2, seed=4, iters=50, restarts=3)
    names = [p.name for p in pool.paths]
    with pytest.warns(UserWarning, match="cyclically"):
        protos, members = build_prototypes(pool.features, [pool.members(n) for n in range(3)], names, 3, 2,
                                            seed=4, iters=50, restarts=3)
    assert torch.allclose(cl.prototypes, protos)
    assert [[[names[i] for i in c] for c in per] for per in cl.chosen] == [m[: len(cl.chosen[n])]
                                                                         for n, m in enumerate(members)]
    for n, (idx, assign) in enumerate(zip(cl.index, cl.assign)):
        assert len(idx) == len(assign) and (pool.label[idx] == n).all() and pool.eligible[idx].all()
    counts = pool.counts()
    assert counts["single-class"].tolist() == [9, 7, 2]
    assert (counts["single-class"] - counts["dropped as white"] == counts["eligible for the bank"]).all()
    assert counts["dropped as white"].sum() == int((pool.white > 0.8).sum())


def test_cosine_matrix_and_summary():
    protos = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 1.0]]])     # (N=2, K=2, d=2)
    s = explore.cosine_matrix(protos)
    r = 1 / np.sqrt(2)
    assert np.allclose(s, [[1, r, 0, 0], [r, 1, r, r], [0, r, 1, 1], [0, r, 1, 1]], atol=1e-6)
    summ = explore.similarity_summary(protos, ["A", "B"])
    assert summ.loc["A", "within class (other prototypes)"] == pytest.approx(r)
    assert summ.loc["B", "to other classes"] == pytest.approx(r / 2)
    proj = explore.project_2d(_pool(), explore.cluster_pool(_pool(), 2, 3, iters=20, restarts=1))
    assert proj["xy"].shape[1] == 2 and proj["proto_xy"].shape == (6, 2)


def test_sim_pixel_check_agrees_with_sim_map():
    torch.manual_seed(0)
    net = ClassNet(TinyBackbone(), torch.randn(3, 2, 10), levels=(1, 2, 3)).eval()
    x = torch.rand(2, 3, 32, 32)
    for level, yx in ((0, (1, 2)), (2, (0, 0))):
        c = explore.sim_pixel_check(net, x, level=level, b=1, n=2, yx=yx)
        assert c["abs_diff"] < 1e-5 and -1 <= c["explicit"] <= 1
    out = explore.class_maps(net, x)
    assert out["fused"].shape == (2, 3, 32, 32)
    assert float(out["m"].amin()) >= 0 and float(out["m"].amax()) <= 1


def test_foreground_share_by_hand():
    m = torch.tensor([0.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)
    m[0, 1] = 1 - m[0, 1]
    present = torch.tensor([[True, False]])                   # only class 0 counts
    t = explore.foreground_share(m, present, [0.0, 0.3, 0.6])
    assert t["foreground share (b)"].tolist() == [1.0, 0.5, 0.25]
    assert t["mean FG weight b·M"].tolist() == pytest.approx([1.7 / 4, 1.5 / 4, 1.0 / 4])
    assert t["mean FG weight without AT (M)"].tolist() == pytest.approx([1.7 / 4] * 3)


def test_masks_helpers():
    gts = [np.array([[0, 0], [4, 2]]), np.array([[4, 4], [4, 4]])]
    assert explore.present_classes(gts, 4).tolist() == [[True, False, True, False], [False] * 4]
    assert explore.largest_class(gts[0], 4) == 0
    img = explore.to_uint8(torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 0.0]]]]))[0]
    assert img.shape == (1, 2, 3) and img[0, 1].tolist() == [255, 128, 0]


def test_stage1_grid_uses_the_chapter(tmp_path):
    from pbip_core.book import chapter_setup
    from pbip_core.experiments import load_grid, plan

    ch = chapter_setup("demo", dataset=str(tmp_path / "d"), encoder="pathmnist-densenet121", out_dir=str(tmp_path))
    g = explore.stage1_grid(ch)
    assert g["profile"] == "demo" and g["datasets"] == [str(tmp_path / "d")] and g["seeds"] == [0]
    spec, = plan(load_grid(g), quiet=True)
    assert spec.cfg.bank.encoder == "pathmnist-densenet121" and spec.cfg.train.epochs == 2
    assert spec.cfg.data.max_train == explore.BOOK_RUN_OVERRIDES["demo"]["data.max_train"]


def test_shared_run_is_the_ablation_baseline(tmp_path):
    """Chapters 03/04 and the ablation grid of chapters 07/09 ask for one and the same stage-1 run (same hash)."""
    from pbip_core.book import chapter_setup
    from pbip_core.experiments import load_grid, plan

    chapters = pytest.importorskip("pbip_core.chapters")
    if not (chapters.BOOK_GRIDS_DIR / "book-ablation.yaml").is_file():
        pytest.skip("no book-ablation grid")
    for profile in ("smoke", "demo"):
        ch = chapter_setup(profile, dataset=str(tmp_path / "d"), out_dir=str(tmp_path))
        mine, = plan(load_grid(explore.stage1_grid(ch)), quiet=True)
        theirs = [s for s in plan(chapters.book_grid("book-ablation", ch, seeds=[ch.seeds[0]]), quiet=True)
                  if s.variant == "baseline"]
        assert [s.hash for s in theirs] == [mine.hash], profile
