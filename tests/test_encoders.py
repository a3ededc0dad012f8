"""Frozen image encoders (pbip_core.nets.encoders) and the offline weight conversions (pbip_core.nets.weights).

Nothing here downloads: the hub encoders are checked with tiny random configs and through their error paths.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pbip_core.nets import weights as W
from pbip_core.nets.encoders import (ENCODERS, PATHMNIST_CLASSES, CLIPImageEncoder, Dinov2Encoder, available_encoders,
                                get_encoder, get_text_encoder, medclip_vision_from_state, swin_tiny_config,
                                weighted_pool)
from pbip_core.errors import ConfigError, PBIPError, WeightsError
from pbip_core.io import read_rgb

REPO = Path(__file__).resolve().parents[1]
CRC_TILES = Path(__file__).parent / "fixtures" / "crc-val-he-7k-sample"


pytestmark = pytest.mark.usefixtures("isolated_pbip_cache")


@pytest.fixture(scope="module")
def densenet():
    return get_encoder("pathmnist-densenet121")


@pytest.fixture(scope="module")
def effnet():
    return get_encoder("imagenet-efficientnet-lite0")


@pytest.fixture(scope="module")
def small():
    """The offline encoders run at 96x96 (the same weights; input_size only changes the resize)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = get_encoder(name, input_size=96)
        return cache[name]
    return get


def _crc_tiles() -> tuple[list[Path], np.ndarray]:
    files = sorted(CRC_TILES.glob("*.png"))
    return files, np.stack([read_rgb(f) for f in files]).astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------------
# offline encoders: real weights


