"""DeepLab-v2 (Chen et al., TPAMI 2017), the stage-2 segmentation network of the paper (sec. 4.1).

DeepLab-v2 is

* a ResNet-101 whose stages 3-4 are dilated (output stride 8: ``get_backbone("resnet101", output_stride=8)``), and
* ASPP, **four parallel 3x3 atrous convolutions with rates 6, 12, 18, 24 that each output N class scores and are
  summed** (not DeepLab-v3's ASPP with 1x1 branch, batch norm, image pooling and concatenation).

On CPU the profiles ``smoke`` / ``demo`` use a lighter backbone (``stage2.backbone``). Backbones without dilation
support (EfficientNet-Lite0) run at their native stride 32, and say so.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, WeightsError
from .backbones import get_backbone

ASPP_RATES: tuple[int, ...] = (6, 12, 18, 24)   # DeepLab-v2 ASPP-L (Chen et al. 2017, sec. 3.3)
HEAD_LR_MULT = 10.0                               # the classifier (ASPP) learns 10x faster than the backbone


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: ``sum_r Conv3x3_dilation=r(F)`` for r in ``rates``; (B, C, h, w) -> (B, N, h, w).

    Each branch is a single 3x3 atrous convolution straight to N class scores (the ResNet variant of
    DeepLab-v2); the branch outputs are summed. Weights ~ N(0, 0.01), biases 0, as in the original.
    """

    def __init__(self, in_channels: int, n_classes: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, n_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLab-v2: dilated backbone (output stride 8) + :class:`ASPPv2` on its last feature map.

    ``backbone`` is a name for :func:`pbip_core.nets.backbones.get_backbone` or a module whose forward maps
    (B, 3, H, W) images in [0, 1] to a list of feature maps with ``.channels``. forward: (B, 3, H, W) in [0, 1]
    -> (B, N, H, W) logits, bilinearly upsampled to the input size.
    """

    def __init__(
        self,
        n_classes: int,
        backbone: str | nn.Module = "resnet101",
        pretrained: bool = True,
        rates: Sequence[int] = ASPP_RATES,
        output_stride: int = 8,
        weights: str | None = None,
    ):
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = _make_backbone(backbone, pretrained=pretrained, weights=weights, output_stride=output_stride)
        else:
            self.backbone_name = type(backbone).__name__
        self.backbone = backbone
        self.pretrained = bool(pretrained)
        self.n_classes = int(n_classes)
        self.aspp = ASPPv2(int(list(backbone.channels)[-1]), n_classes, rates)
        self.rates = self.aspp.rates

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last backbone map F_4, (B, C_4, H/os, W/os)."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.aspp(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Backbone at ``lr``, ASPP head at ``HEAD_LR_MULT * lr`` (DeepLab-v2)."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay, "name": "backbone"},
            {"params": list(self.aspp.parameters()), "lr": lr * HEAD_LR_MULT,
             "weight_decay": weight_decay, "name": "aspp"},
        ]


def _make_backbone(name: str, pretrained: bool, weights: str | None, output_stride: int) -> nn.Module:
    try:
        return get_backbone(name, pretrained=pretrained, weights=weights, output_stride=output_stride)
    except WeightsError as e:
        raise WeightsError(
            f"{e} (stage 2 backbone {name!r}; --set stage2.pretrained=false trains it from random "
            "initialisation, which the paper does not do)"
        ) from None
    except (ConfigError, ValueError, NotImplementedError, TypeError) as e:
        if output_stride == 32:
            raise
        # Backbones without dilation support (e.g. EfficientNet-Lite0) run at their native stride.
        print(f"stage 2: {name} has no output_stride={output_stride} ({e}); using its native stride 32", flush=True)
        return get_backbone(name, pretrained=pretrained, weights=weights, output_stride=32)
