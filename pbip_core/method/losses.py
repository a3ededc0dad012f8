"""Optimisation objectives (sec. 3.5, eq. 6-13).

Notation: P selected (image, class j) pairs, N classes, K prototypes per class, C_i channels of level i.

Readings of the paper that its text leaves open (each is a switch or documented here):

* Eq. 7 writes ``CrossEntropy(y, y_hat[i])`` and then mentions "sigma, the sigmoid": the task is multi-label, so it is
  read as binary cross-entropy of sigmoid(y_hat[i]) against the 0/1 label vector, averaged over classes and images
  (``F.binary_cross_entropy_with_logits``). Eq. 8 sums the levels; ``loss.cls_level_weights`` weights them
  (official: 0, 0.1, 1, 1).
* "Similarity scores" in eq. 10 and 12 are cosine similarities between the projected FG/BG feature and the projected
  prototypes P_i (both unit-normalised), computed at every level and averaged over levels.
* Eq. 9-10 (FG): s_FF = sum_k cos(F_FG[j], P[j, k]); s_FB = sum over m != j and k of cos(F_FG[j], P[m, k]) ("sum").
* Eq. 11-12 (BG): the text names P[j] the background prototype "for the j-th region"; what it describes ("aligns
  background image features with background prototype features while distinguishing them from foreground prototype
  features") only makes sense with the background of region j being the *other* classes. So
  s_BB = mean over m != j and k of cos(F_BG[j], P[m, k]) and s_BF = mean over k of cos(F_BG[j], P[j, k]) ("mean").
  With a single class (N = 1) there are no other classes: L_FGS and L_BGS are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------- eq. 7-8: classification
def cls_loss(logits: torch.Tensor, labels: torch.Tensor, level_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 7-8: L_CLS = sum_i w_i BCE(sigmoid(y_hat[i]), y).  logits (L, B, N), labels (B, N) -> scalar."""
    weights = list(level_weights) if level_weights else [1.0] * logits.shape[0]
    return sum(w * F.binary_cross_entropy_with_logits(lg, labels) for w, lg in zip(weights, logits) if w != 0)


# ---------------------------------------------------------------------- eq. 9-12: similarity
def prototype_similarities(feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair's feature with every prototype.  feat (P, C), protos (N, K, C) -> (P, N, K)."""
    return torch.einsum("pc,nkc->pnk", F.normalize(feat, dim=-1), F.normalize(protos, dim=-1))


def _own_and_rest(sims: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Own-class similarities (P, K) and the sum over the other classes' prototypes (P,).

    sims (P, N, K). The rest is the total minus the own class: no boolean indexing, so no host-device sync.
    """
    own = sims.gather(1, cls[:, None, None].expand(-1, 1, sims.shape[2]))[:, 0]     # (P, K)
    rest = sims.sum(dim=(1, 2)) - own.sum(dim=1)                                       # (P,)
    return own, rest


def two_way_nce(pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """-log(exp(pos/tau) / (exp(pos/tau) + exp(neg/tau))) = softplus((neg - pos)/tau), averaged.  pos, neg (P,)."""
    return F.softplus((neg - pos) / tau).mean()


def fgs_loss(f_fg: torch.Tensor, protos: torch.Tensor, cls: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Eq. 9-10: foreground similarity loss.  f_fg (P, C), protos (N, K, C), cls (P,) -> scalar.

    s_FF = sum_k cos(F_FG[j], P[j, k]);  s_FB = sum_{m != j, k} cos(F_FG[j], P[m, k]).
    """
    if protos.shape[0] < 2 or f_fg.shape[0] == 0:
        return f_fg.sum() * 0
    own, rest = _own_and_rest(prototype_similarities(f_fg, protos), cls)
    s_ff = own.sum(dim=1)                                             # (P,)
    s_fb = rest                                                       # (P,) sum over m != j and k
    return two_way_nce(s_ff, s_fb, tau)


def bgs_loss(f_bg: torch.Tensor, protos: torch.Tensor, cls: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Eq. 11-12: background similarity loss.  f_bg (P, C), protos (N, K, C), cls (P,) -> scalar.

    s_BB = mean_{m != j, k} cos(F_BG[j], P[m, k]);  s_BF = mean_k cos(F_BG[j], P[j, k]).
    """
    if protos.shape[0] < 2 or f_bg.shape[0] == 0:
        return f_bg.sum() * 0
    own, rest = _own_and_rest(prototype_similarities(f_bg, protos), cls)
    n, k = protos.shape[0], protos.shape[1]
    s_bb = rest / ((n - 1) * k)                                       # mean over m != j and k
    s_bf = own.mean(dim=1)
    return two_way_nce(s_bb, s_bf, tau)


# ---------------------------------------------------------------------- eq. 6, 13: total
TERM_NAMES = ("total", "cls", "fgs", "bgs", "sim", "reg")


@dataclass
class LossTerms:
    total: torch.Tensor
    cls: torch.Tensor
    fgs: torch.Tensor
    bgs: torch.Tensor
    sim: torch.Tensor
    reg: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in TERM_NAMES}

    def stacked(self) -> torch.Tensor:
        """The terms as one detached (6,) tensor, in :data:`TERM_NAMES` order (no host-device sync)."""
        return torch.stack([getattr(self, k).detach().float().reshape(()) for k in TERM_NAMES])


def total_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fg: Sequence[torch.Tensor],
    bg: Sequence[torch.Tensor],
    protos: Sequence[torch.Tensor] | None,
    pairs: torch.Tensor | None,
    cfg,
    last_map: torch.Tensor | None = None,
) -> LossTerms:
    """Eq. 6 and 13: L_total = alpha L_CLS + beta (theta1 L_FGS + theta2 L_BGS) (+ the official CAM regulariser).

    logits (L, B, N); labels (B, N); fg/bg per level (P, C_i); protos per level (N, K, C_i); pairs (P, 2).
    ``cfg`` is a :class:`~pbip_core.config.LossConfig`. L_FGS/L_BGS are averaged over levels.
    """
    zero = logits.sum() * 0
    l_cls = cls_loss(logits, labels, cfg.cls_level_weights) if cfg.cls else zero
    l_fgs = l_bgs = zero
    if fg and protos is not None and pairs is not None and pairs.shape[0] > 0:
        cls = pairs[:, 1]
        if cfg.fgs:
            l_fgs = sum(fgs_loss(f, p, cls, cfg.tau) for f, p in zip(fg, protos)) / len(fg)
        if cfg.bgs:
            l_bgs = sum(bgs_loss(b, p, cls, cfg.tau) for b, p in zip(bg, protos)) / len(bg)
    l_sim = cfg.theta1 * l_fgs + cfg.theta2 * l_bgs                  # eq. 13
    reg = cfg.cam_reg * last_map.mean() if (cfg.cam_reg and last_map is not None) else zero
    total = cfg.alpha * l_cls + cfg.beta * l_sim + reg               # eq. 6
    return LossTerms(total, l_cls, l_fgs, l_bgs, l_sim, reg)
