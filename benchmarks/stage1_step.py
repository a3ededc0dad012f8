"""One stage-1 training step (sec. 3.3-3.5, eq. 2-13): a one-graph reference step against ours.

    python benchmarks/stage1_step.py [--json OUT] [--encoder medclip] [--backbone mit_b1] [--steps 5] [--warmup 1]
                                     [--size 224] [--batch 10] [--positives 2] [--encoder-chunk 8]
                                     [--method pbip|official] [--modes reference,exact,pooled] [--device cpu|cuda]
                                     [--amp] [--text-tower]

``--method`` picks the configuration every mode runs: ``pbip`` (default: the paper's method, profile ``paper``) or
``official`` (the ``official`` preset: 4 levels with the last at stride 16, FG/BG images from the last level's
sub-class CAMs min-max scaled, raw encoder features against the raw prototypes, the batch InfoNCE, the CAM term).

Modes (same model, batch, prototypes and loss; only how X_FG / X_BG reach the encoder differs):

``reference``
    one graph, the way the official code runs its encoder: encoder weights requiring grad (weight gradients computed,
    never used, never zeroed), X_FG and X_BG encoded by two separate batched calls whose graphs are both alive until
    the one backward. With ``--method official`` this is the official step as written (train_stage_1.py), in this
    library's terms; with ``--method pbip`` it is the paper's method run that way, **not** the official step (the
    official code's own step, timed beside it in issue 12 at batch 10 x 224, 30 pairs, fp32, 2 threads, random
    weights: 16.1 s and 11.2 GB, against 23.1 s / 10.3 GB for this mode and 10.2 s / 2.8 GB for ``exact``).
    (The official code also builds an unused ~109M-parameter text tower; ``--text-tower`` builds a BERT-base of that
    size beside it to mirror the memory; off by default.)
``exact``
    ours: frozen encoder and :func:`pbip_core.engine.step.forward_backward`: chunks of ``--encoder-chunk``
    images (FG and BG of ``chunk // 2`` pairs in one call) are encoded, back-propagated to their masked images and freed
    one after the other (the batch InfoNCE of ``--method official`` takes the two-pass path: one more encoder forward);
    one backward through the backbone. Same mathematics as ``reference``; checked here.
``exact_plain``
    (optional) the DDP path of ``pbip_core.engine.step``: ``model(x, y)``, ``total_loss``, ``backward()``; frozen
    encoder, ``encode_chunked`` (checkpointed chunks when ``--encoder-chunk`` > 0, one call when 0).
``pooled``
    the approximation ``model.fgbg=pooled``: each image encoded once, the encoder's last tokens pooled under b*M and
    (1-b)(1-M). A different (cheaper) objective; its quality is a separate question (benchmarks/README.md).

All weights are random (MiT-B1 and the encoder's architecture only, built offline): the figures time the computation,
not a trained model. Each mode runs in a fresh subprocess (peak RSS per mode); the median of ``--steps`` timed steps
after ``--warmup`` untimed ones is reported, with the FLOP count of one step (torch.utils.flop_counter) and the
machine's dense fp32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

from pbip_core.config import Config, make_config  # noqa: E402
from pbip_core.engine.build import build_model  # noqa: E402
from pbip_core.engine.step import forward_backward  # noqa: E402
from pbip_core.method.losses import LossTerms, total_loss  # noqa: E402
from pbip_core.method.model import PBIP, positive_pairs  # noqa: E402
from pbip_core.nets.backbones import get_backbone  # noqa: E402
from pbip_core.nets.encoders import get_encoder  # noqa: E402

MODES = ("reference", "exact", "exact_plain", "pooled")
DEFAULT_MODES = ("reference", "exact", "pooled")
RANDOM_WEIGHTS = "random weights (architecture only): timing, not a trained model"


# ---------------------------------------------------------------------- the setting
@dataclass
class Setup:
    """A stage-1 model, its optimizer and one fixed batch."""

    cfg: Config
    model: PBIP
    x: torch.Tensor                     # (B, 3, S, S) in [0, 1]
    y: torch.Tensor                     # (B, N) 0/1, ``positives`` ones per row
    opt: torch.optim.Optimizer
    device: str
    pairs: torch.Tensor | None = None   # (P, 2) positive (image, class) pairs, computed from the CPU labels
    amp: bool = False
    text_tower: torch.nn.Module | None = None
    n_pairs: int = 0                    # FG/BG pairs of the first step (sub-class pairs with --method official)


def make_batch(batch: int, size: int, n_classes: int, positives: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch: x (B, 3, S, S) uniform in [0, 1], y (B, N) with ``positives`` random classes per image."""
    if not 1 <= positives <= n_classes:
        raise ValueError(f"--positives must be in 1..{n_classes} (got {positives})")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=gen)
    y = torch.zeros(batch, n_classes)
    for i in range(batch):
        y[i, torch.randperm(n_classes, generator=gen)[:positives]] = 1.0
    return x, y


