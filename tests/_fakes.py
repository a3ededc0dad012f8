"""Small stand-ins used by unit tests of the method's equations (not pretrained models; never used outside tests)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyBackbone(nn.Module):
    """Four strided convs: F_i (B, C_i, H/2^(i+1), W/2^(i+1)) with C = (4, 8, 16, 32)."""

    name = "tiny-test-backbone"
    pretrained_source = "random init (test stand-in)"

    def __init__(self, channels=(4, 8, 16, 32)):
        super().__init__()
        self.channels = tuple(channels)
        self.stem = nn.Conv2d(3, channels[0], 3, stride=4, padding=1)
        self.stages = nn.ModuleList(
            [nn.Conv2d(channels[i - 1], channels[i], 3, stride=2, padding=1) for i in range(1, 4)]
        )

    def forward(self, x):
        f = [torch.relu(self.stem(x))]
        for s in self.stages:
            f.append(torch.relu(s(f[-1])))
        return f


class TinyEncoder(nn.Module):
    """A frozen conv + GAP + linear encoder with the ImageEncoder interface (d = 6)."""

    name = "tiny-test-encoder"
    pretrained_source = "random init (test stand-in)"
    input_size = 32

    def __init__(self, d: int = 6):
        super().__init__()
        self.dim = d
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, d)
        self.requires_grad_(False)
        self.eval()

    def feature_map(self, x):
        return torch.relu(self.conv(x))

    def head(self, pooled):
        return self.fc(pooled)

    def encode(self, x):
        return self.head(self.feature_map(x).mean(dim=(2, 3)))

    forward = encode

    def pooled_encode(self, x, weights):
        fm = self.feature_map(x)                                         # (B, C, h, w)
        w = F.interpolate(weights, size=fm.shape[-2:], mode="area")      # (B, R, h, w)
        pooled = torch.einsum("bchw,brhw->brc", fm, w) / w.sum(dim=(2, 3)).clamp_min(1e-6)[..., None]
        return self.head(pooled)
