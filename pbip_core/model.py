"""ClassNet and ImgMatchNet (sec. 3.3-3.4, eq. 2-5).

Shapes used throughout: ``B`` images, ``N`` classes, ``K`` prototypes per class, ``d`` encoder feature size,
``C_i`` channels of backbone level ``i``, ``P`` selected (image, class) pairs.

ClassNet
    A hierarchical backbone gives F_i (B, C_i, h_i, w_i). A per-level MLP projects the prototypes P (N, K, d) to
    P_i (N, K, C_i). SIM (eq. 2) is the cosine similarity of every pixel with every prototype, averaged over K:
    M_i (B, N, h_i, w_i). Image logits are the global average pool of M_i (times a fixed scale, see below).
    ``model.sim = false`` replaces SIM by a 1x1 convolution (Table 5; the ``cam`` baseline).

ImgMatchNet
    M' = sum_i Up(M_i) (eq. 3); M = M' rescaled to [0, 1] per image and class (min-max; eq. 5 multiplies images by M
    and 1 - M, so M must be a soft mask in [0, 1] — the paper leaves this step implicit); tau = delta * max(M)
    (eq. 4, per image and class); b = [M >= tau]; X_FG = b * M * X and X_BG = (1 - b) * (1 - M) * X (eq. 5), for
    every positive class of every image. Both go through the frozen encoder and the same per-level MLP.

Reading of eq. 7 (recorded in ``losses.py`` too): the GAP of a cosine map lies in [-1, 1] and is the logit of a
sigmoid (multi-label binary cross-entropy) after multiplication by a fixed scale s = ``model.logit_scale`` (default 10;
the official code learns one per level, initialised to 1/0.07). The paper gives no scale. With s = 1 the sigmoid stays
within [0.27, 0.73], L_CLS barely moves and the CAMs train slowly: on the synthetic validation split, one demo epoch gave a
pseudo-mask mIoU of 0.67 with s = 1 and 0.84 with s = 10 (chosen on validation, never on test).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    protos: list[torch.Tensor] | None # P_i, each (N, K, C_i); None without SIM


class ClassNet(nn.Module):
    """Backbone + per-level SIM heads (eq. 2) or 1x1-conv heads (``sim=False``)."""

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
        if sim:
            self.mlps = nn.ModuleList([PrototypeMLP(d, c, proj_hidden) for c in chans])
            self.heads = None
        else:
            self.mlps = nn.ModuleList([PrototypeMLP(d, c, proj_hidden) for c in chans])   # still used for FG/BG features
            self.heads = nn.ModuleList([nn.Conv2d(c, n, kernel_size=1) for c in chans])
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


def positive_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(image, class) pairs of the positive labels.  labels (B, N) 0/1 -> (P, 2) long [image index, class index].

    P depends on the data, so on a GPU this is a host-device sync; a training loop computes the pairs from the CPU
    labels before the transfer and passes them in (``pairs=``), which keeps the step free of syncs.
    """
    return torch.nonzero(labels > 0.5, as_tuple=False)


