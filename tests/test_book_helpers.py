"""Helpers of the chapters (pbip_core.book.chapter / results / tables / figures) and the bank's pool (sec. 3.2
steps 1-3, pbip_core.engine.bank): the steps the chapters plot are the bank's own."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from pbip_core.book.chapter import chapter_setup, largest_class, present_classes, to_uint8
from pbip_core.book.figures import project_2d
from pbip_core.book.results import book_grid, shared_run_grid
from pbip_core.book.tables import cosine_matrix, foreground_share, similarity_summary
from pbip_core.config import make_config
from pbip_core.engine.bank import Pool, bank_from_steps, pool_prototypes
from pbip_core.experiments.grid import plan


def _pool(seed=0, n_per=(9, 7, 2), d=6):
    g = torch.Generator().manual_seed(seed)
    label = np.concatenate([np.full(n, c) for c, n in enumerate(n_per)])
    feats = torch.randn(len(label), d, generator=g) + 3 * torch.eye(d)[label]
    white = np.linspace(0.9, 0, len(label))
    return Pool([Path(f"t{i}.png") for i in range(len(label))], label, feats, white, white <= 0.8,
                ("A", "B", "C"), 0.8, 40, np.array([20, 15, 10]))


def test_pool_steps_and_bank_agree():
    """The bank a chapter saves is made from the very steps it plots (one implementation)."""
    pool = _pool()
    cfg = make_config("smoke", {"bank.k": 3, "bank.nk": 2, "bank.seed": 4}).bank
    with pytest.warns(UserWarning, match="cyclically"):
        steps = pool_prototypes(pool, cfg)
    bank = bank_from_steps(pool, steps, cfg)
    assert torch.equal(bank.features, steps.prototypes) and bank.features.shape == (3, 3, 6)
    for n, (idx, assign) in enumerate(zip(steps.index, steps.assign)):
        assert len(idx) == len(assign) and (pool.label[idx] == n).all() and pool.eligible[idx].all()
        for k, chosen in enumerate(steps.chosen[n][: len(set(assign.tolist()))]):
            assert len(chosen) <= 2                                          # top-N_K
            assert torch.allclose(bank.features[n, k], pool.features[chosen].mean(0), atol=1e-6)
    counts = pool.counts()
    assert counts["single-class"].tolist() == [9, 7, 2]
    assert (counts["single-class"] - counts["dropped as white"] == counts["eligible for the bank"]).all()
    assert counts["dropped as white"].sum() == int((pool.white > 0.8).sum())
    assert bank.info["stats"]["dropped_white"] == counts["dropped as white"].tolist()


def test_cosine_matrix_summary_and_projection():
    protos = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 1.0]]])     # (N=2, K=2, d=2)
    s = cosine_matrix(protos)
    r = 1 / np.sqrt(2)
    assert np.allclose(s, [[1, r, 0, 0], [r, 1, r, r], [0, r, 1, 1], [0, r, 1, 1]], atol=1e-6)
    summ = similarity_summary(protos, ["A", "B"])
    assert summ.loc["A", "within class (other prototypes)"] == pytest.approx(r)
    assert summ.loc["B", "to other classes"] == pytest.approx(r / 2)
    pool = _pool()
    steps = pool_prototypes(pool, make_config("smoke", {"bank.k": 2, "bank.nk": 3}).bank)     # C has 2 images: K=2
    proj = project_2d(pool.features, steps)
    assert proj["xy"].shape[1] == 2 and proj["proto_xy"].shape == (6, 2)


def test_foreground_share_by_hand():
    m = torch.tensor([0.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)
    m[0, 1] = 1 - m[0, 1]
    present = torch.tensor([[True, False]])                   # only class 0 counts
    t = foreground_share(m, present, [0.0, 0.3, 0.6])
    assert t["foreground share (b)"].tolist() == [1.0, 0.5, 0.25]
    assert t["mean FG weight b·M"].tolist() == pytest.approx([1.7 / 4, 1.5 / 4, 1.0 / 4])
    assert t["mean FG weight without AT (M)"].tolist() == pytest.approx([1.7 / 4] * 3)
    fused = 2 * m - 0.5                                       # M' in [-0.5, 1.5]: cut at delta x 1.5
    t = foreground_share(m, present, [0.3], fused=fused)     # M' = [-.5, -.1, .5, 1.5] >= .45: 2 of 4
    assert t["foreground share (b)"].tolist() == [0.5] and t["foreground share if cut on M"].tolist() == [0.5]
    t = foreground_share(m, present, [0.0], fused=fused)     # tau = 0: only M' >= 0 (2 of 4); on M all 4
    assert t["foreground share (b)"].tolist() == [0.5] and t["foreground share if cut on M"].tolist() == [1.0]


def test_masks_helpers():
    gts = [np.array([[0, 0], [4, 2]]), np.array([[4, 4], [4, 4]])]
    assert present_classes(gts, 4).tolist() == [[True, False, True, False], [False] * 4]
    assert largest_class(gts[0], 4) == 0
    img = to_uint8(torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 0.0]]]]))[0]
    assert img.shape == (1, 2, 3) and img[0, 1].tolist() == [255, 128, 0]


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_shared_run_is_the_ablation_baseline(tmp_path, profile):
    """Chapters 02-05 and the ablation grids of chapters 07/09 ask for one and the same stage-1 run (same hash), with
    the chapter's dataset, encoder and first seed, so `make book` trains it once."""
    ch = chapter_setup(profile, dataset=str(tmp_path / "d"), encoder="pathmnist-densenet121", out_dir=str(tmp_path))
    mine, = plan(shared_run_grid(ch), quiet=True)
    assert mine.dataset == str(tmp_path / "d") and mine.seed == ch.seeds[0]
    assert mine.cfg.bank.encoder == "pathmnist-densenet121"
    theirs = [s for s in plan(book_grid("book-ablation", ch, seeds=[ch.seeds[0]]), quiet=True)
              if s.variant == "baseline"]
    assert [s.hash for s in theirs] == [mine.hash]
    if profile == "demo":                                    # the demo trims of the ablations apply to it
        assert mine.cfg.train.epochs == 2 and mine.cfg.data.max_train == 120
    plt.close("all")
