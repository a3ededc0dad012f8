"""Eq. 2-5 on small tensors, the ClassNet shape contract and gradient flow through the FG/BG masks."""

import math

import pytest
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------- the official code's variants (model.* keys)
def test_global_threshold_scope_uses_the_unnormalised_map():
    """Issue 12.1: after the per-channel min-max every channel's max is 1, so thresholding the scaled map at
    delta x the global max equals the class scope. The global scope thresholds M' itself."""
    from pbip_core.method.model import match_masks

    maps = [torch.tensor([[[[0.2, 1.0]], [[0.1, 0.4]]]])]              # (1, 2, 1, 2): class maxima 1.0 and 0.4
    cls = match_masks(maps, (1, 2), delta=0.5, scope="class", threshold_map="minmax")
    glob = match_masks(maps, (1, 2), delta=0.5, scope="global")
    # class scope on min-max(M'): class 0 [0, 1] -> b = [0, 1]; class 1 [0, 1] -> b = [0, 1]
    assert cls.b[0, 0].tolist() == [[0, 1]] and cls.b[0, 1].tolist() == [[0, 1]]
    # global: tau = 0.5 x 1.0 = 0.5 on M': class 0 [0, 1]; class 1 (0.1, 0.4 < 0.5) -> nothing
    assert glob.b[0, 0].tolist() == [[0, 1]] and glob.b[0, 1].tolist() == [[0, 0]]
    assert torch.equal(glob.raw, maps[0]) and torch.allclose(glob.m, cls.m)


def test_threshold_scope_changes_the_matcher_built_from_the_config():
    """``--set model.threshold_scope=global`` reaches ImgMatchNet.masks and changes b where class maxima differ."""
    from pbip_core.config import make_config
    from pbip_core.engine.build import build_model

    torch.manual_seed(0)
    maps = [torch.tensor([[[[0.2, 1.0]], [[0.1, 0.4]]]])]
    bs = {}
    for scope in ("class", "global"):
        cfg = make_config("smoke", {"model.threshold_scope": scope, "model.delta": 0.5})
        model = build_model(cfg, torch.randn(2, 1, 6), TinyEncoder(), backbone=TinyBackbone())
        bs[scope] = model.matcher.masks(torch.zeros(1, 3, 1, 2), maps).b
    assert not torch.equal(bs["class"], bs["global"])


def _out(maps_per_level, k_maps=None, scale=None):
    from pbip_core.method.model import ClassNetOutput

    sub = k_maps or [m[:, :, None] for m in maps_per_level]
    sc = scale if scale is not None else torch.ones(len(maps_per_level))
    return ClassNetOutput(list(maps_per_level), torch.zeros(len(maps_per_level), 1, 1), None, sub, sc)


def test_cam_source_last_uses_the_last_level_only():
    a, b = torch.rand(1, 2, 2, 2), torch.rand(1, 2, 4, 4)
    both = ImgMatchNet(TinyEncoder(), cam_source="all").masks(torch.zeros(1, 3, 4, 4), [a, b])
    last = ImgMatchNet(TinyEncoder(), cam_source="last").masks(torch.zeros(1, 3, 4, 4), [a, b])
    assert torch.allclose(both.raw, aggregate([a, b], (4, 4)))
    assert torch.allclose(last.raw, b)                                 # level 2 alone, already at 4 x 4


def test_subclass_pairs_and_channels_by_hand():
    from pbip_core.method.model import pair_channels, subclass_pairs

    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # (B=2, N=2, K=3) logits; means: img0 cls0 = 2 -> k=2 (3 > 2) only; img1 cls0 all equal -> none;
    # img1 cls1 mean 0 -> k=0 (1 > 0); class 1 of image 0 is not labelled
    sub = torch.tensor([[[1.0, 2.0, 3.0], [9.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]]])
    pairs = subclass_pairs(labels, sub)
    assert pairs.tolist() == [[0, 0, 2], [1, 1, 0]]
    assert pair_channels(pairs, 3).tolist() == [[0, 2], [1, 3]]        # channel = class * K + k
    assert pair_channels(torch.tensor([[0, 1]]), 3).tolist() == [[0, 1]]
    # K = 1: a sub-class never exceeds its own mean (the official cls4 > cls4_expand): no pairs
    assert subclass_pairs(labels, sub[:, :, :1]).shape == (0, 3)


