"""The backbone interface (four feature maps F_1..F_4 at strides 4, 8, 16, 32) and the registry of families."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_INIT = "random init (no pretrained weights)"

#: backbone name -> builder ``(pretrained, weights, output_stride) -> Backbone`` (filled by the family modules)
BACKBONES: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., "Backbone"]], Callable[..., "Backbone"]]:
    """Decorator: register a builder ``(pretrained, weights, output_stride) -> Backbone`` under ``name``."""
    def deco(fn: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        BACKBONES[name] = fn
        return fn
    return deco


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