def test_densenet_conversion_reproduces_keras_predictions(densenet, tmp_path):
    """Converted DenseNet121 == the package's own Keras model (torch backend) on 32 real H&E tiles."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed: cannot run the reference Keras model")
    files, x = _crc_tiles()
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, keras\n"
              "m = keras.saving.load_model(sys.argv[1])\n"
              "np.save(sys.argv[3], np.asarray(m.predict(np.load(sys.argv[2]), batch_size=8, verbose=0)))\n")
    env = {**os.environ, "KERAS_BACKEND": "torch"}   # the backend is fixed at keras import: separate process
    subprocess.run([sys.executable, "-c", script, str(W.capricorn_keras_path()), str(tmp_path / "x.npy"),
                    str(tmp_path / "p.npy")], env=env, check=True, timeout=600)
    keras_probs = np.load(tmp_path / "p.npy")
    with torch.no_grad():
        torch_probs = densenet.classify(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert keras_probs.shape == torch_probs.shape == (32, 24)
    assert np.abs(keras_probs - torch_probs).max() < 1e-4
    assert (keras_probs.argmax(1) == torch_probs.argmax(1)).all()
    truth = [PATHMNIST_CLASSES.index(f.name.split("-")[0]) for f in files]
    correct = int((torch_probs.argmax(1) == np.array(truth)).sum())
    print(f"\npathmnist-densenet121 head: {correct}/32 CRC-VAL-HE-7K tiles classified correctly")


def test_densenet_keras_conventions(densenet):
    """BN epsilon is Keras' 1.001e-5, weights loaded, the features are 1024-d on [0, 1] input (no mean/std)."""
    enc = densenet
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 121 and all(m.eps == 1.001e-5 for m in bns)   # 120 convs + norm5 (Keras: 121 BN layers)
    assert enc.dim == 1024 and enc.input_size == 224
    assert torch.equal(enc.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(enc.std, torch.ones(1, 3, 1, 1))
    assert "not a pathology foundation model".lower() in enc.pretrained_source.lower()
    # running variances are positive (BN vars were read in gamma, beta, mean, variance order)
    assert all((m.running_var > 0).all() for m in bns)


def test_efficientnet_lite0_is_an_imagenet_classifier(effnet):
    """All package keys map onto timm's tf_efficientnet_lite0 and a natural photo gets its known ImageNet label."""
    raw = torch.load(W.efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    renamed = W.rename_efficientnet_lite0(raw)
    assert len(renamed) == len(raw) == len(effnet.net.state_dict())
    assert effnet.dim == 1280
    import matplotlib
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.exists():
        pytest.skip(f"{photo} missing (matplotlib sample data)")
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    with torch.no_grad():
        p = effnet.classify(torch.from_numpy(img).permute(2, 0, 1)[None])[0]
    # The classic label of this portrait (TF/Keras classification tutorials): 652 = "military uniform".
    assert int(p.argmax()) == 652
    assert float(p.max()) > 100 / 1000   # far from uniform


# ---------------------------------------------------------------------------------------------------------------
# interface contract on the offline encoders


@pytest.mark.parametrize("name", ["pathmnist-densenet121", "imagenet-efficientnet-lite0"])
def test_frozen_but_differentiable(name, small):
    enc = small(name)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()                      # a model.train() around the encoder must not unfreeze its BatchNorm
    assert not enc.training and not any(m.training for m in enc.modules())
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    z = enc.encode(x)
    assert z.shape == (2, enc.dim)
    z.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize("name", ["pathmnist-densenet121", "imagenet-efficientnet-lite0"])
def test_pooled_encode_matches_gap(name, small):
    """All-ones weights: pooled_encode == head(mean feature_map) == encode for GAP CNN encoders."""
    enc = small(name)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        pooled = enc.pooled_encode(x, torch.ones(2, 3, 96, 96))
        fmap = enc.feature_map(x)
        z = enc.encode(x)
    assert pooled.shape == (2, 3, enc.dim)
    assert fmap.shape == (2, enc.dim, 3, 3)
    assert torch.allclose(pooled[:, 0], enc.head(fmap.mean(dim=(2, 3))), atol=1e-5)
    assert torch.allclose(pooled[:, 1], z, atol=1e-5) and torch.allclose(pooled[:, 2], z, atol=1e-5)


def test_pooled_encode_region_average(small):
    """A mask covering the left third of the image averages exactly the left column of a 3x3 feature grid."""
    enc = small("imagenet-efficientnet-lite0")
    x = torch.rand(1, 3, 96, 96)
    w = torch.zeros(1, 2, 96, 96)
    w[:, 0, :, :32] = 1.0        # left third
    w[:, 1, :, 32:] = 0.5        # the rest, at half weight (normalisation removes the scale)
    with torch.no_grad():
        fmap = enc.feature_map(x)                                   # (1, 1280, 3, 3)
        out = enc.pooled_encode(x, w)
    assert torch.allclose(out[0, 0], fmap[0, :, :, 0].mean(dim=1), atol=1e-5)
    assert torch.allclose(out[0, 1], fmap[0, :, :, 1:].mean(dim=(1, 2)), atol=1e-5)


def test_weighted_pool_area_resize():
    fmap = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 2, 2)   # channel c, cell (i, j)
    w = torch.zeros(1, 1, 8, 8)
    w[..., :4, :4] = 1.0          # exactly cell (0, 0)
    assert torch.allclose(weighted_pool(fmap, w)[0, 0], fmap[0, :, 0, 0])
    w = torch.zeros(1, 1, 8, 8)
    w[..., :4, :2] = 1.0          # half of cell (0, 0): same direction, normalised
    assert torch.allclose(weighted_pool(fmap, w)[0, 0], fmap[0, :, 0, 0])


def test_preprocess_resizes_and_normalises(effnet):
    x = torch.full((1, 3, 50, 70), 127 / 255)
    xp = effnet.preprocess(x)
    assert xp.shape == (1, 3, 224, 224)
    assert torch.allclose(xp, torch.zeros_like(xp), atol=1e-6)      # (255 x - 127) / 128 = 0
    with pytest.raises(ValueError):
        effnet.preprocess(torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# transformers encoders, tiny random configs (no download)


def _old_swin_key(k: str) -> str:
    """transformers 5 Swin key -> the 4.x name MedCLIP's checkpoint uses (written from MedCLIP's key list)."""
    for new, old in [("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
                     ("attention.v_proj", "attention.self.value"), ("attention.o_proj", "attention.output.dense"),
                     ("attention.relative_position_bias.relative_position_bias_table",
                      "attention.self.relative_position_bias_table"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]:
        k = k.replace(new, old)
    return k


def test_medclip_maps_a_medclip_state_dict():
    from transformers import SwinModel

    torch.manual_seed(0)
    cfg = swin_tiny_config(image_size=32, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    ref = SwinModel(cfg).eval()
    proj = torch.randn(8, ref.num_features)
    state = {f"vision_model.model.{_old_swin_key(k)}": v.clone() for k, v in ref.state_dict().items()}
    state["vision_model.projection_head.weight"] = proj
    state["text_model.model.embeddings.word_embeddings.weight"] = torch.randn(5, 4)   # ignored
    state["logit_scale"] = torch.tensor(4.6)
    enc = medclip_vision_from_state(state, config=cfg, source="fake").freeze()
    enc.input_size = 32
    assert enc.dim == 8 and not any(p.requires_grad for p in enc.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.swin.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    z = enc.encode(x)
    with torch.no_grad():
        expect = ref(pixel_values=enc.preprocess(x)).pooler_output @ proj.T
    assert torch.allclose(z, expect, atol=1e-5)
    # Swin's pooler is the mean of the final tokens: pooled_encode with ones is exact
    assert torch.allclose(enc.pooled_encode(x, torch.ones(2, 1, 32, 32))[:, 0], z, atol=1e-5)
    z.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(WeightsError, match="not a MedCLIP checkpoint"):
        medclip_vision_from_state({"foo": torch.zeros(1)}, config=cfg)


def test_tiny_clip_encoder_contract():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(cfg)
    enc = CLIPImageEncoder("clip", model, "tiny random").freeze()
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    z = enc.encode(x)
    with torch.no_grad():
        assert torch.allclose(z, model(pixel_values=enc.preprocess(x)).image_embeds, atol=1e-6)
        fmap = enc.feature_map(x)
        assert fmap.shape == (2, 32, 4, 4)
        pooled = enc.pooled_encode(x, torch.ones(2, 2, 40, 40))
        assert pooled.shape == (2, 2, 16)
        assert torch.allclose(pooled[:, 0], enc.head(fmap.mean(dim=(2, 3))), atol=1e-5)
    z.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in enc.parameters())


def test_tiny_dinov2_encoder_contract():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=28, patch_size=14)
    enc = Dinov2Encoder(Dinov2Model(cfg), "tiny random", input_size=28).freeze()
    x = torch.rand(2, 3, 28, 28, requires_grad=True)
    z = enc.encode(x)
    assert z.shape == (2, 32)
    with torch.no_grad():
        out = enc.model(pixel_values=enc.preprocess(x))
        assert torch.allclose(z, out.last_hidden_state[:, 0], atol=1e-6)           # CLS token
        assert enc.feature_map(x).shape == (2, 32, 2, 2)
        assert torch.allclose(enc.pooled_encode(x, torch.ones(2, 1, 28, 28))[:, 0],
                              out.last_hidden_state[:, 1:].mean(1), atol=1e-5)      # mean patch token
    z.pow(2).sum().backward()      # (a plain sum of a LayerNorm output has zero gradient)
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# registry and errors


def test_unknown_encoder_names_the_choices():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'.*pathmnist-densenet121"):
        get_encoder("nope")


@pytest.mark.parametrize("name", ["clip", "plip", "dinov2"])
def test_hub_encoders_offline_raise_weights_error(name, monkeypatch):
    entry = W.WEIGHTS[name]
    if W.hf_cached(entry.hub_id):
        pytest.skip(f"{entry.hub_id} is in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(entry.env_var, raising=False)
    with pytest.raises(WeightsError, match=f"pbip_core/data/manifest.yaml: weights.{name}.*{entry.env_var}"):
        get_encoder(name)


def test_missing_weights_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("PBIP_WEIGHTS_MEDCLIP", raising=False)
    with pytest.raises(WeightsError, match="weights.medclip.*PBIP_WEIGHTS_MEDCLIP"):
        get_encoder("medclip")
    with pytest.raises(WeightsError, match="does not exist"):
        get_encoder("medclip", weights=str(tmp_path / "nowhere"))
    monkeypatch.setenv("PBIP_WEIGHTS_MEDCLIP", str(tmp_path))           # a folder without pytorch_model.bin
    with pytest.raises(WeightsError, match="pytorch_model.bin"):
        get_encoder("medclip")
    with pytest.raises(WeightsError, match="PBIP_WEIGHTS_CLIP"):
        monkeypatch.setenv("PBIP_WEIGHTS_CLIP", str(tmp_path / "missing"))
        get_encoder("clip")
    with pytest.raises(PBIPError, match="not implemented"):
        get_text_encoder("medclip")


def test_text_encoder_offline(monkeypatch):
    if W.hf_cached(W.WEIGHTS["clip"].hub_id):
        pytest.skip("CLIP is in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PBIP_WEIGHTS_CLIP", raising=False)
    with pytest.raises(WeightsError, match="weights.clip"):
        get_text_encoder("clip")


def test_random_init_is_labelled():
    enc = get_encoder("imagenet-efficientnet-lite0", random_init=True)
    assert enc.pretrained_source.startswith("RANDOM WEIGHTS")


def test_available_encoders_lists_all():
    av = available_encoders()
    assert set(av) == set(ENCODERS)
    assert av["pathmnist-densenet121"] == "available"
    assert av["imagenet-efficientnet-lite0"] == "available"


def test_conversion_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PBIP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    calls = []

    def convert(p):
        calls.append(p)
        return {"w": torch.ones(2)}

    a = W.cached_conversion("t", src, convert)
    b = W.cached_conversion("t", src, convert)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"t-{W.file_digest(src)}.pt"]   # no temp left
    src.write_bytes(b"abcd")               # a changed source file is converted again
    W.cached_conversion("t", src, convert)
    assert len(calls) == 2


def test_clip_from_a_local_directory(tmp_path, monkeypatch):
    """The local-directory path of a hub encoder (what PBIP_WEIGHTS_CLIP points at), with a tiny saved model."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], '
                                                               '"image_std": [0.25, 0.25, 0.25]}')
    monkeypatch.setenv("PBIP_WEIGHTS_CLIP", str(tmp_path / "clip"))
    enc = get_encoder("clip")
    assert enc.dim == 16 and enc.input_size == 32 and str(tmp_path / "clip") in enc.pretrained_source
    assert torch.allclose(enc.std.flatten(), torch.full((3,), 0.25))
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.encode(torch.rand(1, 3, 32, 32)).shape == (1, 16)
