"""Stage 1 training loop (sec. 4.1): AdamW on ClassNet, frozen encoder, per-epoch validation, atomic checkpoints.

A run folder holds ``config.yaml`` (the resolved config), ``last.pt`` (model + optimizer + scheduler + RNG, written
atomically after every epoch), ``best.pt`` (the model with the best validation pseudo-mask mIoU), ``history.json``
(loss terms per step, validation per epoch) and ``metrics.json``. ``resume=True`` continues from ``last.pt`` and gives
the same numbers as an uninterrupted run on CPU: data order and augmentation are drawn from generators seeded by
``(train.seed, epoch)``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU);
each rank sees its shard of every epoch's permutation and rank 0 validates and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .config import Config, load_config, make_config
from .errors import DataError, PBIPError, TrainingError
from .io import atomic_torch_save, atomic_write_json
from .losses import TERM_NAMES
from .model import positive_pairs


# ---------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's augmentation on a batch: random horizontal/vertical flips and rot90.  x (B, 3, H, W), square."""
    out = []
    for img in x:
        r = torch.randint(0, 8, (1,), generator=gen).item()
        if r & 1:
            img = img.flip(-1)
        if r & 2:
            img = img.flip(-2)
        if r & 4:
            img = img.transpose(-1, -2)
        out.append(img)
    return torch.stack(out)