def test_separate_official_by_hand():
    from pbip_core.method.model import separate_official

    # one image, 3 pixels in a row; CAM logits [2, -1, 0.5]; b = [1, 0, 0]
    x = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.9, 0.3], [0.6, 0.6, 0.6]]).reshape(1, 3, 1, 3)
    raw = torch.tensor([2.0, -1.0, 0.5]).reshape(1, 1, 1, 3)
    b = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 1, 1, 3)
    fg, bg = separate_official(x, raw, b, torch.tensor([[0, 0]]))
    # FG channel 0: CAM*X = [1.0, -0.2, 0.2] -> min-max [1, 0, 1/3] -> times b -> [1, 0, 0]
    assert torch.allclose(fg[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # BG channel 1: (1 - CAM)*X = [-0.1, 1.8, 0.15] -> min-max [0, 1, 0.25/1.9] -> times (1 - b) -> [0, 1, 0.1316]
    assert torch.allclose(bg[0, 1, 0], torch.tensor([0.0, 1.0, 0.25 / 1.9]), atol=1e-6)
    # no threshold: the min-max images themselves
    fg2, _ = separate_official(x, raw, None, torch.tensor([[0, 0]]))
    assert torch.allclose(fg2[0, 0, 0], torch.tensor([1.0, 0.0, 1 / 3]), atol=1e-6)


def test_classnet_submaps_sub_logits_and_official_input():
    from pbip_core.method.model import OFFICIAL_BGR_MEAN, OFFICIAL_BGR_STD

    class Recording(TinyBackbone):
        """Normalises like a pbip Backbone ((x - mean) / std) and records what it saw."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

        def forward(self, x):
            self.seen = (x - self.mean) / self.std
            return super().forward(self.seen)

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    net = ClassNet(Recording(), torch.randn(3, 2, 6), levels=(1, 2), logit_scale=4.0)
    out = net(x)
    assert torch.allclose(out.submaps[0].mean(dim=2), out.maps[0])
    assert torch.allclose(out.sub_logits(-1).mean(dim=2), out.logits[-1], atol=1e-6)   # merge "mean" = class logit
    assert torch.allclose(net.backbone.seen, (x - net.backbone.mean) / net.backbone.std, atol=1e-6)
    net(x, gain=1.1)                                                   # ttach Multiply: the normalised input x 1.1
    assert torch.allclose(net.backbone.seen, 1.1 * (x - net.backbone.mean) / net.backbone.std, atol=1e-5)
    off = ClassNet(Recording(), torch.randn(3, 2, 6), levels=(1, 2), input_norm="official")
    off(x)
    bgr = x[:, [2, 1, 0]]
    want = (bgr - torch.tensor(OFFICIAL_BGR_MEAN).view(1, 3, 1, 1)) / torch.tensor(OFFICIAL_BGR_STD).view(1, 3, 1, 1)
    assert torch.allclose(off.backbone.seen, want, atol=1e-5)


def test_official_matcher_subclass_pairs_encoder_space():
    """pairs=subclass + separation=official + space=encoder: (P, 3) pairs, the official images, raw-space features."""
    from pbip_core.method.model import pair_channels, separate_official

    torch.manual_seed(0)
    enc = TinyEncoder(d=6)
    net = ClassNet(TinyBackbone(), torch.randn(3, 2, 6), levels=(2, 3, 4), normalize_prototypes=False)
    matcher = ImgMatchNet(enc, delta=0.5, scope="global", cam_source="last", pairs="subclass",
                          separation="official", space="encoder")
    model = PBIP(net, matcher)
    x = torch.rand(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out, match = model(x, y)
    want_pairs = [[b, c, k] for b in range(2) for c in range(3) for k in range(2)
                  if y[b, c] > 0 and out.sub_logits(-1)[b, c, k] > out.sub_logits(-1)[b, c].mean()]
    assert match.pairs.tolist() == want_pairs and len(want_pairs) > 0
    assert len(match.fg) == 1 and match.fg[0].shape == (len(want_pairs), 6)      # phi(X_FG): no MLP
    raw = F.interpolate(out.submaps[-1].flatten(1, 2) * out.scale[-1], size=(64, 64), mode="bilinear",
                        align_corners=False)
    b = (raw >= 0.5 * raw.amax(dim=(1, 2, 3), keepdim=True)).float()
    x_fg, _ = separate_official(x, raw, b, pair_channels(match.pairs, 2))
    assert torch.allclose(match.fg[0], enc.encode(x_fg), atol=1e-5)
    assert model.loss_prototypes(out)[0] is net.prototypes


# ---------------------------------------------------------------------- pseudo masks: the official options (pseudo.*)
def test_softmax_merge_of_sub_maps_by_hand():
    from pbip_core.method.pseudo import merge_submaps

    sub = torch.tensor([0.2, 0.6]).reshape(1, 1, 2, 1, 1)             # one pixel, K = 2 cosines
    assert merge_submaps(sub).item() == pytest.approx(0.4)             # eq. 2: the mean
    # official "max" merge on logits s*sub, in cosine units: sum_k softmax(s sub)_k sub_k; s = 10:
    # weights e^2 / (e^2 + e^6), e^6 / (e^2 + e^6)
    w0 = math.exp(2) / (math.exp(2) + math.exp(6))
    assert merge_submaps(sub, 10.0, "softmax").item() == pytest.approx(w0 * 0.2 + (1 - w0) * 0.6, abs=1e-6)


def test_relu_minmax_zeroes_absent_classes():
    from pbip_core.method.pseudo import relu_minmax

    cam = torch.tensor([[[[-1.0, 0.5, 1.0]], [[0.2, 0.4, 0.3]]]])       # (1, 2, 1, 3)
    out = relu_minmax(cam, torch.tensor([[True, False]]))
    # class 0: ReLU -> [0, .5, 1] -> min-max [0, .5, 1]; class 1 absent -> 0
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1e-5)
    assert out[0, 1].abs().sum() == 0


def test_fused_cam_tta_averages_flipped_and_scaled_views():
    from pbip_core.method.pseudo import TTA, fused_cam, level_cams

    torch.manual_seed(0)
    net = ClassNet(TinyBackbone(), torch.randn(3, 2, 6), levels=(2, 3)).eval()
    x = torch.rand(1, 3, 32, 32)
    present = torch.tensor([[True, True, False]])
    cam, _ = fused_cam(net, x, merge="softmax", cam_norm="relu_minmax", present=present, tta=True)
    views = []
    for flip, gain in TTA:
        with torch.no_grad():
            o = net(x.flip(-1) if flip else x, gain=gain)
        c = aggregate(level_cams(o, "softmax", "relu_minmax", present), (32, 32))
        views.append(c.flip(-1) if flip else c)
    assert len(TTA) == 6 and torch.allclose(cam, torch.stack(views).mean(0), atol=1e-6)
    assert cam[0, 2].abs().sum() == 0                                 # the absent class stays 0
    plain, _ = fused_cam(net, x)
    assert not torch.allclose(plain, cam)


def test_threshold_map_fused_versus_minmax():
    """Eq. 4 on M' (this book's reading) or on M = min-max(M'): with a negative minimum they cut differently."""
    from pbip_core.method.model import match_masks

    maps = [torch.tensor([[[[-0.6, 0.1, 0.5, 1.0]]]])]                  # (1, 1, 1, 4): M' of one class
    fused = match_masks(maps, (1, 4), delta=0.15)
    mm = match_masks(maps, (1, 4), delta=0.15, threshold_map="minmax")
    # M' >= 0.15 x 1.0 = 0.15: [0, 0, 1, 1];  M = (M' + 0.6) / 1.6 = [0, .4375, .6875, 1] >= 0.15: [0, 1, 1, 1]
    assert fused.b[0, 0].tolist() == [[0, 0, 1, 1]] and mm.b[0, 0].tolist() == [[0, 1, 1, 1]]
    assert torch.allclose(fused.m, mm.m)                                # eq. 5 weights from the same M
    assert torch.allclose(fused.fg, fused.b * fused.m) and torch.allclose(mm.bg, (1 - mm.b) * (1 - mm.m))
