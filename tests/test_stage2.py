"""Stage 2: DeepLab-v2 (ASPP rates 6/12/18/24 summed, output stride 8; pbip_core.nets.deeplab) and its training loop
(pbip_core.engine.stage2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_dataset
from pbip_core.config import make_config
from pbip_core.data import list_pairs, list_train
from pbip_core.engine import stage2
from pbip_core.engine.runtime import lr_lambda
from pbip_core.errors import DataError, PBIPError, TrainingError
from pbip_core.nets import deeplab

N = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return deeplab.DeepLabV2(N, "resnet18", pretrained=False).eval()


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 48, 80)])
def test_shape_contract(model, shape):
    with torch.no_grad():
        out = model(torch.rand(*shape))
    assert out.shape == (shape[0], N, shape[2], shape[3])
    assert torch.isfinite(out).all()


def test_output_stride_8(model):
    with torch.no_grad():
        f = model.features(torch.rand(1, 3, 64, 96))
    assert f.shape[-2:] == (64 // 8, 96 // 8)
    assert f.shape[1] == list(model.backbone.channels)[-1]


def test_aspp_rates_and_branches_are_summed(model):
    assert model.rates == (6, 12, 18, 24) == deeplab.ASPP_RATES
    convs = list(model.aspp.branches)
    assert [c.dilation for c in convs] == [(r, r) for r in (6, 12, 18, 24)]
    assert all(c.kernel_size == (3, 3) and c.padding == c.dilation and c.out_channels == N for c in convs)
    x = torch.randn(1, convs[0].in_channels, 9, 9)
    with torch.no_grad():
        total = model.aspp(x)
        by_hand = sum(F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation) for c in convs)
        assert torch.allclose(total, by_hand, atol=1e-6)
        # with all branches but one zeroed, the output is exactly that branch
        aspp = deeplab.ASPPv2(convs[0].in_channels, N)
        aspp.load_state_dict(model.aspp.state_dict())
        for i, c in enumerate(aspp.branches):
            if i != 2:
                c.weight.zero_(); c.bias.zero_()
        assert torch.allclose(aspp(x), convs[2](x), atol=1e-6)


def test_param_groups_head_gets_10x():
    m = deeplab.DeepLabV2(N, "resnet18", pretrained=False)
    groups = m.param_groups(2.5e-4, 5e-4)
    assert [g["name"] for g in groups] == ["backbone", "aspp"]
    assert groups[0]["lr"] == 2.5e-4 and groups[1]["lr"] == pytest.approx(2.5e-3)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())


def test_poly_schedule():
    f = lr_lambda("poly", 100, power=0.9)
    assert f(0) == 1.0 and f(100) == 0.0
    assert f(50) == pytest.approx(0.5 ** 0.9)


def test_paper_profile_uses_deeplab_v2_defaults():
    s2 = make_config("paper").stage2
    assert (s2.backbone, s2.lr, s2.momentum, s2.weight_decay, s2.power) == ("resnet101", 2.5e-4, 0.9, 5e-4, 0.9)


# ------------------------------------------------------------------------------------------ loss
def test_loss_ignores_background_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, N, 2, 3)
    bg = N
    target = torch.tensor([[[0, 1, bg], [bg, 3, 2]]])
    loss = stage2.stage2_loss(logits, target, bg)
    # by hand: mean of -log softmax over the 4 labelled pixels only
    logp = logits.log_softmax(1)[0]
    pix = [((0, 0), 0), ((0, 1), 1), ((1, 1), 3), ((1, 2), 2)]
    expected = -sum(logp[c, i, j] for (i, j), c in pix) / len(pix)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # changing logits on background pixels changes nothing
    logits2 = logits.clone()
    logits2[..., 0, 2] += 10
    logits2[..., 1, 0] -= 7
    assert stage2.stage2_loss(logits2, target, bg).item() == pytest.approx(loss.item(), rel=1e-6)
    # an all-background batch gives 0, not NaN, with a gradient path
    zero = stage2.stage2_loss(logits.requires_grad_(), torch.full((1, 2, 3), bg), bg)
    assert zero.item() == 0.0
    zero.backward()
    # other out-of-range labels (e.g. 255) are ignored too
    t255 = target.clone(); t255[0, 0, 0] = 255
    assert math.isfinite(stage2.stage2_loss(logits.detach(), t255, bg).item())


# ------------------------------------------------------------------------------------------ training
def _pseudo_masks(root, out, seed=0):
    """Pseudo masks for the training images: blocks of the image's classes and background (index N)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, label in list_train(root):
        w, h = Image.open(path).size
        present = np.flatnonzero(label).tolist() + [N]
        grid = rng.choice(present, size=(h // 8, w // 8))
        mask = np.kron(grid, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(out / path.name)
    return out


@pytest.fixture
def ds(tmp_path):
    root = make_dataset(tmp_path, n_train=8, n_val=2, n_test=3, size=32)
    return root, _pseudo_masks(root, tmp_path / "masks")


def _cfg(**kw):
    ov = {"stage2.image_size": 32, "stage2.epochs": 2, "stage2.batch_size": 4, "stage2.backbone": "resnet18",
          "stage2.pretrained": False, "stage2.lr": 1e-3, "train.device": "cpu", "data.augment": True}
    ov.update(kw)
    return make_config("smoke", ov)


def test_train_stage2_end_to_end(ds, tmp_path, capsys):
    root, masks = ds
    out = tmp_path / "run2"
    res = stage2.train_stage2(_cfg(), root, masks, out)
    printed = capsys.readouterr().out
    assert "RESNET18" in printed and "RANDOM INITIALISATION" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"val", "test", "run"}
    assert m["run"]["device"] == "cpu" and m["run"]["dtype"] == "float32" and m["run"]["random_weights"] == ["backbone"]
    for split in ("val", "test"):
        assert {"miou", "fwiou", "biou", "dice", "per_class_iou"} <= set(m[split])
        assert 0.0 <= m[split]["miou"] <= 1.0
    assert m["test"]["n_images"] == 3 and res["test"]["n_images"] == 3
    preds = sorted(p.name for p in (out / "pred_test").glob("*.png"))
    assert preds == sorted(mp.name for _, mp in list_pairs(root, "test"))
    for p in (out / "pred_test").glob("*.png"):
        im = Image.open(p)
        assert im.mode == "P" and im.size == (32, 32)
        assert set(np.unique(np.asarray(im))) <= set(range(N))  # argmax over tissue classes only
    for name in ("config.yaml", "last.pt", "history.json"):
        assert (out / name).is_file()
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_resume_continues_at_the_right_epoch(ds, tmp_path, monkeypatch):
    root, masks = ds
    cfg = _cfg(**{"stage2.epochs": 2})
    ref = stage2.train_stage2(cfg, root, masks, tmp_path / "ref")
    ref_state = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)["model"]

    # interrupt during epoch 2 (2 steps per epoch: call 3 is epoch 2, step 1)
    real_loss, calls = stage2.stage2_loss, []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(stage2, "stage2_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        stage2.train_stage2(cfg, root, masks, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "run" / "metrics.json").exists()

    monkeypatch.setattr(stage2, "stage2_loss", real_loss)
    res = stage2.train_stage2(cfg, root, masks, tmp_path / "run", resume=True)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    # resumed training is the same as uninterrupted training (CPU, fixed seeds)
    for k, v in ref_state.items():
        assert torch.allclose(v.float(), ckpt["model"][k].float(), atol=1e-6), k
    assert res["test"]["miou"] == pytest.approx(ref["test"]["miou"])


def test_nan_loss_raises_training_error(ds, tmp_path, monkeypatch):
    root, masks = ds
    monkeypatch.setattr(stage2, "stage2_loss", lambda logits, *a, **k: logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 1, step 1.*stage2\.lr"):
        stage2.train_stage2(_cfg(), root, masks, tmp_path / "run")


def test_missing_masks_raise_data_error(ds, tmp_path):
    root, masks = ds
    files = sorted(masks.glob("*.png"))
    for f in files[:3]:
        f.unlink()
    with pytest.raises(DataError, match=r"3 of 8 training images have no mask") as e:
        stage2.train_stage2(_cfg(), root, masks, tmp_path / "run")
    first_missing = sorted(p.name for p, _ in list_train(root) if not (masks / p.name).exists())[0]
    assert first_missing in str(e.value)


def test_ms_flip_inference_averages_probabilities(model):
    x = torch.rand(1, 3, 32, 32)
    p = stage2.predict_probs(model, x, (40, 40), ms_flip=True)
    assert p.shape == (1, N, 40, 40)
    assert torch.allclose(p.sum(1), torch.ones(1, 40, 40), atol=1e-5)
    # by hand: mean over 3 scales x 2 flips of softmax at the output size
    ps = []
    with torch.no_grad():
        for s in (0.75, 1.0, 1.25):
            xi = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            for flip in (False, True):
                lg = model(xi.flip(-1) if flip else xi)
                lg = lg.flip(-1) if flip else lg
                ps.append(F.interpolate(lg, size=(40, 40), mode="bilinear", align_corners=False).softmax(1))
    assert torch.allclose(p, torch.stack(ps).mean(0), atol=1e-6)


def test_cli_stage2(ds, tmp_path):
    from pbip_core.cli import main

    root, masks = ds
    out = tmp_path / "cli"
    rc = main(["stage2", "--data", str(root), "--masks", str(masks), "--out", str(out), "--profile", "smoke",
               "--set", "stage2.image_size=32", "--set", "train.device=cpu", "--set", "stage2.epochs=1"])
    assert rc == 0 and (out / "metrics.json").is_file()
    assert main(["stage2", "--data", str(root), "--masks", str(tmp_path / "nope"), "--out", str(out),
                 "--profile", "smoke"]) == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_stage2_mixed_precision(ds, tmp_path, amp, capsys):
    """train.amp applies to stage 2 too: autocast of the network's forward, fp16 with a gradient scaler."""
    root, masks = ds
    res = stage2.train_stage2(_cfg(**{"train.amp": amp, "stage2.epochs": 1}), root, masks, tmp_path / "r")
    assert res["run"]["amp"] == amp and "autocast" in capsys.readouterr().out
    assert all(math.isfinite(h["loss"]) for h in res["history"])
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert bool(ckpt["scaler"]) == (amp == "fp16")


def test_stage2_paper_profile_refuses_the_cpu(ds, tmp_path):
    root, masks = ds
    with pytest.raises(PBIPError, match="allow_cpu"):
        stage2.train_stage2(make_config("paper"), root, masks, tmp_path / "r", device="cpu")
