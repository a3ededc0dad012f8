"""ClassNet and ImgMatchNet (sec. 3.3-3.4, eq. 2-5).

Shapes used throughout: ``B`` images, ``N`` classes, ``K`` prototypes per class, ``d`` encoder feature size,
``C_i`` channels of backbone level ``i``, ``P`` selected (image, class) pairs.

ClassNet
    A hierarchical backbone gives F_i (B, C_i, h_i, w_i). A per-level MLP projects the prototypes P (N, K, d) to
    P_i (N, K, C_i). SIM (eq. 2) is the cosine similarity of every pixel with every prototype, averaged over K:
    M_i (B, N, h_i, w_i). Image logits are the global average pool of M_i times a fixed scale s (a reading, see
    below). ``model.sim = false`` replaces SIM by a 1x1 convolution (Table 5; the ``cam`` baseline).

ImgMatchNet
    M' = sum_i Up(M_i) (eq. 3); M = M' rescaled to [0, 1] per image and class (min-max; eq. 5 multiplies images by M
    and 1 - M, so M must be a soft mask in [0, 1]: the paper leaves this step implicit); tau = delta * max(M)
    (eq. 4, per image and class); b = [M >= tau]; X_FG = b * M * X and X_BG = (1 - b) * (1 - M) * X (eq. 5), for
    every positive class of every image. Both go through the frozen encoder and the same per-level MLP.

Reading of eq. 7 (the logit scale s): the GAP of a cosine map lies in [-1, 1] and is the logit of a sigmoid
(multi-label binary cross-entropy, :mod:`pbip_core.method.losses`) after multiplication by a fixed scale
s = ``model.logit_scale`` (default 10; the official code learns one per level, initialised to 1/0.07). The paper gives
no scale. With s = 1 the sigmoid stays within [0.27, 0.73], L_CLS barely moves and the CAMs train slowly: on the
synthetic validation split, one demo epoch gave a pseudo-mask mIoU of 0.67 with s = 1 and 0.84 with s = 10 (chosen on
validation, never on test). s also sets the balance of L_CLS against L_FGS / L_BGS (Table 2, Figure 3).

This module is the method only: tensors in, tensors out. Building a model from a configuration is
:func:`pbip_core.engine.build.build_model`; the memory-capped exact backward of the training step is
:mod:`pbip_core.engine.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------- eq. 2: SIM
def cosine_maps(feat: torch.Tensor, protos: torch.Tensor, normalize_prototypes: bool = True) -> torch.Tensor:
    """Cosine similarity of every pixel with every prototype.

    feat (B, C, h, w), protos (N, K, C) -> (B, N, K, h, w). With ``normalize_prototypes=False`` only the pixel features
    are L2-normalised (the official code's variant).
    """
    f = F.normalize(feat, dim=1)                                   # F_i(p) / ||F_i(p)||
    p = F.normalize(protos, dim=-1) if normalize_prototypes else protos
    return torch.einsum("bchw,nkc->bnkhw", f, p)


def sim_map(feat: torch.Tensor, protos: torch.Tensor, normalize_prototypes: bool = True) -> torch.Tensor:
    """Eq. 2: M_i(p, n) = 1/K sum_k cos(F_i(p), P_i(n, k)).  feat (B, C, h, w), protos (N, K, C) -> (B, N, h, w)."""
    return cosine_maps(feat, protos, normalize_prototypes).mean(dim=2)


class PrototypeMLP(nn.Module):
    """Projects prototypes P (N, K, d) -> P_i (N, K, C_i) (sec. 3.4): Linear - ReLU - Linear."""

    def __init__(self, d: int, c: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or c
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.net(p)


@dataclass
class ClassNetOutput:
    maps: list[torch.Tensor]          # M_i, each (B, N, h_i, w_i)
    logits: torch.Tensor              # (L, B, N) image logits per level (scaled GAP of M_i)
    protos: list[torch.Tensor] | None # P_i, each (N, K, C_i)


class ClassNet(nn.Module):
    """Backbone + per-level SIM heads (eq. 2) or 1x1-conv heads (``sim=False``).

    ``backbone``: a module mapping (B, 3, H, W) images in [0, 1] to four feature maps F_1..F_4 and exposing their
    widths as ``backbone.channels`` (:mod:`pbip_core.nets.backbones`). ``levels`` picks the F_i that are used.
    """

    def __init__(
        self,
        backbone: nn.Module,
        prototypes: torch.Tensor,
        levels: Sequence[int] = (1, 2, 3),
        sim: bool = True,
        proj_hidden: int = 0,
        logit_scale: float = 1.0,
        learn_logit_scale: bool = False,
        normalize_prototypes: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.levels = tuple(levels)
        self.sim = sim
        self.normalize_prototypes = normalize_prototypes
        n, k, d = prototypes.shape
        self.n_classes = n
        self.register_buffer("prototypes", prototypes.detach().float().clone())    # P (N, K, d), from the bank
        chans = [backbone.channels[lv - 1] for lv in self.levels]
        # the MLPs project the prototypes for SIM and the FG/BG features for L_FGS / L_BGS (also without SIM)
        self.mlps = nn.ModuleList([PrototypeMLP(d, c, proj_hidden) for c in chans])
        self.heads = None if sim else nn.ModuleList([nn.Conv2d(c, n, kernel_size=1) for c in chans])
        scale = torch.full((len(self.levels),), float(logit_scale))
        if learn_logit_scale:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    def projected_prototypes(self) -> list[torch.Tensor]:
        """P_i = MLP_i(P): each (N, K, C_i)."""
        return [mlp(self.prototypes) for mlp in self.mlps]

    def forward(self, x: torch.Tensor) -> ClassNetOutput:
        """x (B, 3, H, W) RGB in [0, 1] -> per-level maps M_i and image logits."""
        feats = self.backbone(x)                                   # [F_1..F_4], F_i (B, C_i, H/2^(i+1), W/2^(i+1))
        feats = [feats[lv - 1] for lv in self.levels]
        protos = self.projected_prototypes()
        if self.sim:
            maps = [sim_map(f, p, self.normalize_prototypes) for f, p in zip(feats, protos)]   # eq. 2
        else:
            maps = [head(f) for head, f in zip(self.heads, feats)]                                # 1x1 conv
        gap = torch.stack([m.mean(dim=(2, 3)) for m in maps])                                      # (L, B, N)
        scale = self.logit_scale if self.sim else torch.ones_like(self.logit_scale)
        return ClassNetOutput(maps, gap * scale[:, None, None], protos)


# ---------------------------------------------------------------------- eq. 3-5: ImgMatchNet
def aggregate(maps: Sequence[torch.Tensor], size: tuple[int, int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 3: M' = sum_i w_i Up(M_i) with bilinear upsampling to ``size``; w_i = 1 in the paper. -> (B, N, H, W)."""
    weights = weights or [1.0] * len(maps)
    return sum(w * F.interpolate(m, size=size, mode="bilinear", align_corners=False)
               for w, m in zip(weights, maps) if w != 0)


def minmax(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale each (image, class) map to [0, 1].  m (B, N, H, W) -> (B, N, H, W)."""
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo + eps)


def adaptive_threshold(m: torch.Tensor, delta: float, scope: str = "class") -> torch.Tensor:
    """Eq. 4: tau = delta * max(M); b = [M >= tau].  m (B, N, H, W) in [0, 1] -> b (B, N, H, W) in {0, 1}.

    ``scope="class"``: the max is taken per image and class (the paper); ``"global"``: over all channels (official).
    b is a constant mask (no gradient flows through the comparison).
    """
    dims = (2, 3) if scope == "class" else (1, 2, 3)
    tau = delta * m.detach().amax(dim=dims, keepdim=True)
    return (m.detach() >= tau).to(m.dtype)


def fg_bg_masks(m: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's soft masks: FG = b * M, BG = (1 - b) * (1 - M).  m, b (B, N, H, W) -> two (B, N, H, W).

    Without adaptive thresholding (``b is None``, Table 5's "no AT"): FG = M and BG = 1 - M.
    """
    if b is None:
        return m, 1 - m
    return b * m, (1 - b) * (1 - m)


@dataclass
class MatchMasks:
    """Eq. 3-5 on a batch: ``m`` = M (B, N, H, W) in [0, 1], ``b`` its binary mask (None without AT), and the soft
    FG / BG weights (B, N, H, W) that multiply the image in eq. 5."""

    m: torch.Tensor
    b: torch.Tensor | None
    fg: torch.Tensor
    bg: torch.Tensor


def match_masks(maps: Sequence[torch.Tensor], size: tuple[int, int], delta: float = 0.15, at: bool = True,
                scope: str = "class", level_weights: Sequence[float] | None = None) -> MatchMasks:
    """Eq. 3-5 weights from the ClassNet's maps M_i (B, N, h_i, w_i) at image size ``size``."""
    m = minmax(aggregate(maps, size, level_weights))                # eq. 3, then to [0, 1]
    b = adaptive_threshold(m, delta, scope) if at else None         # eq. 4
    fg, bg = fg_bg_masks(m, b)                                      # eq. 5 weights
    return MatchMasks(m, b, fg, bg)


def positive_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(image, class) pairs of the positive labels.  labels (B, N) 0/1 -> (P, 2) long [image index, class index].

    P depends on the data, so on a GPU this is a host-device sync; a training loop computes the pairs from the CPU
    labels before the transfer and passes them in (``pairs=``), which keeps the step free of syncs.
    """
    return torch.nonzero(labels > 0.5, as_tuple=False)


def separate(x: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: X_FG and X_BG for the selected pairs.

    x (B, 3, H, W); fg, bg (B, N, H, W); pairs (P, 2) -> X_FG, X_BG each (P, 3, H, W).
    """
    bi, ci = pairs[:, 0], pairs[:, 1]
    xs = x[bi]                                                       # (P, 3, H, W)
    return xs * fg[bi, ci][:, None], xs * bg[bi, ci][:, None]


@dataclass
class MatchOutput:
    pairs: torch.Tensor               # (P, 2) [image, class]
    fg: list[torch.Tensor]            # F_FG_i, each (P, C_i): MLP_i(phi_e(X_FG))
    bg: list[torch.Tensor]            # F_BG_i, each (P, C_i)
    mask: torch.Tensor                # M (B, N, H, W) in [0, 1]
    b: torch.Tensor | None            # (B, N, H, W) binary, None without AT


class ImgMatchNet(nn.Module):
    """FG/BG separation (eq. 3-5) and their features through the frozen encoder + the ClassNet's MLPs.

    ``encoder`` is frozen here (no weight gradients, eval mode) but stays differentiable with respect to its input,
    so L_FGS / L_BGS reach the CAMs through the masked images. ``encode`` optionally replaces ``encoder.encode`` for
    the masked images (a training loop passes a memory-capped version, :func:`pbip_core.engine.step.encode_chunked`;
    same values and gradients).
    """

    def __init__(self, encoder: nn.Module, delta: float = 0.15, at: bool = True, scope: str = "class",
                 fgbg: str = "exact", level_weights: Sequence[float] | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():                          # frozen: no weight gradients, no optimizer state
            p.requires_grad_(False)
        self.encoder.eval()
        self.delta, self.at, self.scope, self.fgbg = delta, at, scope, fgbg
        self.level_weights = list(level_weights) if level_weights else None
        self.encode = encode or encoder.encode

    def train(self, mode: bool = True) -> "ImgMatchNet":
        super().train(mode)
        self.encoder.eval()                                          # frozen BN statistics
        return self

    def masks(self, x: torch.Tensor, maps: Sequence[torch.Tensor]) -> MatchMasks:
        """Eq. 3-5 weights of the batch x (B, 3, H, W) from the maps M_i."""
        return match_masks(maps, x.shape[-2:], self.delta, self.at, self.scope, self.level_weights)

    def forward(self, x: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
                mlps: Sequence[nn.Module], pairs: torch.Tensor | None = None) -> MatchOutput:
        """Per-level FG/BG features of every positive (image, class) pair.

        x (B, 3, H, W); maps M_i (B, N, h_i, w_i); labels (B, N); ``pairs`` (P, 2) = :func:`positive_pairs` of
        ``labels`` when already known (computed on the CPU: no device sync).
        """
        mm = self.masks(x, maps)
        pairs = positive_pairs(labels) if pairs is None else pairs
        if pairs.shape[0] == 0:
            return MatchOutput(pairs, [], [], mm.m, mm.b)
        if self.fgbg == "pooled":                                    # approximation: encode X once, pool under masks
            bi, ci = pairs[:, 0], pairs[:, 1]
            n = mm.m.shape[1]
            feats = self.encoder.pooled_encode(x, torch.cat([mm.fg, mm.bg], dim=1))   # (B, 2N, d): one pass per image
            f_fg, f_bg = feats[bi, ci], feats[bi, n + ci]
        else:
            x_fg, x_bg = separate(x, mm.fg, mm.bg, pairs)            # eq. 5 images, (P, 3, H, W) each
            feats = self.encode(torch.cat([x_fg, x_bg]))             # phi_e, one batched call: (2P, d)
            f_fg, f_bg = feats[: len(pairs)], feats[len(pairs):]
        fg = [mlp(f_fg) for mlp in mlps]                             # F_FG_i (P, C_i)
        bg = [mlp(f_bg) for mlp in mlps]
        return MatchOutput(pairs, fg, bg, mm.m, mm.b)


# ---------------------------------------------------------------------- the whole stage-1 model
class PBIP(nn.Module):
    """ClassNet + ImgMatchNet. ``forward`` returns the ClassNet output and, when labels are given, the match output."""

    def __init__(self, classnet: ClassNet, matcher: ImgMatchNet | None):
        super().__init__()
        self.classnet = classnet
        self.matcher = matcher

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, pairs: torch.Tensor | None = None
                ) -> tuple[ClassNetOutput, MatchOutput | None]:
        out = self.classnet(x)
        match = None
        if self.matcher is not None and labels is not None:
            match = self.matcher(x, out.maps, labels, self.classnet.mlps, pairs)
        return out, match

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.classnet.parameters() if p.requires_grad]
