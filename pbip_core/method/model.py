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

The official code's variants of eq. 3-5 are switches of :class:`ImgMatchNet` (``model.*`` keys, see config.py):
the last level's CAM only (``cam_source="last"``), per-sub-class maps and pairs (``pairs="subclass"``: sub-class k of
a positive class n is a pair when its logit exceeds the mean of class n's K logits), a threshold at delta x the max
over all channels of the un-normalised map (``scope="global"``), FG/BG images min-max scaled per RGB channel from the
raw CAM logits (``separation="official"``) and features compared with the raw prototypes (``space="encoder"``).

Reading of eq. 7 (the logit scale s, ``model.logit_scale``): the GAP of a cosine map lies in [-1, 1] and is the logit
of a sigmoid (multi-label binary cross-entropy, :mod:`pbip_core.method.losses`) after multiplication by a fixed scale
s (default 10; the official code learns one per level, initialised to 1/0.07). The paper gives no scale: s = 10 is this
book's choice, made on the synthetic validation split (one demo epoch: pseudo-mask mIoU 0.67 with s = 1, 0.84 with
s = 10; never on test). With s = 1 the sigmoid stays within [0.27, 0.73] and L_CLS barely moves. s also sets the
balance of L_CLS against L_FGS / L_BGS, the balance that Table 2 and Figure 3 study; chapters 07 and 09 run s = 1.

Backbone input (``model.input_norm``): RGB in [0, 1], normalised by the backbone with its own mean/std, or the official
code's BGR order with its own mean/std (:data:`OFFICIAL_BGR_MEAN`, :data:`OFFICIAL_BGR_STD`).

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


#: The official code's input normalisation (utils/trainutils.py get_mean_std), applied to cv2's BGR channel order.
OFFICIAL_BGR_MEAN = (0.66791496, 0.47791372, 0.70623304)
OFFICIAL_BGR_STD = (0.1736589, 0.22564577, 0.19820057)