def fg_bg_masks(m: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's soft masks: FG = b * M, BG = (1 - b) * (1 - M).  m, b (B, N, H, W) -> two (B, N, H, W).

    Without adaptive thresholding (``b is None``, Table 5's "no AT"): FG = M and BG = 1 - M.
    """
    if b is None:
        return m, 1 - m
    return b * m, (1 - b) * (1 - m)


def separate(x: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: X_FG and X_BG for the selected pairs.

    x (B, 3, H, W); fg, bg (B, N, H, W); pairs (P, 2) -> X_FG, X_BG each (P, 3, H, W).
    """
    bi, ci = pairs[:, 0], pairs[:, 1]
    xs = x[bi]                                                       # (P, 3, H, W)
    return xs * fg[bi, ci][:, None], xs * bg[bi, ci][:, None]


def encode_chunked(encoder: Any, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """phi_e(x) in chunks of ``chunk`` images (0 = one batched call).  x (P, 3, H, W) -> (P, d).

    When a graph is built (x requires grad), each chunk is checkpointed: its forward keeps no activations and the
    backward recomputes them chunk by chunk, so at most one chunk's encoder graph is alive at a time. Same values and
    gradients as one call, memory ~ ``chunk`` images, at the cost of one extra encoder forward. (A training loop that
    can hand the loss over gets the same memory cap without the recomputation: :meth:`ImgMatchNet.forward_backward`.)
    """
    if chunk <= 0 or x.shape[0] <= chunk:
        return encoder.encode(x)
    parts = [x[s:s + chunk] for s in range(0, x.shape[0], chunk)]
    if torch.is_grad_enabled() and x.requires_grad:
        from torch.utils.checkpoint import checkpoint

        # the frozen encoder is in eval mode (no dropout / drop-path): nothing random to replay
        return torch.cat([checkpoint(encoder.encode, p, use_reentrant=False, preserve_rng_state=False)
                          for p in parts])
    return torch.cat([encoder.encode(p) for p in parts])


def _loss_total(terms: Any) -> torch.Tensor:
    """The scalar to minimise from a loss function's result (a tensor or an object with ``.total``)."""
    return terms if isinstance(terms, torch.Tensor) else terms.total


@dataclass
class MatchOutput:
    pairs: torch.Tensor               # (P, 2) [image, class]
    fg: list[torch.Tensor]            # F_FG_i, each (P, C_i): MLP_i(phi_e(X_FG))
    bg: list[torch.Tensor]            # F_BG_i, each (P, C_i)
    mask: torch.Tensor                # M (B, N, H, W) in [0, 1]
    b: torch.Tensor | None            # (B, N, H, W) binary, None without AT


class ImgMatchNet(nn.Module):
    """FG/BG separation (eq. 3-5) and their features through the frozen encoder + the ClassNet's MLPs."""

    def __init__(self, encoder: nn.Module, delta: float = 0.15, at: bool = True, scope: str = "class",
                 fgbg: str = "exact", encoder_chunk: int = 0, level_weights: Sequence[float] | None = None):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():                          # frozen: no weight gradients, no optimizer state
            p.requires_grad_(False)
        self.encoder.eval()
        self.delta, self.at, self.scope, self.fgbg = delta, at, scope, fgbg
        self.encoder_chunk = encoder_chunk
        self.level_weights = list(level_weights) if level_weights else None

    def train(self, mode: bool = True) -> "ImgMatchNet":
        super().train(mode)
        self.encoder.eval()                                          # frozen BN statistics
        return self

    def masks(self, x: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
              pairs: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 3-5 weights: M (B, N, H, W), b (or None), FG and BG weights (B, N, H, W), pairs (P, 2).

        ``pairs``: :func:`positive_pairs` of ``labels`` when already known (computed on the CPU: no device sync).
        """
        m = minmax(aggregate(maps, x.shape[-2:], self.level_weights))   # eq. 3, then to [0, 1]
        b = adaptive_threshold(m, self.delta, self.scope) if self.at else None    # eq. 4
        fg_w, bg_w = fg_bg_masks(m, b)                               # eq. 5 weights
        return m, b, fg_w, bg_w, (positive_pairs(labels) if pairs is None else pairs)

    def forward(self, x: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
                mlps: Sequence[nn.Module], pairs: torch.Tensor | None = None) -> MatchOutput:
        m, b, fg_w, bg_w, pairs = self.masks(x, maps, labels, pairs)
        if pairs.shape[0] == 0:
            return MatchOutput(pairs, [], [], m, b)
        if self.fgbg == "pooled":                                    # approximation: encode X once, pool under masks
            bi, ci = pairs[:, 0], pairs[:, 1]
            n = m.shape[1]
            feats = self.encoder.pooled_encode(x, torch.cat([fg_w, bg_w], dim=1))   # (B, 2N, d): one pass per image
            f_fg, f_bg = feats[bi, ci], feats[bi, n + ci]
        else:
            x_fg, x_bg = separate(x, fg_w, bg_w, pairs)              # eq. 5 images, (P, 3, H, W) each
            feats = encode_chunked(self.encoder, torch.cat([x_fg, x_bg]), self.encoder_chunk)   # one batched call
            f_fg, f_bg = feats[: len(pairs)], feats[len(pairs):]
        fg = [mlp(f_fg) for mlp in mlps]                             # F_FG_i (P, C_i)
        bg = [mlp(f_bg) for mlp in mlps]
        return MatchOutput(pairs, fg, bg, m, b)

    def forward_backward(self, x: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
                         mlps: Sequence[nn.Module], loss_fn: Callable[..., Any],
                         pairs: torch.Tensor | None = None) -> tuple[MatchOutput, Any]:
        """Forward and backward of the whole stage-1 loss, encoding X_FG / X_BG chunk by chunk (exact, no recomputation).

        ``loss_fn(fg, bg, pairs)`` gets per-level features (p, C_i) of p pairs and their (p, 2) indices and returns the
        loss (a scalar tensor, or e.g. :class:`~pbip_core.losses.LossTerms` with ``.total``); it may also hold terms
        that do not depend on the features (L_CLS on the ClassNet's logits). Requirement: its dependence on the
        features is a mean over the pairs of per-pair terms, as in eq. 9-12. Then dL/d(features of a chunk of p_c
        pairs) = (p_c / P) d loss_fn(chunk)/d(features of the chunk), whatever the other chunks hold; so each chunk of
        ``max(1, encoder_chunk // 2)`` pairs (its FG and BG images in one encoder call) is encoded, back-propagated to
        its masked images and freed before the next one: at most one chunk's encoder graph is alive. A last backward
        runs ``loss_fn`` on all P pairs (encoder outputs as constants) together with the masked images and their
        collected gradients, so the upstream graph (masks -> backbone, prototypes and features -> MLPs) is traversed
        once and every parameter's ``.grad`` is accumulated once, as by ``loss.backward()`` after :meth:`forward`.

        x (B, 3, H, W); maps M_i (B, N, h_i, w_i); labels (B, N); ``pairs`` (P, 2) as in :meth:`masks`. Returns the
        match output (features detached) and ``loss_fn``'s result on all pairs (its tensors detached). Gradients are
        accumulated into ``.grad``.
        """
        m, b, fg_w, bg_w, pairs = self.masks(x, maps, labels, pairs)
        n_pairs = pairs.shape[0]
        if n_pairs == 0 or self.fgbg == "pooled":                    # nothing to chunk: one forward, one backward
            match = self.forward(x, maps, labels, mlps, pairs)
            terms = loss_fn(match.fg, match.bg, match.pairs)
            with _no_autocast(x):
                _loss_total(terms).backward()
            return _detached_match(match), _detach_terms(terms)
        x_fg, x_bg = separate(x, fg_w, bg_w, pairs)                  # eq. 5 images with their graph, (P, 3, H, W)
        per = max(1, self.encoder_chunk // 2) if self.encoder_chunk > 0 else n_pairs
        f_fg, f_bg, g_fg, g_bg = [], [], [], []                      # encoder outputs (p_c, d), d/d(images)
        for s in range(0, n_pairs, per):
            e = min(s + per, n_pairs)
            p_c = e - s
            xin = torch.cat([x_fg[s:e], x_bg[s:e]]).detach().requires_grad_(True)   # the chunk's images as a leaf
            f = self.encoder.encode(xin)                             # (2p_c, d): this chunk's graph only
            f_leaf = f.detach().requires_grad_(True)
            part = _loss_total(loss_fn([mlp(f_leaf[:p_c]) for mlp in mlps], [mlp(f_leaf[p_c:]) for mlp in mlps],
                                       pairs[s:e]))
            with _no_autocast(x):                                    # backward outside autocast regions
                g_f, = torch.autograd.grad(part * (p_c / n_pairs), f_leaf)   # dL/d(features of this chunk)
                g_x, = torch.autograd.grad(f, xin, g_f)              # through the encoder; frees its graph
            f_fg.append(f_leaf.detach()[:p_c])
            f_bg.append(f_leaf.detach()[p_c:])
            g_fg.append(g_x[:p_c])
            g_bg.append(g_x[p_c:])
            del xin, f, f_leaf, part, g_f, g_x
        f_fg, f_bg = torch.cat(f_fg), torch.cat(f_bg)                # (P, d) each, in pair order
        fg = [mlp(f_fg) for mlp in mlps]
        bg = [mlp(f_bg) for mlp in mlps]
        terms = loss_fn(fg, bg, pairs)
        total = _loss_total(terms)
        with _no_autocast(x):
            torch.autograd.backward([total, x_fg, x_bg], [torch.ones_like(total), torch.cat(g_fg), torch.cat(g_bg)])
        return _detached_match(MatchOutput(pairs, fg, bg, m, b)), _detach_terms(terms)


def _no_autocast(x: torch.Tensor) -> Any:
    """A region with autocast off on ``x``'s device (backward passes should not run under autocast)."""
    return torch.autocast(x.device.type, enabled=False)


def _detached_match(match: MatchOutput) -> MatchOutput:
    return MatchOutput(match.pairs, [f.detach() for f in match.fg], [f.detach() for f in match.bg],
                       match.mask.detach(), None if match.b is None else match.b.detach())


def _detach_terms(terms: Any) -> Any:
    """``loss_fn``'s result with its tensors detached (a tensor, or a dataclass such as LossTerms)."""
    if isinstance(terms, torch.Tensor):
        return terms.detach()
    if dataclasses.is_dataclass(terms):
        return dataclasses.replace(terms, **{f.name: getattr(terms, f.name).detach()
                                             for f in dataclasses.fields(terms)
                                             if isinstance(getattr(terms, f.name), torch.Tensor)})
    return terms


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


def build_model(cfg: Any, prototypes: torch.Tensor, encoder: nn.Module | None, backbone: nn.Module | None = None) -> PBIP:
    """The stage-1 model of a :class:`~pbip_core.config.Config`. ``encoder`` may be None when no FG/BG loss is on."""
    from .backbones import get_backbone

    mc = cfg.model
    if backbone is None:
        backbone = get_backbone(mc.backbone, pretrained=mc.pretrained)
    classnet = ClassNet(backbone, prototypes, mc.levels, mc.sim, mc.proj_hidden, mc.logit_scale,
                        mc.learn_logit_scale, mc.normalize_prototypes)
    uses_match = cfg.loss.fgs or cfg.loss.bgs
    matcher = None
    if uses_match and encoder is not None:
        matcher = ImgMatchNet(encoder, mc.delta, mc.at, mc.threshold_scope, mc.fgbg, cfg.train.encoder_chunk)
    return PBIP(classnet, matcher)
