"""Hierarchical backbones (pbip_core.nets.backbones): the F_1..F_4 shape contract, weights and their errors.

Random initialisations are built offline from configs; nothing is downloaded.
"""

from __future__ import annotations


import pytest
import torch

from pbip_core.nets import weights as W
from pbip_core.nets.backbones import BACKBONES, available_backbones, get_backbone
from pbip_core.errors import ConfigError, WeightsError

EXPECTED_CHANNELS = {   # C_1..C_4 of the published architectures
    "mit_b1": (64, 128, 320, 512), "resnet18": (64, 128, 256, 512), "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048), "efficientnet_lite0": (24, 40, 112, 320),
    "densenet121": (256, 512, 1024, 1024),
}


pytestmark = pytest.mark.usefixtures("isolated_pbip_cache")


def _check_shapes(feats, channels, b, h, w, strides=(4, 8, 16, 32)):
    assert len(feats) == 4
    for f, c, s in zip(feats, channels, strides):
        assert f.shape == (b, c, h // s, w // s)


def test_registry_is_complete():
    assert set(BACKBONES) == set(EXPECTED_CHANNELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_shape_contract_random_init(name):
    torch.manual_seed(0)
    bb = get_backbone(name, pretrained=False).eval()
    assert bb.channels == EXPECTED_CHANNELS[name]
    assert "random init" in bb.pretrained_source
    with torch.no_grad():
        for h, w in ((64, 64), (96, 96)):
            _check_shapes(bb(torch.rand(2, 3, h, w)), bb.channels, 2, h, w)


def test_resnet101_output_stride_8():
    bb = get_backbone("resnet101", pretrained=False, output_stride=8).eval()
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, 64, 64))
    _check_shapes(feats, bb.channels, 1, 64, 64, strides=(4, 8, 8, 8))


def test_output_stride_unsupported():
    with pytest.raises(ConfigError, match="output_stride 32 or 16"):
        get_backbone("mit_b1", pretrained=False, output_stride=8)
    with pytest.raises(ConfigError, match="output_stride must be"):
        get_backbone("resnet18", pretrained=False, output_stride=4)


def test_mit_b1_output_stride_16_is_the_official_strides():
    """model.output_stride=16 (official: MiT-B1 with stride [4, 2, 2, 1]): stage 4 stays at H/16, same weights."""
    import torch

    b32 = get_backbone("mit_b1", pretrained=False)
    b16 = get_backbone("mit_b1", pretrained=False, output_stride=16)
    assert b16.model.config.strides == [4, 2, 2, 1]
    shapes = [tuple(f.shape[-2:]) for f in b16(torch.rand(1, 3, 64, 64))]
    assert shapes == [(16, 16), (8, 8), (4, 4), (4, 4)]
    assert {k: v.shape for k, v in b16.state_dict().items()} == {k: v.shape for k, v in b32.state_dict().items()}


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'.*mit_b1"):
        get_backbone("vgg")


@pytest.mark.parametrize("name", ["mit_b1", "resnet18"])
def test_hub_backbones_offline_raise_weights_error(name, monkeypatch):
    entry = W.WEIGHTS[name]
    if W.hf_cached(entry.hub_id) or W.hf_cached(entry.hub_id, "model.safetensors"):
        pytest.skip(f"{entry.hub_id} is in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(entry.env_var, raising=False)
    with pytest.raises(WeightsError, match=f"pbip_core/data/manifest.yaml: weights.{name}.*{entry.env_var}"):
        get_backbone(name, pretrained=True)


def test_weights_path_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        get_backbone("resnet50", weights=str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="no timm weights file"):
        get_backbone("resnet50", weights=str(tmp_path))


def test_pretrained_efficientnet_lite0_loads_real_weights():
    torch.manual_seed(0)
    pre = get_backbone("efficientnet_lite0", pretrained=True).eval()
    rnd = get_backbone("efficientnet_lite0", pretrained=False).eval()
    assert "ImageNet" in pre.pretrained_source
    state = W.efficientnet_lite0_state()
    for k, v in pre.body.state_dict().items():      # every backbone tensor comes from the package's weights
        assert torch.equal(v, state[k]), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fp, fr = pre(x), rnd(x)
    _check_shapes(fp, pre.channels, 2, 64, 64)
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(fp, fr))
    # normalisation happens inside: (255 x - 127) / 128
    with torch.no_grad():
        direct = pre.body((x * 255 - 127) / 128)
    assert torch.allclose(direct[-1], fp[-1], atol=1e-5)


def test_pretrained_densenet121_matches_the_encoder():
    """The backbone's last map is the encoder's feature map (same converted weights, same input scaling)."""
    from pbip_core.nets.encoders import get_encoder

    bb = get_backbone("densenet121", pretrained=True).eval()
    enc = get_encoder("pathmnist-densenet121", input_size=64)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = bb(x)
        _check_shapes(feats, bb.channels, 1, 64, 64)
        assert torch.allclose(feats[-1], enc.feature_map(x), atol=1e-5)


def test_backbone_is_trainable_and_differentiable():
    bb = get_backbone("resnet18", pretrained=False)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)   # train-mode BN needs > 1 value
    sum(f.mean() for f in bb(x)).backward()
    assert x.grad is not None and any(p.grad is not None for p in bb.parameters())


def test_available_backbones():
    av = available_backbones()
    assert set(av) == set(BACKBONES)
    assert av["efficientnet_lite0"] == "available" and av["densenet121"] == "available"


def test_local_weights_dirs_are_loaded(tmp_path, monkeypatch):
    """The real loading paths (local directory / file, as a user provides them offline) with saved random weights."""
    import timm
    from transformers import SegformerModel

    from pbip_core.nets.backbones import mit_b1_config

    torch.manual_seed(0)
    ref = SegformerModel(mit_b1_config())
    ref.save_pretrained(tmp_path / "mit")
    monkeypatch.setenv("PBIP_WEIGHTS_MIT_B1", str(tmp_path / "mit"))
    bb = get_backbone("mit_b1")
    assert str(tmp_path / "mit") in bb.pretrained_source
    for k, v in ref.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k

    net = timm.create_model("resnet18", pretrained=False)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    bb = get_backbone("resnet18", weights=str(tmp_path / "r18.pth"), output_stride=8)
    own = bb.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in net.state_dict().items() if k in own)