def build_setup(encoder: str | torch.nn.Module = "medclip", backbone: str | torch.nn.Module = "mit_b1",
                size: int = 224, batch: int = 10, positives: int = 2, n_classes: int = 4, k: int = 3,
                encoder_chunk: int = 8, fgbg: str = "exact", device: str = "cpu", seed: int = 0,
                amp: bool = False, channels_last: bool = False, method: str = "pbip",
                overrides: dict[str, Any] | None = None) -> Setup:
    """The paper profile's stage-1 model (``method`` ``pbip`` or ``official``) with random-init weights (offline), a
    fixed batch and AdamW.

    ``encoder`` / ``backbone``: a name (random-init architecture from pbip_core) or a module (tests pass small ones).
    Everything is drawn from ``seed`` in a fixed order, so every mode starts from identical weights and data.
    """
    torch.manual_seed(seed)
    cfg = make_config("paper", {"method": method, "model.pretrained": False, "model.fgbg": fgbg,
                                "train.encoder_chunk": encoder_chunk, "train.amp": amp,
                                "train.channels_last": channels_last, **(overrides or {})})
    bb = (get_backbone(backbone, pretrained=False, output_stride=cfg.model.output_stride)
          if isinstance(backbone, str) else backbone)
    enc = get_encoder(encoder, random_init=True) if isinstance(encoder, str) else encoder
    protos = torch.nn.functional.normalize(torch.randn(n_classes, k, enc.dim), dim=-1)   # P (N, K, d)
    model = build_model(cfg, protos, enc, bb).to(device)
    model.train()
    x, y = make_batch(batch, size, n_classes, positives, seed)
    pairs = positive_pairs(y)                           # before the transfer, as the training loop does: no sync
    x, y, pairs = x.to(device), y.to(device), pairs.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    with torch.no_grad():                                # how many FG/BG pairs the first step builds
        n_pairs = int(model.matcher.select_pairs(model.classnet(x), y, pairs).shape[0])
    return Setup(cfg, model, x, y, opt, device, pairs, amp, n_pairs=n_pairs)


def _autocast(s: Setup) -> Any:
    on = s.amp and torch.device(s.device).type == "cuda"
    return torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=on)


def _loss(s: Setup, out, fg, bg, pairs) -> LossTerms:
    return total_loss(out.logits.float(), s.y, fg, bg, s.model.loss_prototypes(out), pairs, s.cfg.loss,
                      last_map=out.maps[-1] * out.scale[-1])


# ---------------------------------------------------------------------- one step per mode
def reference_step(s: Setup) -> LossTerms:
    """One graph: two batched encoder calls (X_FG, X_BG), both graphs alive, encoder weights with grad (the official
    code's handling of its encoder; with ``--method official`` the official step as written)."""
    m = s.model
    s.opt.zero_grad(set_to_none=True)                    # zeroes the ClassNet only: encoder grads accumulate
    with _autocast(s):
        out = m.classnet(s.x)
        mm = m.matcher.masks(s.x, out)
        pairs = m.matcher.select_pairs(out, s.y, s.pairs)
        x_fg, x_bg = m.matcher.images(s.x, mm, m.matcher.channels(out, pairs))
        f_fg = m.matcher.encoder.encode(x_fg)              # graph 1
        f_bg = m.matcher.encoder.encode(x_bg)              # graph 2, both kept for the backward
        heads = m.matcher.heads(m.classnet.mlps)
        terms = _loss(s, out, [h(f_fg) for h in heads], [h(f_bg) for h in heads], pairs)
    terms.total.backward()
    s.opt.step()
    return terms