@dataclass
class ClassNetOutput:
    maps: list[torch.Tensor]          # M_i, each (B, N, h_i, w_i): the mean over the K prototype maps (eq. 2)
    logits: torch.Tensor              # (L, B, N) image logits per level (scaled GAP of M_i)
    protos: list[torch.Tensor] | None # P_i, each (N, K, C_i)
    submaps: list[torch.Tensor] | None = None   # per-prototype maps, each (B, N, K, h_i, w_i) (K = 1 for conv heads)
    scale: torch.Tensor | None = None           # (L,) logit scale of each level (ones for conv heads)

    def sub_logits(self, level: int = -1) -> torch.Tensor:
        """Per-prototype image logits of one level, scale * GAP of each sub-map: (B, N, K). Their mean over K is the
        class logit (the official code's merge "mean")."""
        return self.submaps[level].mean(dim=(3, 4)) * self.scale[level]


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
        input_norm: str = "backbone",
    ):
        super().__init__()
        if input_norm not in ("backbone", "official"):
            raise ValueError(f"input_norm must be 'backbone' or 'official', got {input_norm!r}")
        self.backbone = backbone
        self.input_norm = input_norm
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

    def backbone_input(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """The tensor to hand the backbone so that its own normalisation ``(x' - mean) / std`` yields
        ``gain * (x_in - mean_in) / std_in``: x_in = x with (mean_in, std_in) = the backbone's (``input_norm=
        "backbone"``), or x in BGR order with the official mean/std (``"official"``). ``gain`` multiplies the
        normalised input (the official test-time augmentation ``ttach.Multiply``). x (B, 3, H, W) RGB in [0, 1]."""
        if self.input_norm == "backbone" and gain == 1.0:
            return x
        mean = getattr(self.backbone, "mean", None)
        std = getattr(self.backbone, "std", None)
        mean = torch.zeros(1, 3, 1, 1, device=x.device, dtype=x.dtype) if mean is None else mean.to(x.dtype)
        std = torch.ones(1, 3, 1, 1, device=x.device, dtype=x.dtype) if std is None else std.to(x.dtype)
        if self.input_norm == "official":
            x = x.flip(1)                                           # RGB -> BGR
            z = (x - x.new_tensor(OFFICIAL_BGR_MEAN).view(1, 3, 1, 1)) / x.new_tensor(OFFICIAL_BGR_STD).view(1, 3, 1, 1)
        else:
            z = (x - mean) / std
        return (gain * z) * std + mean

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> ClassNetOutput:
        """x (B, 3, H, W) RGB in [0, 1] -> per-level maps M_i, image logits and the per-prototype maps."""
        feats = self.backbone(self.backbone_input(x, gain))        # [F_1..F_4], F_i (B, C_i, H/2^(i+1), W/2^(i+1))
        feats = [feats[lv - 1] for lv in self.levels]
        protos = self.projected_prototypes()
        if self.sim:
            submaps = [cosine_maps(f, p, self.normalize_prototypes) for f, p in zip(feats, protos)]
            maps = [s.mean(dim=2) for s in submaps]                                                 # eq. 2
        else:
            maps = [head(f) for head, f in zip(self.heads, feats)]                                 # 1x1 conv
            submaps = [m[:, :, None] for m in maps]
        gap = torch.stack([m.mean(dim=(2, 3)) for m in maps])                                      # (L, B, N)
        scale = self.logit_scale if self.sim else torch.ones_like(self.logit_scale)
        return ClassNetOutput(maps, gap * scale[:, None, None], protos, submaps, scale)


# ---------------------------------------------------------------------- eq. 3-5: ImgMatchNet
def aggregate(maps: Sequence[torch.Tensor], size: tuple[int, int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 3: M' = sum_i w_i Up(M_i) with bilinear upsampling to ``size``; w_i = 1 in the paper. -> (B, N, H, W)."""
    weights = weights or [1.0] * len(maps)
    return sum(w * F.interpolate(m, size=size, mode="bilinear", align_corners=False)
               for w, m in zip(weights, maps) if w != 0)


def minmax(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale each (image, channel) map to [0, 1] over its last two axes.  m (B, N, H, W) -> (B, N, H, W)."""
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo + eps)


def adaptive_threshold(m: torch.Tensor, delta: float, scope: str = "class") -> torch.Tensor:
    """Eq. 4: tau = delta * max(M); b = [M >= tau].  m (B, N, H, W) -> b (B, N, H, W) in {0, 1}.

    ``scope="class"``: the max is taken per image and class (the paper); ``"global"``: over all channels of the image
    (official). Which map is thresholded is :func:`match_masks`'s choice (M' of eq. 3, or its min-max scaled M).
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
    """Eq. 3-5 on a batch: ``m`` = M (B, R, H, W) in [0, 1], ``b`` its binary mask (None without AT), the soft
    FG / BG weights (B, R, H, W) that multiply the image in eq. 5, and ``raw`` = M' before the min-max. R = N class
    maps, or N*K sub-class maps (class-major) with ``pairs="subclass"``."""

    m: torch.Tensor
    b: torch.Tensor | None
    fg: torch.Tensor
    bg: torch.Tensor
    raw: torch.Tensor | None = None


def match_masks(maps: Sequence[torch.Tensor], size: tuple[int, int], delta: float = 0.15, at: bool = True,
                scope: str = "class", level_weights: Sequence[float] | None = None,
                threshold_map: str = "fused") -> MatchMasks:
    """Eq. 3-5 weights from maps (B, R, h_i, w_i) at image size ``size``.

    M' = sum_i Up(M_i) (eq. 3) and M = min-max(M') in [0, 1], the soft mask that multiplies the image in eq. 5. Eq. 4
    thresholds ``threshold_map``: ``"fused"`` = M' itself, tau = delta max M' (this book's reading: the sum of cosine
    maps ranges over [-L, L], so delta = 0.15 cuts at a meaningful height); ``"minmax"`` = M, tau = delta (after the
    min-max a class's max is 1, and delta = 0.15 keeps about 97 % of the pixels as foreground on kather-mosaic,
    chapter 04). The global scope always thresholds M' against delta x its max over all channels, as the official code
    does with its raw CAM logits (on M every channel's max is 1 and the two scopes would agree).
    """
    raw = aggregate(maps, size, level_weights)                      # eq. 3: M'
    m = minmax(raw)                                                 # M in [0, 1]
    target = m if (scope == "class" and threshold_map == "minmax") else raw
    b = adaptive_threshold(target, delta, scope) if at else None    # eq. 4
    fg, bg = fg_bg_masks(m, b)                                      # eq. 5 weights
    return MatchMasks(m, b, fg, bg, raw)


def match_maps(out: "ClassNetOutput", cam_source: str = "all", pairs: str = "class",
               logit_units: bool = False) -> list[torch.Tensor]:
    """The maps eq. 3-5 work on: per used level (all, or the last one only), (B, N, h, w) class maps or
    (B, N*K, h, w) per-prototype maps (class-major), in cosine units or (``logit_units``) times the level's logit
    scale, as the official CAM logits."""
    levels = [len(out.maps) - 1] if cam_source == "last" else list(range(len(out.maps)))
    res = []
    for i in levels:
        m = out.maps[i] if pairs == "class" else out.submaps[i].flatten(1, 2)
        res.append(m * out.scale[i] if logit_units else m)
    return res


def positive_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(image, class) pairs of the positive labels.  labels (B, N) 0/1 -> (P, 2) long [image index, class index].

    P depends on the data, so on a GPU this is a host-device sync; a training loop computes the pairs from the CPU
    labels before the transfer and passes them in (``pairs=``), which keeps the step free of syncs.
    """
    return torch.nonzero(labels > 0.5, as_tuple=False)


def subclass_pairs(labels: torch.Tensor, sub_logits: torch.Tensor) -> torch.Tensor:
    """The official pairs: sub-class k of class n in image b when class n is labelled and the sub-class's logit
    exceeds the mean of class n's K logits (``cls4 > cls4_expand``).  labels (B, N), sub_logits (B, N, K) -> (P, 3)
    long [image, class, k]. With K = 1 no sub-class exceeds its own mean: no pairs (as in the official code)."""
    sel = (sub_logits > sub_logits.mean(dim=2, keepdim=True)) & (labels[:, :, None] > 0.5)
    return torch.nonzero(sel, as_tuple=False)


def pair_channels(pairs: torch.Tensor, k: int) -> torch.Tensor:
    """(P, 2) [image, channel] of the maps of :func:`match_maps`: the class for (image, class) pairs (P, 2), or
    class * K + k for (image, class, k) pairs (P, 3)."""
    if pairs.shape[1] == 2:
        return pairs
    return torch.stack([pairs[:, 0], pairs[:, 1] * k + pairs[:, 2]], dim=1)


def separate(x: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: X_FG and X_BG for the selected pairs.

    x (B, 3, H, W); fg, bg (B, R, H, W); pairs (P, 2) [image, channel] -> X_FG, X_BG each (P, 3, H, W).
    """
    bi, ci = pairs[:, 0], pairs[:, 1]
    xs = x[bi]                                                       # (P, 3, H, W)
    return xs * fg[bi, ci][:, None], xs * bg[bi, ci][:, None]


def separate_official(x: torch.Tensor, raw: torch.Tensor, b: torch.Tensor | None, pairs: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's FG/BG images: FG = CAM * X and BG = (1 - CAM) * X with CAM the raw map (logits), each
    min-max scaled per image and RGB channel (eps 1e-8), then multiplied by b and by 1 - b.

    x (B, 3, H, W); raw (B, R, H, W); b (B, R, H, W) or None (no threshold: no masking); pairs (P, 2) [image,
    channel] -> X_FG, X_BG each (P, 3, H, W) in [0, 1].
    """
    bi, ci = pairs[:, 0], pairs[:, 1]
    xs, cam = x[bi], raw[bi, ci][:, None]                            # (P, 3, H, W), (P, 1, H, W)
    x_fg, x_bg = minmax(cam * xs, eps=1e-8), minmax((1 - cam) * xs, eps=1e-8)
    if b is None:
        return x_fg, x_bg
    mask = b[bi, ci][:, None]
    return x_fg * mask, x_bg * (1 - mask)


@dataclass
class MatchOutput:
    pairs: torch.Tensor               # (P, 2) [image, class] or (P, 3) [image, class, k] (``pairs="subclass"``)
    fg: list[torch.Tensor]            # F_FG per head, each (P, C): MLP_i(phi_e(X_FG)), or phi_e(X_FG) (encoder space)
    bg: list[torch.Tensor]            # F_BG per head, each (P, C)
    mask: torch.Tensor                # M (B, R, H, W) in [0, 1]
    b: torch.Tensor | None            # (B, R, H, W) binary, None without AT


Maps = Sequence[torch.Tensor] | ClassNetOutput


class ImgMatchNet(nn.Module):
    """FG/BG separation (eq. 3-5) and their features through the frozen encoder + the ClassNet's MLPs.

    ``encoder`` is frozen here (no weight gradients, eval mode) but stays differentiable with respect to its input,
    so L_FGS / L_BGS reach the CAMs through the masked images. ``encode`` optionally replaces ``encoder.encode`` for
    the masked images (a training loop passes a memory-capped version, :func:`pbip_core.engine.step.encode_chunked`;
    same values and gradients). ``cam_source``, ``pairs``, ``separation`` and ``space`` switch to the official code's
    variants (module docstring). Methods taking ``maps`` accept the ClassNet's output, or a list of maps
    (B, N, h_i, w_i) used as they are (class pairs only).
    """

    def __init__(self, encoder: nn.Module, delta: float = 0.15, at: bool = True, scope: str = "class",
                 fgbg: str = "exact", level_weights: Sequence[float] | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, cam_source: str = "all",
                 pairs: str = "class", separation: str = "paper", space: str = "projected",
                 threshold_map: str = "fused"):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():                          # frozen: no weight gradients, no optimizer state
            p.requires_grad_(False)
        self.encoder.eval()
        self.delta, self.at, self.scope, self.fgbg = delta, at, scope, fgbg
        self.cam_source, self.pairs, self.separation, self.space = cam_source, pairs, separation, space
        self.level_weights = list(level_weights) if level_weights else None
        self.threshold_map = threshold_map
        self.encode = encode or encoder.encode

    def train(self, mode: bool = True) -> "ImgMatchNet":
        super().train(mode)
        self.encoder.eval()                                          # frozen BN statistics
        return self

    def _maps(self, maps: Maps) -> list[torch.Tensor]:
        if isinstance(maps, ClassNetOutput):
            return match_maps(maps, self.cam_source, self.pairs, self.separation == "official")
        if self.pairs == "subclass":
            raise ValueError("pairs='subclass' needs the ClassNet's output (its per-prototype maps), not a list of maps")
        return list(maps)[-1:] if self.cam_source == "last" else list(maps)

    def masks(self, x: torch.Tensor, maps: Maps) -> MatchMasks:
        """Eq. 3-5 weights of the batch x (B, 3, H, W) from the maps M_i."""
        weights = self.level_weights if self.cam_source == "all" else None
        return match_masks(self._maps(maps), x.shape[-2:], self.delta, self.at, self.scope, weights, self.threshold_map)

    def select_pairs(self, maps: Maps, labels: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """The pairs that get FG/BG images: (P, 2) positive (image, class) pairs (``pairs`` when already known), or
        (P, 3) official sub-class pairs chosen from the last level's per-prototype logits (data-dependent: one
        host-device sync on a GPU)."""
        if self.pairs == "subclass":
            if not isinstance(maps, ClassNetOutput):
                raise ValueError("pairs='subclass' needs the ClassNet's output")
            return subclass_pairs(labels, maps.sub_logits(-1).detach())
        return positive_pairs(labels) if pairs is None else pairs

    def channels(self, maps: Maps, pairs: torch.Tensor) -> torch.Tensor:
        """(P, 2) [image, channel of the match maps] of the pairs."""
        k = maps.submaps[-1].shape[2] if isinstance(maps, ClassNetOutput) else 1
        return pair_channels(pairs, k)

    def images(self, x: torch.Tensor, mm: MatchMasks, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5 images X_FG, X_BG (P, 3, H, W) of the pairs' channels (P, 2): the paper's or the official ones."""
        if self.separation == "official":
            return separate_official(x, mm.raw, mm.b, channels)
        return separate(x, mm.fg, mm.bg, channels)

    def heads(self, mlps: Sequence[nn.Module]) -> list[nn.Module]:
        """What maps an encoder feature to the space the losses compare in: the per-level MLPs (``"projected"``) or
        nothing (``"encoder"``: the raw prototypes' space, one head)."""
        return list(mlps) if self.space == "projected" else [nn.Identity()]

    def forward(self, x: torch.Tensor, maps: Maps, labels: torch.Tensor,
                mlps: Sequence[nn.Module], pairs: torch.Tensor | None = None) -> MatchOutput:
        """FG/BG features of every selected pair, one entry per head.

        x (B, 3, H, W); ``maps`` the ClassNet's output (or maps M_i (B, N, h_i, w_i)); labels (B, N); ``pairs``
        (P, 2) = :func:`positive_pairs` of ``labels`` when already known (computed on the CPU: no device sync).
        """
        mm = self.masks(x, maps)
        pairs = self.select_pairs(maps, labels, pairs)
        if pairs.shape[0] == 0:
            return MatchOutput(pairs, [], [], mm.m, mm.b)
        ch = self.channels(maps, pairs)
        if self.fgbg == "pooled":                                    # approximation: encode X once, pool under masks
            bi, ci = ch[:, 0], ch[:, 1]
            r = mm.m.shape[1]
            feats = self.encoder.pooled_encode(x, torch.cat([mm.fg, mm.bg], dim=1))   # (B, 2R, d): one pass per image
            f_fg, f_bg = feats[bi, ci], feats[bi, r + ci]
        else:
            x_fg, x_bg = self.images(x, mm, ch)                      # eq. 5 images, (P, 3, H, W) each
            feats = self.encode(torch.cat([x_fg, x_bg]))             # phi_e, one batched call: (2P, d)
            f_fg, f_bg = feats[: len(pairs)], feats[len(pairs):]
        heads = self.heads(mlps)
        return MatchOutput(pairs, [h(f_fg) for h in heads], [h(f_bg) for h in heads], mm.m, mm.b)


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
            match = self.matcher(x, out, labels, self.classnet.mlps, pairs)
        return out, match

    def loss_prototypes(self, out: ClassNetOutput) -> list[torch.Tensor] | None:
        """The prototypes L_FGS / L_BGS compare with, one per head of the matcher: P_i = MLP_i(P) per level, or the
        raw P (N, K, d) (``space="encoder"``, official)."""
        if self.matcher is not None and self.matcher.space == "encoder":
            return [self.classnet.prototypes]
        return out.protos

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.classnet.parameters() if p.requires_grad]
