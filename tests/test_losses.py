"""Each equation of sec. 3.5 on small tensors whose values are worked out by hand in the comments."""

import math

import pytest
import torch

from pbip_core.config import LossConfig
from pbip_core.method.losses import bgs_loss, cls_loss, fgs_loss, prototype_similarities, total_loss, two_way_nce


def test_cls_loss_is_bce_with_sigmoid_summed_over_levels():
    # logits 0 everywhere: sigmoid = 1/2, BCE = log 2 for every label; eq. 8 sums 2 levels -> 2 log 2
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert cls_loss(logits, labels).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # level weights (official 0 / 1): only the second level counts
    assert cls_loss(logits, labels, [0.0, 1.0]).item() == pytest.approx(math.log(2), abs=1e-6)
    # a correct logit of +3 / -3: BCE = log(1 + e^-3) per element
    lg = torch.where(labels > 0, 3.0, -3.0)[None]
    assert cls_loss(lg, labels).item() == pytest.approx(math.log1p(math.exp(-3)), rel=1e-5)


def test_two_way_nce_matches_the_softmax_form():
    pos, neg, tau = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.5]), 0.7
    ref = -torch.log(torch.exp(pos / tau) / (torch.exp(pos / tau) + torch.exp(neg / tau))).mean()
    assert two_way_nce(pos, neg, tau).item() == pytest.approx(ref.item(), abs=1e-7)


def test_fgs_eq9_10_by_hand():
    # N=2 classes, K=1, C=2: P[0] = e1, P[1] = e2; F_FG for class 0 = e1 -> s_FF = 1, s_FB = 0
    protos = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    f = torch.tensor([[2.0, 0.0]])                     # norm does not matter (cosine)
    # -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.3132617
    assert fgs_loss(f, protos, torch.tensor([0]), tau=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    # K=2 and a *sum* over prototypes (eq. 10): P[0] = (e1, e1), P[1] = (e2, e1)
    protos2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # s_FF = 1 + 1 = 2; s_FB = 0 + 1 = 1; tau = 0.5: log(1 + e^{(1-2)/0.5}) = log(1 + e^-2)
    assert fgs_loss(f, protos2, torch.tensor([0]), tau=0.5).item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)


def test_bgs_eq11_12_by_hand_uses_means_and_other_classes_as_background():
    # N=3, K=2, C=3. Background of class 0 = classes 1 and 2.
    e1, e2, e3 = torch.eye(3)
    protos = torch.stack([torch.stack([e1, e1]), torch.stack([e2, e3]), torch.stack([e2, e2])])
    f = e2[None]                                        # F_BG[0] = e2
    # s_BB = mean over m != 0, k of cos(e2, P[m,k]) = mean(1, 0, 1, 1) = 0.75
    # s_BF = mean_k cos(e2, P[0,k]) = 0
    # L = log(1 + exp((0 - 0.75)/1))
    assert bgs_loss(f, protos, torch.tensor([0]), tau=1.0).item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)


def test_prototype_similarities_are_cosines():
    f = torch.tensor([[3.0, 4.0]])
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    s = prototype_similarities(f, p)
    assert s.shape == (1, 2, 1)
    assert s[0, 0, 0].item() == pytest.approx(0.6) and s[0, 1, 0].item() == pytest.approx(0.8)


def test_single_class_dataset_has_zero_similarity_losses():
    protos = torch.randn(1, 2, 4)
    f = torch.randn(3, 4)
    assert fgs_loss(f, protos, torch.zeros(3, dtype=torch.long)).item() == 0
    assert bgs_loss(f, protos, torch.zeros(3, dtype=torch.long)).item() == 0


def test_total_eq6_eq13_weights_and_switches():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 2)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pairs = torch.tensor([[0, 0], [1, 0], [1, 1]])
    protos = [torch.randn(2, 3, 5), torch.randn(2, 3, 7)]
    fg = [torch.randn(3, 5), torch.randn(3, 7)]
    bg = [torch.randn(3, 5), torch.randn(3, 7)]
    cfg = LossConfig(alpha=0.7, beta=0.4, theta1=1.5, theta2=0.25, tau=0.9)
    t = total_loss(logits, labels, fg, bg, protos, pairs, cfg)
    l_cls = cls_loss(logits, labels)
    l_fgs = (fgs_loss(fg[0], protos[0], pairs[:, 1], 0.9) + fgs_loss(fg[1], protos[1], pairs[:, 1], 0.9)) / 2
    l_bgs = (bgs_loss(bg[0], protos[0], pairs[:, 1], 0.9) + bgs_loss(bg[1], protos[1], pairs[:, 1], 0.9)) / 2
    assert t.sim.item() == pytest.approx((1.5 * l_fgs + 0.25 * l_bgs).item(), abs=1e-6)
    assert t.total.item() == pytest.approx((0.7 * l_cls + 0.4 * (1.5 * l_fgs + 0.25 * l_bgs)).item(), abs=1e-6)
    # Table 2 switches: L_CLS only
    off = total_loss(logits, labels, fg, bg, protos, pairs, LossConfig(alpha=0.7, fgs=False, bgs=False))
    assert off.total.item() == pytest.approx(0.7 * l_cls.item(), abs=1e-6)
    assert off.fgs.item() == 0 and off.bgs.item() == 0