def exact_step(s: Setup) -> LossTerms:
    """Ours: frozen encoder, chunks encoded and back-propagated one at a time (engine.step.forward_backward)."""
    m = s.model
    s.opt.zero_grad(set_to_none=True)
    with _autocast(s):
        out = m.classnet(s.x)
        _, terms = forward_backward(m.matcher, s.x, out, s.y, m.classnet.mlps,
                                    lambda fg, bg, pairs: _loss(s, out, fg, bg, pairs), s.cfg.train.encoder_chunk,
                                    s.pairs, separable=s.cfg.loss.nce == "pair")
    s.opt.step()
    return terms


def plain_step(s: Setup) -> LossTerms:
    """One graph (the DDP path of the training loop): forward, total_loss, backward (frozen encoder, encode_chunked)."""
    s.opt.zero_grad(set_to_none=True)
    with _autocast(s):
        out, match = s.model(s.x, s.y, s.pairs)
        terms = _loss(s, out, match.fg, match.bg, match.pairs)
    terms.total.backward()
    s.opt.step()
    return terms


STEPS: dict[str, Callable[[Setup], LossTerms]] = {
    "reference": reference_step, "exact": exact_step, "exact_plain": plain_step, "pooled": plain_step,
}


def prepare_mode(s: Setup, mode: str, text_tower: bool = False) -> None:
    """Switch a fresh setup to ``mode`` (reference: encoder weights require grad again; pooled: fgbg='pooled')."""
    if mode not in STEPS:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "reference":
        s.model.matcher.encoder.requires_grad_(True)       # as in the official code (not in the optimizer)
        if text_tower:
            s.text_tower = build_text_tower().to(s.device)
    elif mode == "pooled":
        s.model.matcher.fgbg = "pooled"


def build_text_tower() -> torch.nn.Module:
    """A BERT-base (~109M parameters, random init) like MedCLIP's unused text tower: memory only, never called."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig())


def step_record(s: Setup, terms: LossTerms) -> dict[str, Any]:
    """Loss terms and the gradients of every trainable parameter (backbone, MLPs) after one step."""
    return {"loss": terms.as_floats(),
            "grads": {n: p.grad.detach().float().cpu().clone() for n, p in s.model.classnet.named_parameters()
                      if p.requires_grad and p.grad is not None}}


def compare_records(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-4, atol: float = 1e-6) -> dict[str, Any]:
    """Same loss and same gradients within float tolerance? Gradients: max |g_a - g_b| / max |g_a| per tensor."""
    loss_diff = max(abs(a["loss"][k] - b["loss"][k]) for k in a["loss"])
    loss_ok = all(abs(a["loss"][k] - b["loss"][k]) <= atol + rtol * abs(a["loss"][k]) for k in a["loss"])
    same_keys = set(a["grads"]) == set(b["grads"])
    rel = 0.0
    for name, ga in a["grads"].items():
        gb = b["grads"].get(name)
        if gb is None:
            continue
        rel = max(rel, float((ga - gb).abs().max()) / max(float(ga.abs().max()), atol))
    return {"equal": bool(loss_ok and same_keys and rel <= rtol), "loss_max_abs_diff": loss_diff,
            "grad_max_rel_diff": rel, "n_grad_tensors": len(a["grads"]), "same_grad_tensors": same_keys,
            "rtol": rtol}


# ---------------------------------------------------------------------- FLOPs
def _conv_backward_flop_grouped(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                                _output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's conv backward formula with the weight-gradient term divided by ``groups``.

    torch.utils.flop_counter counts the weight gradient as conv(input^T, grad_out^T) over all C_in x C_out channel
    pairs; a grouped conv (MiT's depthwise 3x3 in every Mix-FFN: groups = C) only pairs channels within a group, so
    that term is ``groups`` times too large. The forward and input-gradient terms use the weight's shape
    (C_out, C_in / groups, kh, kw) and are right as they are.
    """
    from torch.utils.flop_counter import conv_flop_count, get_shape

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flop = 0
    if output_mask[0]:
        flop += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        gw = get_shape(out_shape[1])
        if transposed:
            flop += conv_flop_count(t(grad_out_shape), t(x_shape), t(gw), transposed=False) // groups
        else:
            flop += conv_flop_count(t(x_shape), t(grad_out_shape), t(gw), transposed=False) // groups
    return flop


