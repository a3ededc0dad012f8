"""Eq. 2-5 on small tensors, the ClassNet shape contract and gradient flow through the FG/BG masks."""

import math

import pytest
import torch

from _fakes import TinyBackbone, TinyEncoder
from pbip_core.method.model import (ClassNet, ImgMatchNet, PBIP, adaptive_threshold, aggregate, fg_bg_masks, minmax,
                             positive_pairs, separate, sim_map)


def test_eq2_sim_map_by_hand():
    # one pixel with feature (1, 0); class 0 prototypes (1,0), (0,1) -> cos 1, 0 -> mean 0.5
    # class 1 prototypes (-1,0), (1,1) -> cos -1, 1/sqrt2 -> mean (-1 + 0.70711)/2
    feat = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [1.0, 1.0]]])
    m = sim_map(feat, protos)
    assert m.shape == (1, 2, 1, 1)
    assert m[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert m[0, 1, 0, 0].item() == pytest.approx((-1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    # the pixel feature's norm does not matter
    assert torch.allclose(sim_map(5 * feat, protos), m)


def test_eq3_aggregate_sums_upsampled_levels():
    a = torch.ones(1, 2, 2, 2)
    b = 2 * torch.ones(1, 2, 4, 4)
    out = aggregate([a, b], (8, 8))
    assert out.shape == (1, 2, 8, 8) and torch.allclose(out, torch.full_like(out, 3.0))
    assert torch.allclose(aggregate([a, b], (8, 8), [0.0, 0.5]), torch.ones(1, 2, 8, 8))


def test_eq4_adaptive_threshold_per_image_and_class():
    m = torch.tensor([[[[0.1, 0.5], [1.0, 0.14]], [[0.2, 0.2], [0.4, 0.01]]]])   # (1, 2, 2, 2)
    b = adaptive_threshold(m, delta=0.15)
    # class 0: tau = 0.15 * 1.0 -> [[0,1],[1,0]]; class 1: tau = 0.15 * 0.4 = 0.06 -> [[1,1],[1,0]]
    assert b[0, 0].tolist() == [[0, 1], [1, 0]]
    assert b[0, 1].tolist() == [[1, 1], [1, 0]]
    # global scope (official): tau = delta * max over all channels = 0.5 * 1.0
    g = adaptive_threshold(m, delta=0.5, scope="global")
    assert g[0, 1].sum().item() == 0 and g[0, 0].tolist() == [[0, 1], [1, 0]]


def test_eq5_separation():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).reshape(2, 3, 2, 2)
    m = torch.rand(2, 2, 2, 2)
    b = (m > 0.5).float()
    fg, bg = fg_bg_masks(m, b)
    assert torch.allclose(fg, b * m) and torch.allclose(bg, (1 - b) * (1 - m))
    pairs = positive_pairs(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert pairs.tolist() == [[0, 1], [1, 0], [1, 1]]
    x_fg, x_bg = separate(x, fg, bg, pairs)
    assert x_fg.shape == (3, 3, 2, 2)
    assert torch.allclose(x_fg[1], x[1] * b[1, 0] * m[1, 0])          # X_FG = b * M * X
    assert torch.allclose(x_bg[2], x[1] * (1 - b[1, 1]) * (1 - m[1, 1]))
    # no AT: FG = M, BG = 1 - M
    fg2, bg2 = fg_bg_masks(m, None)
    assert torch.allclose(fg2, m) and torch.allclose(bg2, 1 - m)


def test_minmax_range():
    m = torch.randn(2, 3, 5, 5)
    r = minmax(m)
    assert torch.allclose(r.amin(dim=(2, 3)), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(r.amax(dim=(2, 3)), torch.ones(2, 3), atol=1e-4)


@pytest.mark.parametrize("sim", [True, False])
def test_classnet_shape_contract(sim):
    torch.manual_seed(0)
    net = ClassNet(TinyBackbone(), torch.randn(3, 2, 6), levels=(1, 2, 3), sim=sim)
    out = net(torch.rand(2, 3, 64, 64))
    assert [tuple(m.shape) for m in out.maps] == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4)]
    assert out.logits.shape == (3, 2, 3)
    if sim:
        assert [tuple(p.shape) for p in out.protos] == [(3, 2, 4), (3, 2, 8), (3, 2, 16)]
        assert all(m.abs().max() <= 1 + 1e-5 for m in out.maps)       # cosines
        assert torch.allclose(out.logits[0], out.maps[0].mean(dim=(2, 3)))


@pytest.mark.parametrize("fgbg", ["exact", "pooled"])
def test_fg_bg_loss_gradient_reaches_the_backbone_but_not_the_encoder(fgbg):
    from pbip_core.config import LossConfig
    from pbip_core.method.losses import total_loss

    torch.manual_seed(0)
    enc = TinyEncoder(d=6)
    net = ClassNet(TinyBackbone(), torch.randn(3, 2, 6), levels=(2, 3, 4))
    model = PBIP(net, ImgMatchNet(enc, delta=0.15, fgbg=fgbg))
    x = torch.rand(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out, match = model(x, y)
    assert match.pairs.shape == (3, 2) and match.fg[0].shape == (3, 8)
    # only the similarity terms: no CLS gradient
    terms = total_loss(out.logits, y, match.fg, match.bg, out.protos, match.pairs, LossConfig(cls=False))
    terms.total.backward()
    stem_grad = net.backbone.stem.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0       # through M into the backbone
    assert all(p.grad is None for p in enc.parameters())              # frozen encoder: no weight gradients


def test_pooled_with_uniform_weights_equals_encoding_the_image():
    enc = TinyEncoder()
    x = torch.rand(2, 3, 32, 32)
    ones = torch.ones(2, 1, 32, 32)
    assert torch.allclose(enc.pooled_encode(x, ones)[:, 0], enc.encode(x), atol=1e-5)