# ---------------------------------------------------------------------- the official code's variants (loss.* keys)
def test_own_mask_for_class_and_subclass_pairs():
    from pbip_core.method.losses import own_mask

    cls_pairs = own_mask(torch.tensor([[0, 1]]), 2, 2)
    assert cls_pairs[0].tolist() == [[False, False], [True, True]]          # all K prototypes of class 1
    sub = own_mask(torch.tensor([[0, 1, 0]]), 2, 2)
    assert sub[0].tolist() == [[False, False], [True, False]]               # only prototype (1, 0)


def test_fgs_subclass_pair_counts_siblings_as_negatives():
    # N=2, K=2: P[0] = (e1, e2), P[1] = (-e1, -e2); pair (image 0, class 0, k=1), F_FG = e1
    e1, e2 = torch.eye(2)
    protos = torch.stack([torch.stack([e1, e2]), torch.stack([-e1, -e2])])
    f = e1[None]
    # own = P[0,1] = e2 -> s_FF = 0; others: P[0,0] = e1 (1), P[1,0] (-1), P[1,1] (0) -> s_FB = 0
    assert fgs_loss(f, protos, torch.tensor([[0, 0, 1]])).item() == pytest.approx(math.log(2), abs=1e-6)
    # the same feature as a class pair: s_FF = 1 + 0, s_FB = -1 + 0 -> log(1 + e^-2)
    assert fgs_loss(f, protos, torch.tensor([[0, 0]])).item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)


def test_fgs_batch_nce_is_one_ratio_over_the_batch():
    # official InfoNCELossFG: L = -log( sum_p e^{s(own)/t} / sum_p (e^{s(own)/t} + sum_others e^{s/t}) )
    e1, e2 = torch.eye(2)
    protos = torch.stack([e1[None], e2[None]])                              # N=2, K=1
    f = torch.stack([e1, (e1 + e2)])                                        # cos: [1, 0] and [.7071, .7071]
    pairs = torch.tensor([[0, 0], [1, 1]])
    c = 1 / math.sqrt(2)
    for tau in (1.0, 0.5):
        pos = math.exp(1 / tau) + math.exp(c / tau)
        allp = math.exp(1 / tau) + math.exp(0) + 2 * math.exp(c / tau)
        got = fgs_loss(f, protos, pairs, tau=tau, nce="batch").item()
        assert got == pytest.approx(math.log(allp / pos), abs=1e-6)
    # not the mean of per-pair losses (the paper's form)
    assert fgs_loss(f, protos, pairs, nce="batch").item() != pytest.approx(fgs_loss(f, protos, pairs).item())


def test_bgs_batch_nce_by_hand():
    # official InfoNCELossBG: pos_p = mean over the other prototypes of e^{s/t}, neg_p = e^{s(own)/t}
    e1, e2, e3 = torch.eye(3)
    protos = torch.stack([e1[None], e2[None], e3[None]])                    # N=3, K=1
    f = torch.stack([e2, e1])                                              # pair 0 (class 0), pair 1 (class 2)
    pairs = torch.tensor([[0, 0], [0, 2]])
    e = math.e
    pos0, neg0 = (e + 1) / 2, 1.0                                          # others of class 0: e2 (1), e3 (0)
    pos1, neg1 = (e + 1) / 2, 1.0                                          # others of class 2: e1 (1), e2 (0)
    want = -math.log((pos0 + pos1) / (pos0 + neg0 + pos1 + neg1))
    assert bgs_loss(f, protos, pairs, nce="batch").item() == pytest.approx(want, abs=1e-6)
    # one pair: -log(pos / (pos + neg)) = log(1 + 2 / (e + 1))
    assert bgs_loss(f[:1], protos, pairs[:1], nce="batch").item() == pytest.approx(math.log1p(2 / (e + 1)), abs=1e-6)


def test_cam_term_sits_inside_beta():
    # official: loss = cls + l5 * (fg + bg + 0.0005 * mean(cam4)); here beta plays l5
    logits = torch.zeros(1, 1, 2)
    labels = torch.tensor([[1.0, 0.0]])
    cam = torch.full((1, 2, 2, 2), 3.0)
    cfg = LossConfig(beta=0.1, cam_reg=0.0005, fgs=False, bgs=False)
    t = total_loss(logits, labels, [], [], None, None, cfg, last_map=cam)
    assert t.reg.item() == pytest.approx(0.0005 * 3.0)
    assert t.total.item() == pytest.approx(math.log(2) + 0.1 * 0.0005 * 3.0, rel=1e-6)
