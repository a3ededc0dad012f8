"""The frozen image encoder phi_e behind one interface, and the registry of encoder families.

An encoder turns an RGB image in [0, 1] into the d-dimensional embedding that the prototype bank (sec. 3.2, eq. 1)
clusters and that the FG/BG losses (sec. 3.5, eq. 9-12) compare with the prototypes. It is frozen (``eval()``, no
parameter requires grad) but differentiable with respect to its input, so the losses reach the CAMs through the
masked images. Each family lives in its own module and registers its builders with :func:`register_encoder`.

``pooled_encode`` is a fast approximation of encoding masked images: the image is encoded once and the masks
weight the average of the last feature map. For global-average-pooling CNNs and Swin (whose pooler is the mean
of the final tokens) it equals ``encode`` when the mask is all ones; for a masked image it is not the same
(the network sees the unmasked context). For CLIP/PLIP/DINOv2 the real embedding comes from the CLS token, so
``pooled_encode`` averages patch tokens instead: an approximation even with an all-ones mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_SOURCE = "RANDOM WEIGHTS (architecture only; timing use)"

#: encoder name -> builder ``(weights, random_init, input_size) -> ImageEncoder`` (filled by the family modules)
ENCODERS: dict[str, Callable[..., "ImageEncoder"]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., "ImageEncoder"]], Callable[..., "ImageEncoder"]]:
    """Decorator: register a builder ``(weights, random_init, input_size) -> ImageEncoder`` under ``name``."""
    def deco(fn: Callable[..., "ImageEncoder"]) -> Callable[..., "ImageEncoder"]:
        ENCODERS[name] = fn
        return fn
    return deco


def _tokens_to_grid(tokens: Tensor) -> Tensor:
    """(B, L, C) square token grid -> (B, C, h, w)."""
    b, n, c = tokens.shape
    h = int(round(n ** 0.5))
    if h * h != n:
        raise ValueError(f"cannot arrange {n} tokens as a square grid")
    return tokens.transpose(1, 2).reshape(b, c, h, h)

def weighted_pool(fmap: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Weighted spatial average of a feature map.

    fmap (B, C, h, w); weights (B, R, H, W) in [0, 1], resized to (h, w) by area averaging (a weight of a
    feature cell = the share of its pixels' weights). Returns (B, R, C): sum_p w_rp f_p / sum_p w_rp.
    """
    w = weights.to(fmap.dtype)
    if w.shape[-2:] != fmap.shape[-2:]:
        w = F.adaptive_avg_pool2d(w, fmap.shape[-2:])   # 'area' resizing; exact for integer ratios
    num = torch.einsum("brhw,bchw->brc", w, fmap)
    return num / w.sum(dim=(2, 3)).clamp_min(eps).unsqueeze(-1)

class ImageEncoder(nn.Module):
    """Frozen encoder phi_e: (B, 3, H, W) RGB in [0, 1] -> (B, d).

    Subclasses implement :meth:`_features` (preprocessed input -> last spatial features) and, when the model
    does something after spatial pooling, :meth:`head` and :meth:`encode`.
    """

    name: str
    dim: int
    input_size: int
    pretrained_source: str

    def __init__(self, name: str, dim: int, input_size: int, mean: Sequence[float], std: Sequence[float],
                 pretrained_source: str):
        super().__init__()
        self.name, self.dim, self.input_size, self.pretrained_source = name, dim, input_size, pretrained_source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def freeze(self) -> "ImageEncoder":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Always stays in eval mode (frozen BatchNorm / dropout), even inside a model set to train()."""
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S), S = input_size: bilinear resize, then (x - mean) / std."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def _features(self, xp: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, h, w): last spatial features (CNN maps; ViT/Swin tokens as a grid)."""
        return self._features(self.preprocess(x))

    def head(self, pooled: Tensor) -> Tensor:
        """(..., C) -> (..., d): what the model does after spatial pooling (identity for GAP CNN features)."""
        return pooled

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, d): the model's own image embedding (here: GAP of the feature map)."""
        return self.head(self.feature_map(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def pooled_encode(self, x: Tensor, weights: Tensor) -> Tensor:
        """Approximate FG/BG embeddings: x (B, 3, H, W) encoded once, weights (B, R, H, W) -> (B, R, d).

        Each of the R weight maps (e.g. a CAM or 1 - CAM per class) averages the feature map (:func:`weighted_pool`)
        and the result goes through :meth:`head`. Differs from ``encode(x * mask)``: the features still see the
        unmasked context, and for CLS-token models (CLIP, PLIP, DINOv2) patch tokens replace the CLS token.
        """
        if weights.ndim != 4 or weights.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: weights must be (B, R, H, W) with B = {x.shape[0]}, got "
                             f"{tuple(weights.shape)}")
        return self.head(weighted_pool(self.feature_map(x), weights))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, source={self.pretrained_source!r}"

def _processor_mean_std(path: Path | None, default_mean, default_std):
    """image_mean / image_std from a local ``preprocessor_config.json`` when there is one."""
    if path is not None and (path / "preprocessor_config.json").exists():
        cfg = json.loads((path / "preprocessor_config.json").read_text())
        return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    return default_mean, default_std