def lr_lambda(schedule: str, total_steps: int, warmup: int = 0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, step / max(1, total_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "poly":
            return (1.0 - frac) ** 0.9
        return 1.0
    return f


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---------------------------------------------------------------------- building
def prepare(cfg: Config, data_root: str | Path, bank_path: str | Path, device: str) -> tuple[Any, Any, Any]:
    """Load the bank, encoder and model for ``cfg``. Returns (model, bank, info)."""
    from .bank import PrototypeBank
    from .data import load_info
    from .encoders import get_encoder
    from .model import build_model

    info = load_info(data_root)
    bank = PrototypeBank.load(bank_path)
    if bank.n_classes != info.n_classes:
        raise DataError(f"{bank_path}: bank has {bank.n_classes} classes {bank.classes} but {data_root} has "
                        f"{info.n_classes} {list(info.classes)}; rebuild it with `pbip bank --data {data_root}`")
    encoder = None
    if cfg.loss.fgs or cfg.loss.bgs:
        enc_name = bank.encoder if bank.encoder not in ("unknown", "official-pickle") else cfg.bank.encoder
        encoder = get_encoder(enc_name, device=device, input_size=cfg.bank.encoder_size or None)
        if getattr(encoder, "dim", bank.dim) != bank.dim:
            raise PBIPError(f"encoder {enc_name!r} gives d={encoder.dim} features but the bank holds d={bank.dim}")
    model = build_model(cfg, bank.features, encoder).to(device)
    return model, bank, info


def load_classnet(run_dir: str | Path, checkpoint: str = "best.pt", device: str = "cpu"):
    """Rebuild the ClassNet of a run from its config and checkpoint (no pretrained weights needed)."""
    from .backbones import get_backbone
    from .model import ClassNet

    run = Path(run_dir)
    ckpt_path = run / checkpoint
    if not ckpt_path.is_file():
        ckpt_path = run / "last.pt"
    if not (run / "config.yaml").is_file() or not ckpt_path.is_file():
        raise DataError(f"{run}: not a finished stage-1 run (needs config.yaml and {checkpoint} or last.pt)")
    cfg = load_config(run / "config.yaml")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    sd = state["classnet"]
    protos = sd["prototypes"]
    backbone = get_backbone(cfg.model.backbone, pretrained=False)
    m = cfg.model
    net = ClassNet(backbone, protos, m.levels, m.sim, m.proj_hidden, m.logit_scale, m.learn_logit_scale,
                   m.normalize_prototypes)
    net.load_state_dict(sd)
    return net.to(device).eval(), cfg


# ---------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    data_root: str | Path,
    bank_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train stage 1 and return the run's metrics (also in ``out_dir/metrics.json``).

    ``stop_after_epoch`` ends the run after that many epochs as if interrupted (tests of ``resume``).
    """
    from tqdm.auto import tqdm

    from .bank import resolve_device
    from .data import TrainDataset
    from .losses import total_loss
    from .pseudo import evaluate_pseudo

    out = Path(out_dir)
    rank, world = _dist_info()
    device = resolve_device(device or cfg.train.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if not Path(data_root).is_dir():
        raise DataError(f"{data_root}: dataset folder not found")
    cfg.data.root = str(data_root)

    last = out / "last.pt"
    state = None
    if resume and last.is_file():
        saved = load_config(out / "config.yaml")
        if saved.stage1_hash() != cfg.stage1_hash():
            raise PBIPError(f"{out}: --resume with a different configuration than the saved config.yaml "
                            f"(saved {saved.stage1_hash()}, now {cfg.stage1_hash()}); use a new --out folder")
        state = torch.load(last, map_location="cpu", weights_only=False)
    elif (out / "metrics.json").is_file() and not resume:
        raise PBIPError(f"{out}: already holds a finished run; pass --resume to continue or use a new --out folder")

    seed_everything(cfg.train.seed)
    model, bank, info = prepare(cfg, data_root, bank_path, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")

    ds = TrainDataset(data_root, image_size=cfg.data.image_size, augment=False, max_items=cfg.data.max_train,
                      info=info)
    if len(ds) == 0:
        raise DataError(f"{data_root}/train: no training images")
    steps_per_epoch = math.ceil(len(ds) / (cfg.train.batch_size * world))
    total_steps = steps_per_epoch * cfg.train.epochs

    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.schedule, total_steps, cfg.train.warmup_steps))
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    history: dict[str, list] = {"steps": [], "epochs": []}
    best = {"miou": -1.0, "epoch": -1}
    start_epoch, step = 0, 0
    if state is not None:
        model.classnet.load_state_dict(state["classnet"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        start_epoch, step = state["epoch"], state["step"]
        _set_rng_state(state["rng"])

    on_gpu = "cuda" in device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.train.amp and on_gpu) else None
    # single process: FG/BG encoded and back-propagated chunk by chunk (exact; fewer FLOPs and less memory than one
    # autograd graph, see benchmarks/README.md); DDP needs one forward and one backward per step
    chunked = world == 1 and model.matcher is not None
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        ddp_model.train()
        gen = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
        perm = torch.randperm(len(ds), generator=gen)[rank::world]
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.train.batch_size, sampler=perm.tolist(), num_workers=cfg.data.num_workers,
            pin_memory="cuda" in device, persistent_workers=False,
        )
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not progress or rank != 0,
                   unit="batch")
        pending: list[tuple[int, float, torch.Tensor]] = []     # (step, lr, detached loss terms) not yet logged
        for batch in bar:
            x, y = batch["image"], batch["label"].float()
            if cfg.data.augment:
                x = augment_batch(x, gen)
            pairs = positive_pairs(y)                               # on the CPU labels: no device sync in the step
            if on_gpu:
                pairs = pairs.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            pairs = pairs.to(device, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with autocast if autocast is not None else _null():
                terms = _loss_and_backward(model, ddp_model, x, y, pairs, cfg, chunked)
            step += 1
            pending.append((step, sched.get_last_lr()[0], terms.stacked()))
            # CPU: check every step (free). GPU: every log_every steps, so the step has no host-device sync.
            if not on_gpu or len(pending) >= cfg.train.log_every:
                _flush(pending, history, epoch, cfg, last, bar if (rank == 0 and progress) else None)
            opt.step()
            sched.step()
        _flush(pending, history, epoch, cfg, last, None)
        bar.close()

        ep = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 2)}
        if rank == 0 and cfg.train.val_every and (epoch + 1) % cfg.train.val_every == 0 \
                and (Path(data_root) / "val").is_dir():
            val = evaluate_pseudo(model.classnet, data_root, "val", cfg, "gt", device, max_items=cfg.train.max_val)
            ep.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
            if val["miou"] > best["miou"]:
                best = {"miou": float(val["miou"]), "epoch": epoch + 1, "val": val}
                atomic_torch_save({"classnet": model.classnet.state_dict(), "epoch": epoch + 1}, out / "best.pt")
        history["epochs"].append(ep)
        if rank == 0:
            atomic_torch_save({
                "classnet": model.classnet.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step, "history": history,
                "best": best, "rng": _rng_state(), "config_hash": cfg.stage1_hash(),
            }, last)
            atomic_write_json(out / "history.json", history)
        if world > 1:
            dist.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.train.epochs:
            return {"interrupted_after_epoch": epoch + 1}

    metrics = {"best_epoch": best["epoch"], "best_val_miou": best["miou"], "val": best.get("val"),
               "epochs": cfg.train.epochs, "steps": step, "config_hash": cfg.stage1_hash(), "method": cfg.method,
               "seconds": sum(e["seconds"] for e in history["epochs"])}
    if rank == 0:
        if best["epoch"] < 0:                       # no validation: the last model is the one to use
            atomic_torch_save({"classnet": model.classnet.state_dict(), "epoch": cfg.train.epochs}, out / "best.pt")
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _loss_and_backward(model: Any, ddp_model: Any, x: torch.Tensor, y: torch.Tensor, pairs: torch.Tensor,
                       cfg: Config, chunked: bool):
    """One step's loss (eq. 6) and its backward. ``chunked``: FG/BG encoded and back-propagated chunk by chunk under
    the ``train.encoder_chunk`` memory cap (exact; see ImgMatchNet.forward_backward)."""
    from .losses import total_loss

    if chunked:
        out_c = model.classnet(x)

        def loss_fn(fg, bg, pairs):
            return total_loss(out_c.logits.float(), y, fg, bg, out_c.protos, pairs, cfg.loss, last_map=out_c.maps[-1])

        _, terms = model.matcher.forward_backward(x, out_c.maps, y, model.classnet.mlps, loss_fn, pairs)
        return terms
    out_c, match = ddp_model(x, y, pairs)
    terms = total_loss(
        out_c.logits.float(), y,
        match.fg if match is not None else [], match.bg if match is not None else [],
        out_c.protos, match.pairs if match is not None else None, cfg.loss,
        last_map=out_c.maps[-1],
    )
    terms.total.backward()
    return terms


def _flush(pending: list, history: dict, epoch: int, cfg: Config, last: Path, bar: Any) -> None:
    """Move pending loss terms to the history (one host-device sync); stop on a non-finite loss before the
    optimizer applies it."""
    if not pending:
        return
    vals = torch.stack([t for _, _, t in pending]).cpu()          # (S, 6)
    for (step, lr, _), row in zip(pending, vals.tolist()):
        rec = {"epoch": epoch + 1, "step": step, "lr": lr, **dict(zip(TERM_NAMES, row))}
        if not all(math.isfinite(v) for v in row):
            raise TrainingError(
                f"non-finite loss ({ {k: rec[k] for k in TERM_NAMES} }) at epoch {epoch + 1}, step {step}; "
                f"lower train.lr (now {cfg.train.lr}) or check the input images; last good checkpoint: {last}"
            )
        history["steps"].append(rec)
    pending.clear()
    if bar is not None:
        r = history["steps"][-1]
        bar.set_postfix(loss=f"{r['total']:.3f}", cls=f"{r['cls']:.3f}", fgs=f"{r['fgs']:.3f}", bgs=f"{r['bgs']:.3f}")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config_cli import add_config_arguments

    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--bank", required=True, help="prototype bank (.pt from `pbip bank`, or the official pickle)")
    p.add_argument("--out", required=True, help="run folder")
    add_config_arguments(p, resume=True)
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: train.device)")


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args.profile, args.overrides, args.config)
    m = train(cfg, args.data, args.bank, args.out, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in m.items() if k != "val"}, indent=None))
        if m.get("val"):
            print(f"best epoch {m['best_epoch']}: val pseudo-mask mIoU {m['val']['miou']:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
