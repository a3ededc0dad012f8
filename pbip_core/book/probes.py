"""Instruments the chapters use to explain what training does: gradient norms per loss term, the similarities behind
L_FGS / L_BGS, and foreground shares. They call the method's own functions (:mod:`pbip_core.method`) and only measure.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..method.losses import LossTerms, prototype_similarities, total_loss
from ..method.model import PBIP

#: Parameter groups of ClassNet whose gradient norms are reported.
GROUPS = ("backbone", "mlps", "heads", "logit_scale")


def _group_norms(model: PBIP) -> dict[str, float]:
    """L2 norm of the accumulated gradient of each parameter group of the ClassNet (0 where nothing flowed)."""
    out = {}
    for name in GROUPS:
        mod = getattr(model.classnet, name, None)
        params = list(mod.parameters()) if isinstance(mod, torch.nn.Module) else [mod] if mod is not None else []
        grads = [p.grad for p in params if getattr(p, "grad", None) is not None]
        out[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
    return out


def gradient_norms(model: PBIP, x: torch.Tensor, y: torch.Tensor, loss_cfg: Any) -> pd.DataFrame:
    """For each term of eq. 6 alone (weighted as in L_total) and for L_total: the gradient norm reaching each part of
    ClassNet on the batch x (B, 3, H, W), y (B, N). Rows: terms; columns: :data:`GROUPS` and the term's value."""
    rows = {}
    for term in ("cls", "fgs", "bgs", "total"):
        model.zero_grad(set_to_none=True)
        out = model.classnet(x)
        match = model.matcher(x, out.maps, y, model.classnet.mlps) if model.matcher is not None else None
        terms: LossTerms = total_loss(out.logits, y, match.fg if match else [], match.bg if match else [],
                                      out.protos, match.pairs if match else None, loss_cfg, last_map=out.maps[-1])
        weight = {"cls": loss_cfg.alpha, "fgs": loss_cfg.beta * loss_cfg.theta1,
                  "bgs": loss_cfg.beta * loss_cfg.theta2, "total": 1.0}[term]
        value = getattr(terms, term)
        if value.requires_grad:
            (weight * value if term != "total" else value).backward()
        rows[term] = {**_group_norms(model), "value": float(value.detach())}
    model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows).T.rename_axis("term")


@torch.no_grad()
def similarity_terms(model: PBIP, x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> pd.DataFrame:
    """The similarities inside eq. 9-12 at the last level, averaged over the batch's (image, class) pairs:
    s_FF / s_FB (sums over prototypes, eq. 10), s_BB / s_BF (means, eq. 12), their differences over tau (the logit
    that the two-way softmax sees), and the mean intensity of X_FG and X_BG."""
    out = model.classnet(x)
    mm = model.matcher.masks(x, out.maps)
    match = model.matcher(x, out.maps, y, model.classnet.mlps)
    protos = out.protos[-1]                                            # (N, K, C)
    cls = match.pairs[:, 1]
    idx = torch.arange(len(cls))
    s_fg = prototype_similarities(match.fg[-1], protos)               # (P, N, K)
    s_bg = prototype_similarities(match.bg[-1], protos)
    n, k = protos.shape[:2]
    own_fg, own_bg = s_fg[idx, cls], s_bg[idx, cls]                    # (P, K)
    s_ff, s_fb = own_fg.sum(1), s_fg.sum(dim=(1, 2)) - own_fg.sum(1)
    s_bf, s_bb = own_bg.mean(1), (s_bg.sum(dim=(1, 2)) - own_bg.sum(1)) / ((n - 1) * k)
    fg_w = mm.fg[match.pairs[:, 0], cls]
    bg_w = mm.bg[match.pairs[:, 0], cls]
    row = {"s_FF (eq. 10)": s_ff.mean(), "s_FB (eq. 10)": s_fb.mean(), "(s_FB - s_FF) / tau": ((s_fb - s_ff) / tau).mean(),
           "s_BB (eq. 12)": s_bb.mean(), "s_BF (eq. 12)": s_bf.mean(), "(s_BF - s_BB) / tau": ((s_bf - s_bb) / tau).mean(),
           "foreground share of b": (mm.b[match.pairs[:, 0], cls].mean() if mm.b is not None else torch.tensor(1.0)),
           "mean FG weight": fg_w.mean(), "mean BG weight": bg_w.mean()}
    return pd.DataFrame({k: [float(v)] for k, v in row.items()}).T.rename(columns={0: "mean over pairs"})