def count_gflop(step: Callable[[Setup], Any], s: Setup) -> float:
    """GFLOP of one step (matmuls, convolutions, attention: what torch.utils.flop_counter counts), groups-corrected."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop_grouped}) as fc:
        step(s)
    return fc.get_total_flops() / 1e9


# ---------------------------------------------------------------------- one mode in this process
def run_mode(mode: str, args: argparse.Namespace, record_path: str | None = None) -> dict[str, Any]:
    """Build, run ``warmup`` + ``steps`` steps of ``mode``, measure; the first step's loss/grads go to ``record_path``."""
    t0 = time.perf_counter()
    s = build_setup(args.encoder, args.backbone, args.size, args.batch, args.positives, args.classes, args.k,
                    args.encoder_chunk, "exact", args.device, args.seed, args.amp, args.channels_last, args.method)
    prepare_mode(s, mode, args.text_tower)
    build_s = time.perf_counter() - t0
    step = STEPS[mode]
    terms = step(s)                                          # first step: the one compared between modes
    if record_path:
        torch.save(step_record(s, terms), record_path)
    times = C.time_calls(lambda: step(s), args.steps, max(0, args.warmup - 1), args.device)
    rss = C.peak_rss_mb()
    res = {"mode": mode, "median_s": statistics.median(times["wall"]), "times_s": [round(t, 4) for t in times["wall"]],
           "median_cpu_s": statistics.median(times["cpu"]), "cpu_times_s": [round(t, 4) for t in times["cpu"]],
           "threads": torch.get_num_threads(),
           "peak_rss_mb": round(rss, 1), "build_s": round(build_s, 2), "loss_first_step": terms.as_floats(),
           "n_pairs": s.n_pairs, "encoder_images_per_step": (2 * s.n_pairs if mode != "pooled" else args.batch),
           "encoder_source": getattr(s.model.matcher.encoder, "pretrained_source", ""),
           "backbone_source": getattr(s.model.classnet.backbone, "pretrained_source", ""),
           "text_tower_params": (sum(p.numel() for p in s.text_tower.parameters()) if s.text_tower else 0)}
    if torch.device(args.device).type == "cuda":
        res["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    if not args.no_flops:
        res["gflop_per_step"] = round(count_gflop(step, s), 4)
    return res


def _child_argv(args: argparse.Namespace, mode: str, out: Path, record: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, "--_child-out", str(out),
            "--_record", str(record)]
    for key in ("encoder", "backbone", "steps", "warmup", "size", "batch", "positives", "classes", "k",
                "encoder_chunk", "device", "seed", "threads", "method"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for flag in ("amp", "channels_last", "text_tower", "no_flops"):
        if getattr(args, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    return argv


# ---------------------------------------------------------------------- report
def summarize(results: dict[str, dict[str, Any]], check: dict[str, Any] | None, gflops: float,
              args: argparse.Namespace, load_before: list[float], load_after: list[float]) -> dict[str, Any]:
    t = {m: r["median_s"] for m, r in results.items()}
    out: dict[str, Any] = {f"{m}_s": round(v, 4) for m, v in t.items()}
    out.update({f"{m}_cpu_s": round(r["median_cpu_s"], 4) for m, r in results.items()})
    out.update({f"{m}_min_s": round(min(r["times_s"]), 4) for m, r in results.items()})
    if "reference" in t and "exact" in t:
        out["speedup"] = round(t["reference"] / t["exact"], 3)
        # fastest step against fastest step: the reference's step time is bimodal on CPU (its ~8 GB of graphs are
        # sometimes re-faulted from the OS), so the median alone can flatter or hide the difference
        out["speedup_min"] = round(min(results["reference"]["times_s"]) / min(results["exact"]["times_s"]), 3)
        out["speedup_cpu"] = round(results["reference"]["median_cpu_s"] / results["exact"]["median_cpu_s"], 3)
    if "reference" in t and "pooled" in t:
        out["pooled_speedup"] = round(t["reference"] / t["pooled"], 3)
        out["pooled_speedup_cpu"] = round(results["reference"]["median_cpu_s"] / results["pooled"]["median_cpu_s"], 3)
    if "reference" in t and "exact_plain" in t:
        out["exact_plain_speedup"] = round(t["reference"] / t["exact_plain"], 3)
    out["peak_rss_mb"] = {m: r["peak_rss_mb"] for m, r in results.items()}
    if "reference" in results and "exact" in results:
        out["exact_memory_ratio"] = round(results["exact"]["peak_rss_mb"] / results["reference"]["peak_rss_mb"], 3)
    if any("peak_cuda_mb" in r for r in results.values()):
        out["peak_cuda_mb"] = {m: r.get("peak_cuda_mb") for m, r in results.items()}
    if all("gflop_per_step" in r for r in results.values()):
        out["gflop_per_step"] = {m: r["gflop_per_step"] for m, r in results.items()}
        floor = {m: r["gflop_per_step"] / gflops for m, r in results.items()}
        out["flop_floor_s"] = {m: round(f, 4) for m, f in floor.items()}
        # measured step time as a multiple of the FLOP floor, and its inverse: the share of the matmul rate reached
        out["time_over_floor"] = {m: (round(r["median_s"] / floor[m], 3) if floor[m] > 0 else None)
                                  for m, r in results.items()}
        out["floor_fraction"] = {m: round(floor[m] / r["median_s"], 4) for m, r in results.items()}
    out.update({
        "gflops_machine": round(gflops, 1), "device": args.device, "encoder": args.encoder, "backbone": args.backbone,
        "weights": RANDOM_WEIGHTS, "method": args.method, "size": args.size, "batch": args.batch,
        "positives": args.positives,
        "classes": args.classes, "pairs": next(iter(results.values()))["n_pairs"] if results else 0,
        "encoder_chunk": args.encoder_chunk, "amp": args.amp, "channels_last": args.channels_last,
        "text_tower": args.text_tower, "steps": args.steps, "warmup": args.warmup,
        "reference_exact_check": check, "load_average_before": load_before, "load_average_after": load_after,
        "machine": C.machine_info(args.device), "modes": results,
    })
    return out


def print_table(summary: dict[str, Any]) -> None:
    modes = summary["modes"]
    ref = modes.get("reference", {}).get("median_s")
    print(f"\nstage-1 step, method {summary['method']}: {summary['backbone']} + {summary['encoder']} "
          f"({summary['weights']}), "
          f"batch {summary['batch']} x {summary['size']} px, {summary['pairs']} pairs, device {summary['device']}, "
          f"encoder_chunk {summary['encoder_chunk']}")
    ref_cpu = modes.get("reference", {}).get("median_cpu_s")
    ref_min = min(modes["reference"]["times_s"]) if "reference" in modes else None
    print(f"{'mode':<12} {'wall s':>8} {'speedup':>8} {'min s':>8} {'speedup':>8} {'cpu s':>8} {'speedup':>8} "
          f"{'peak RSS MB':>12} {'GFLOP':>8} {'x floor':>8}")
    for m, r in modes.items():
        sp = f"{ref / r['median_s']:.2f}x" if ref else "-"
        spm = f"{ref_min / min(r['times_s']):.2f}x" if ref_min else "-"
        spc = f"{ref_cpu / r['median_cpu_s']:.2f}x" if ref_cpu else "-"
        gf = summary.get("gflop_per_step", {}).get(m)
        xf = summary.get("time_over_floor", {}).get(m)
        print(f"{m:<12} {r['median_s']:>8.3f} {sp:>8} {min(r['times_s']):>8.3f} {spm:>8} {r['median_cpu_s']:>8.3f} "
              f"{spc:>8} {r['peak_rss_mb']:>12.0f} {(f'{gf:.0f}' if gf is not None else '-'):>8} "
              f"{(f'{xf:.2f}' if xf is not None else '-'):>8}")
    print("(wall = median elapsed, min = fastest step, cpu = median CPU time of this process; "
          "x floor = wall / (GFLOP / matmul rate))")
    print(f"dense fp32 matmul: {summary['gflops_machine']:.0f} GFLOP/s; load average before {summary['load_average_before']}"
          f", after {summary['load_average_after']}")
    chk = summary.get("reference_exact_check")
    if chk:
        print(f"reference vs exact, first step: {'EQUAL' if chk['equal'] else 'DIFFERENT'} (loss max |diff| "
              f"{chk['loss_max_abs_diff']:.2e}, gradient max rel diff {chk['grad_max_rel_diff']:.2e} over "
              f"{chk['n_grad_tensors']} tensors)")


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--encoder", default="medclip", help="encoder architecture (random weights), default medclip")
    p.add_argument("--backbone", default="mit_b1", help="backbone architecture (random init), default mit_b1")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one is also the checked one)")
    p.add_argument("--size", type=int, default=224, help="image size in px")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--positives", type=int, default=2, help="positive classes per image (pairs = batch x positives)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--k", type=int, default=3, help="prototypes per class")
    p.add_argument("--encoder-chunk", type=int, default=8,
                   help="images per encoder call in exact / exact_plain (0 = all in one call)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--method", default="pbip", choices=["pbip", "official"],
                   help="the configuration every mode runs: the paper's method, or the official preset (then "
                        "`reference` is the official step's structure)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU only; ignored on CPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last images and model")
    p.add_argument("--text-tower", action="store_true", help="reference also holds a 109M BERT-base (memory only)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); on a loaded machine 1 avoids OpenMP stalls")
    p.add_argument("--in-process", action="store_true", help="run the modes in this process (peaks then mix)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_record", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1:
        p.error("--steps must be >= 1")
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args._child:                                          # one mode in a fresh process
        res = run_mode(args._child, args, args._record)
        C.write_json(args._child_out, res)
        return 0
    modes = args.modes.split(",")
    load_before = C.load_average()
    print(f"load average {load_before}; measuring the dense matmul rate ...", flush=True)
    gflops = C.machine_gflops(device=args.device)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pbip-bench-") as tmp:
        tmpd = Path(tmp)
        for mode in modes:
            print(f"mode {mode} ...", flush=True)
            out, rec = tmpd / f"{mode}.json", tmpd / f"{mode}.pt"
            if args.in_process:
                results[mode] = run_mode(mode, args, str(rec))
            else:
                proc = subprocess.run(_child_argv(args, mode, out, rec))
                if proc.returncode != 0:
                    print(f"mode {mode} failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
                results[mode] = json.loads(out.read_text())
            print(f"  {mode}: median {results[mode]['median_s']:.3f} s, peak RSS {results[mode]['peak_rss_mb']:.0f} MB",
                  flush=True)
        check = None
        if "reference" in modes and "exact" in modes:
            a = torch.load(tmpd / "reference.pt", weights_only=False)
            b = torch.load(tmpd / "exact.pt", weights_only=False)
            # bf16 autocast changes rounding between the two orders of work: compare loosely there
            check = compare_records(a, b, rtol=5e-2 if args.amp and args.device != "cpu" else 1e-4)
    summary = summarize(results, check, gflops, args, load_before, C.load_average())
    print_table(summary)
    if args.json:
        C.write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0 if (check is None or check["equal"]) else 2


if __name__ == "__main__":
    sys.exit(main())
