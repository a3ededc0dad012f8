"""Optimisation objectives (sec. 3.5, eq. 6-13).

Notation: P selected (image, class j) pairs, N classes, K prototypes per class, C_i channels of level i.

Readings of the paper that its text leaves open (each is a switch or documented here):

* Eq. 7 writes ``CrossEntropy(y, y_hat[i])`` and then mentions "sigma, the sigmoid": the task is multi-label, so it is
  read as binary cross-entropy of sigmoid(y_hat[i]) against the 0/1 label vector, averaged over classes and images
  (``F.binary_cross_entropy_with_logits``). Eq. 8 sums the levels; ``loss.cls_level_weights`` weights them
  (official: 0, 0.1, 1, 1.5).
* The logit y_hat[i] is s * GAP(M_i) with a fixed scale s = ``model.logit_scale`` = 10 (:mod:`pbip_core.method.model`):
  the paper gives no scale; 10 was chosen on the synthetic validation split, and it also sets how strongly L_CLS
  weighs against L_FGS / L_BGS (the balance Table 2 and Figure 3 study). The official code learns s per level from
  1/0.07. Chapters 07 and 09 run s = 1.
* "Similarity scores" in eq. 10 and 12 are cosine similarities between the projected FG/BG feature and the projected
  prototypes P_i (both unit-normalised), computed at every level and averaged over levels.
* Eq. 9-10 (FG): s_FF = sum_k cos(F_FG[j], P[j, k]); s_FB = sum over m != j and k of cos(F_FG[j], P[m, k]) ("sum").
* Eq. 11-12 (BG): the text names P[j] the background prototype "for the j-th region"; what it describes ("aligns
  background image features with background prototype features while distinguishing them from foreground prototype
  features") only makes sense with the background of region j being the *other* classes. So
  s_BB = mean over m != j and k of cos(F_BG[j], P[m, k]) and s_BF = mean over k of cos(F_BG[j], P[j, k]) ("mean").
  With a single class (N = 1) there are no other classes: L_FGS and L_BGS are 0.

Pairs are (image, class) pairs, (P, 2), or the official code's (image, class, k) sub-class pairs, (P, 3); a pair's
own prototypes are its class's K prototypes, or its one sub-class prototype (the K - 1 siblings then count with the
other classes, as in the official ``pair_features``). ``loss.nce = "batch"`` is the official code's InfoNCE
(utils/contrast_loss.py): exp of every prototype similarity, summed over the pair's own / other prototypes (BG: the
mean over the others) and over the whole batch before a single log, -log(sum_p pos_p / sum_p (pos_p + neg_p)).
The official CAM term 0.0005 * mean(CAM4) sits inside the bracket that its l5 (our beta) multiplies.
"""

from __future__ import annotations

import math
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


