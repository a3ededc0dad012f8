"""One stage-1 training step: the loss of eq. 6 and its backward, with the encoder's memory capped.

The mathematics is :mod:`pbip_core.method` (ClassNet, ImgMatchNet, the losses); this module only decides *how*
the gradient of L_FGS / L_BGS flows through the frozen encoder phi_e:

* :func:`encode_chunked`: phi_e on the masked images in checkpointed chunks (one chunk's encoder graph alive);
* :func:`forward_backward`: the exact chunked backward without recomputation (encode a chunk, back-propagate it to
  its masked images, free it), followed by one backward of the whole loss through the masks, the backbone and the
  MLPs. Same values and gradients as ``loss.backward()`` after :meth:`ImgMatchNet.forward`; measured faster and
  smaller on CPU (``benchmarks/README.md``);
* :func:`loss_and_backward`: what the training loop calls (chunked in a single process; one forward and one backward
  under DDP, which needs a single autograd graph).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..method.losses import LossTerms, total_loss
from ..method.model import PBIP, ImgMatchNet, MatchOutput


def encode_chunked(encoder: Any, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """phi_e(x) in chunks of ``chunk`` images (0 = one batched call).  x (P, 3, H, W) -> (P, d).

    When a graph is built (x requires grad), each chunk is checkpointed: its forward keeps no activations and the
    backward recomputes them chunk by chunk, so at most one chunk's encoder graph is alive at a time. Same values and
    gradients as one call, memory ~ ``chunk`` images, at the cost of one extra encoder forward. (A training loop that
    can hand the loss over gets the same memory cap without the recomputation: :func:`forward_backward`.)
    """
    if chunk <= 0 or x.shape[0] <= chunk:
        return encoder.encode(x)
    parts = [x[s:s + chunk] for s in range(0, x.shape[0], chunk)]
    if torch.is_grad_enabled() and x.requires_grad:
        # the frozen encoder is in eval mode (no dropout / drop-path): nothing random to replay
        return torch.cat([checkpoint(encoder.encode, p, use_reentrant=False, preserve_rng_state=False)
                          for p in parts])
    return torch.cat([encoder.encode(p) for p in parts])


def _loss_total(terms: Any) -> torch.Tensor:
    """The scalar to minimise from a loss function's result (a tensor or an object with ``.total``)."""
    return terms if isinstance(terms, torch.Tensor) else terms.total


def _no_autocast(x: torch.Tensor) -> Any:
    """A region with autocast off on ``x``'s device (backward passes should not run under autocast)."""
    return torch.autocast(x.device.type, enabled=False)