def own_mask(pairs: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Which prototypes are a pair's own: (P, N, K) bool. ``pairs``: (P,) class indices, (P, 2) [image, class] (all K
    prototypes of the class) or (P, 3) [image, class, k] (the one sub-class prototype)."""
    cls = pairs if pairs.dim() == 1 else pairs[:, 1]
    own = (torch.arange(n, device=cls.device)[None, :, None] == cls[:, None, None]).expand(-1, n, k)
    if pairs.dim() == 2 and pairs.shape[1] == 3:
        own = own & (torch.arange(k, device=cls.device)[None, None, :] == pairs[:, 2, None, None])
    return own


def _n_own(pairs: torch.Tensor, k: int) -> int:
    """Own prototypes per pair: K for class pairs, 1 for sub-class pairs (known from shapes: no device sync)."""
    return 1 if (pairs.dim() == 2 and pairs.shape[1] == 3) else k


def two_way_nce(pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """-log(exp(pos/tau) / (exp(pos/tau) + exp(neg/tau))) = softplus((neg - pos)/tau), averaged.  pos, neg (P,)."""
    return F.softplus((neg - pos) / tau).mean()


def _masked_lse(a: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """log sum exp of ``a`` over ``dims`` where ``mask`` holds."""
    return torch.logsumexp(a.masked_fill(~mask, float("-inf")), dim=dims)


def fgs_loss(f_fg: torch.Tensor, protos: torch.Tensor, pairs: torch.Tensor, tau: float = 1.0,
             nce: str = "pair") -> torch.Tensor:
    """Eq. 9-10: foreground similarity loss.  f_fg (P, C), protos (N, K, C), pairs (P,) / (P, 2) / (P, 3) -> scalar.

    ``nce="pair"``: s_FF = sum of cos(F_FG[j], own prototypes); s_FB = sum over the other prototypes; mean over pairs
    of -log(e^{s_FF/tau} / (e^{s_FF/tau} + e^{s_FB/tau})). ``"batch"`` (official InfoNCELossFG):
    -log(sum_p sum_own e^{s/tau} / sum_p sum_all e^{s/tau}).
    """
    n, k = protos.shape[0], protos.shape[1]
    if f_fg.shape[0] == 0 or n * k - _n_own(pairs, k) == 0:
        return f_fg.sum() * 0
    sims = prototype_similarities(f_fg, protos)                       # (P, N, K)
    own = own_mask(pairs, n, k)
    if nce == "batch":
        a = sims / tau
        return torch.logsumexp(a.flatten(), dim=0) - _masked_lse(a, own, (0, 1, 2))
    s_ff = (sims * own).sum(dim=(1, 2))                               # (P,)
    s_fb = sims.sum(dim=(1, 2)) - s_ff                                # (P,) sum over the other prototypes
    return two_way_nce(s_ff, s_fb, tau)


def bgs_loss(f_bg: torch.Tensor, protos: torch.Tensor, pairs: torch.Tensor, tau: float = 1.0,
             nce: str = "pair") -> torch.Tensor:
    """Eq. 11-12: background similarity loss.  f_bg (P, C), protos (N, K, C), pairs (P,) / (P, 2) / (P, 3) -> scalar.

    ``nce="pair"``: s_BB = mean of cos(F_BG[j], other prototypes); s_BF = mean over the own prototypes; mean over
    pairs of -log(e^{s_BB/tau} / (e^{s_BB/tau} + e^{s_BF/tau})). ``"batch"`` (official InfoNCELossBG):
    pos_p = mean over the other prototypes of e^{s/tau}, neg_p = sum over the own of e^{s/tau},
    -log(sum_p pos_p / sum_p (pos_p + neg_p)).
    """
    n, k = protos.shape[0], protos.shape[1]
    n_own = _n_own(pairs, k)
    if f_bg.shape[0] == 0 or n * k - n_own == 0:
        return f_bg.sum() * 0
    sims = prototype_similarities(f_bg, protos)
    own = own_mask(pairs, n, k)
    if nce == "batch":
        a = sims / tau
        log_pos = _masked_lse(a, ~own, (1, 2)) - math.log(n * k - n_own)          # (P,) log mean_other e^{s/tau}
        log_neg = _masked_lse(a, own, (1, 2))                                      # (P,) log sum_own e^{s/tau}
        return torch.logsumexp(torch.cat([log_pos, log_neg]), dim=0) - torch.logsumexp(log_pos, dim=0)
    own_sum = (sims * own).sum(dim=(1, 2))
    s_bb = (sims.sum(dim=(1, 2)) - own_sum) / (n * k - n_own)         # mean over the other prototypes
    s_bf = own_sum / n_own                                            # mean over the own prototypes
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
    """Eq. 6 and 13: L_total = alpha L_CLS + beta (theta1 L_FGS + theta2 L_BGS + cam_reg mean(CAM)); the last term
    is the official code's CAM regulariser (0 in the paper), inside beta's bracket as in the official
    ``cls_loss + (fg_loss + bg_loss + 0.0005 * mean(cam4)) * l5``.

    logits (L, B, N); labels (B, N); fg/bg per head (P, C_i); protos per head (N, K, C_i); pairs (P, 2) or (P, 3);
    ``last_map`` the last level's CAM (in logit units for the official term). ``cfg`` is a
    :class:`~pbip_core.config.LossConfig`. L_FGS/L_BGS are averaged over the heads (levels).
    """
    zero = logits.sum() * 0
    l_cls = cls_loss(logits, labels, cfg.cls_level_weights) if cfg.cls else zero
    l_fgs = l_bgs = zero
    if fg and protos is not None and pairs is not None and pairs.shape[0] > 0:
        if cfg.fgs:
            l_fgs = sum(fgs_loss(f, p, pairs, cfg.tau, cfg.nce) for f, p in zip(fg, protos)) / len(fg)
        if cfg.bgs:
            l_bgs = sum(bgs_loss(b, p, pairs, cfg.tau, cfg.nce) for b, p in zip(bg, protos)) / len(bg)
    l_sim = cfg.theta1 * l_fgs + cfg.theta2 * l_bgs                  # eq. 13
    reg = cfg.cam_reg * last_map.mean() if (cfg.cam_reg and last_map is not None) else zero
    total = cfg.alpha * l_cls + cfg.beta * (l_sim + reg)             # eq. 6 (+ the official CAM term)
    return LossTerms(total, l_cls, l_fgs, l_bgs, l_sim, reg)