def _detached(obj: Any) -> Any:
    """A tensor, a list of tensors or a dataclass of tensors (MatchOutput, LossTerms) with its tensors detached."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, list):
        return [_detached(v) for v in obj]
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _detached(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _unscaled(loss: torch.Tensor) -> torch.Tensor:
    return loss


def forward_backward(matcher: ImgMatchNet, x: torch.Tensor, maps: Any, labels: torch.Tensor,
                     mlps: Sequence[nn.Module], loss_fn: Callable[..., Any], chunk: int = 8,
                     pairs: torch.Tensor | None = None, separable: bool = True,
                     scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[MatchOutput, Any]:
    """Forward and backward of the whole stage-1 loss, encoding X_FG / X_BG chunk by chunk (exact).

    ``loss_fn(fg, bg, pairs)`` gets per-head features (p, C_i) of p pairs and their indices and returns the loss (a
    scalar tensor, or :class:`~pbip_core.method.losses.LossTerms` with ``.total``); it may also hold terms that do not
    depend on the features (L_CLS on the ClassNet's logits). The heads are the matcher's (:meth:`ImgMatchNet.heads`:
    the per-level MLPs, or the identity in the encoder space).

    ``separable=True`` (eq. 9-12 as means over pairs): dL/d(features of a chunk of p_c pairs) = (p_c / P) d
    loss_fn(chunk)/d(features of the chunk), whatever the other chunks hold; so each chunk of ``max(1, chunk // 2)``
    pairs (its FG and BG images in one encoder call) is encoded, back-propagated to its masked images and freed before
    the next one, without recomputation. ``separable=False`` (a loss that is not a mean over pairs, e.g. the official
    batch-level InfoNCE, ``loss.nce="batch"``): every chunk is first encoded without a graph, the loss on all pairs
    gives dL/d(features), then each chunk is encoded again with its graph and back-propagated with its slice of that
    gradient (one extra encoder forward, same memory cap). Either way a last backward runs ``loss_fn`` on all P pairs
    (encoder outputs as constants) together with the masked images and their collected gradients, so the upstream
    graph (masks -> backbone, prototypes and features -> MLPs) is traversed once and every parameter's ``.grad`` is
    accumulated once, as by ``loss.backward()`` after ``matcher(...)``.

    x (B, 3, H, W); ``maps`` the ClassNet's output (or maps M_i (B, N, h_i, w_i)); labels (B, N); ``pairs`` (P, 2)
    as in :meth:`ImgMatchNet.forward`; ``chunk`` = images per encoder call (0 = all 2P at once). ``scale``
    multiplies every quantity that is back-propagated (fp16: a gradient scaler's ``scale``), so ``.grad`` holds the
    scaled gradients. Returns the match
    output and ``loss_fn``'s result on all pairs, both detached. Gradients are accumulated into ``.grad``.
    """
    scale = scale or _unscaled
    mm = matcher.masks(x, maps)
    pairs = matcher.select_pairs(maps, labels, pairs)
    n_pairs = pairs.shape[0]
    if n_pairs == 0 or matcher.fgbg == "pooled":                     # nothing to chunk: one forward, one backward
        match = matcher(x, maps, labels, mlps, pairs)
        terms = loss_fn(match.fg, match.bg, match.pairs)
        with _no_autocast(x):
            scale(_loss_total(terms)).backward()
        return _detached(match), _detached(terms)
    heads = matcher.heads(mlps)
    x_fg, x_bg = matcher.images(x, mm, matcher.channels(maps, pairs))   # eq. 5 images with their graph, (P, 3, H, W)
    per = max(1, chunk // 2) if chunk > 0 else n_pairs
    spans = [(s, min(s + per, n_pairs)) for s in range(0, n_pairs, per)]
    g_fg, g_bg = [], []                                              # d/d(images) per chunk
    if separable:
        f_fg, f_bg = [], []                                          # encoder outputs (p_c, d)
        for s, e in spans:
            p_c = e - s
            xin = torch.cat([x_fg[s:e], x_bg[s:e]]).detach().requires_grad_(True)   # the chunk's images as a leaf
            f = matcher.encoder.encode(xin)                          # (2p_c, d): this chunk's graph only
            f_leaf = f.detach().requires_grad_(True)
            part = _loss_total(loss_fn([h(f_leaf[:p_c]) for h in heads], [h(f_leaf[p_c:]) for h in heads],
                                       pairs[s:e]))
            with _no_autocast(x):                                    # backward outside autocast regions
                g_f, = torch.autograd.grad(scale(part * (p_c / n_pairs)), f_leaf)   # dL/d(features of this chunk)
                g_x, = torch.autograd.grad(f, xin, g_f)              # through the encoder; frees its graph
            f_fg.append(f_leaf.detach()[:p_c])
            f_bg.append(f_leaf.detach()[p_c:])
            g_fg.append(g_x[:p_c])
            g_bg.append(g_x[p_c:])
            del xin, f, f_leaf, part, g_f, g_x
        f_fg, f_bg = torch.cat(f_fg), torch.cat(f_bg)                # (P, d) each, in pair order
    else:
        with torch.no_grad():                                        # pass 1: features only
            f_all = [matcher.encoder.encode(torch.cat([x_fg[s:e], x_bg[s:e]]).detach()) for s, e in spans]
        f_fg = torch.cat([f[: e - s] for f, (s, e) in zip(f_all, spans)]).requires_grad_(True)
        f_bg = torch.cat([f[e - s:] for f, (s, e) in zip(f_all, spans)]).requires_grad_(True)
        del f_all
        whole = _loss_total(loss_fn([h(f_fg) for h in heads], [h(f_bg) for h in heads], pairs))
        with _no_autocast(x):
            d_fg, d_bg = torch.autograd.grad(scale(whole), [f_fg, f_bg])    # dL/d(features), all pairs
        for s, e in spans:                                           # pass 2: one chunk's encoder graph at a time
            xin = torch.cat([x_fg[s:e], x_bg[s:e]]).detach().requires_grad_(True)
            f = matcher.encoder.encode(xin)
            with _no_autocast(x):
                g_x, = torch.autograd.grad(f, xin, torch.cat([d_fg[s:e], d_bg[s:e]]).to(f.dtype))
            g_fg.append(g_x[: e - s])
            g_bg.append(g_x[e - s:])
            del xin, f, g_x
        f_fg, f_bg = f_fg.detach(), f_bg.detach()
    fg = [h(f_fg) for h in heads]
    bg = [h(f_bg) for h in heads]
    terms = loss_fn(fg, bg, pairs)
    total = _loss_total(terms)
    with _no_autocast(x):
        torch.autograd.backward([scale(total), x_fg, x_bg], [torch.ones_like(total), torch.cat(g_fg), torch.cat(g_bg)])
    return _detached(MatchOutput(pairs, fg, bg, mm.m, mm.b)), _detached(terms)


def _last_cam(out_c: Any) -> torch.Tensor:
    """The last level's CAM in logit units (scale x cosine map), the official code's cam4 for the CAM term."""
    return out_c.maps[-1] * out_c.scale[-1]


def loss_and_backward(model: PBIP, x: torch.Tensor, y: torch.Tensor, pairs: torch.Tensor, loss_cfg: Any,
                      chunk: int = 8, ddp_model: nn.Module | None = None,
                      scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LossTerms:
    """One step's loss terms (eq. 6) with their backward; returns the detached terms.

    Single process (``ddp_model is None``): FG/BG encoded and back-propagated chunk by chunk under the ``chunk`` memory
    cap (:func:`forward_backward`, exact; the official batch InfoNCE takes its non-separable path). Under DDP,
    ``ddp_model`` (the wrapped ``model``) runs one forward and one backward, which DDP needs to all-reduce the
    gradients. ``scale``: see
    :func:`forward_backward` (fp16 training).
    """
    if ddp_model is None and model.matcher is not None:
        out_c = model.classnet(x)
        protos = model.loss_prototypes(out_c)

        def loss_fn(fg, bg, p):
            return total_loss(out_c.logits.float(), y, fg, bg, protos, p, loss_cfg, last_map=_last_cam(out_c))

        _, terms = forward_backward(model.matcher, x, out_c, y, model.classnet.mlps, loss_fn, chunk, pairs,
                                    separable=loss_cfg.nce == "pair", scale=scale)
        return terms
    out_c, match = (ddp_model or model)(x, y, pairs)
    terms = total_loss(
        out_c.logits.float(), y,
        match.fg if match is not None else [], match.bg if match is not None else [],
        model.loss_prototypes(out_c), match.pairs if match is not None else None, loss_cfg,
        last_map=_last_cam(out_c),
    )
    (scale or _unscaled)(terms.total).backward()
    return _detached(terms)
