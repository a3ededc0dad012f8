"""Stage 1 training loop (sec. 4.1): AdamW on ClassNet, frozen encoder, per-epoch validation, atomic checkpoints.

A run folder holds ``config.yaml`` (the resolved config), ``last.pt`` (model + optimizer + scheduler + RNG, written
atomically after every epoch), ``best.pt`` (the model with the best validation pseudo-mask mIoU), ``history.json``
(loss terms per step, validation per epoch) and ``metrics.json``. ``resume=True`` continues from ``last.pt`` and gives
the same numbers as an uninterrupted run on CPU: data order and augmentation are drawn from generators seeded by
``(train.seed, epoch)``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU,
with the ``train.dist_timeout_min`` timeout); each rank sees an equal-length shard of every epoch's permutation
(:func:`~pbip_core.engine.runtime.equal_shard`: the same number of batches on every rank) and rank 0 validates and
writes. ``train.amp`` (bf16 | fp16 | off) sets the autocast dtype; fp16 adds a gradient scaler. ``run_info.json`` and
the first lines printed say where the run ran (device, world size, dtype) and where every weight came from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import Config, load_config
from ..data import TrainDataset
from ..data.check import preflight_dataset
from ..errors import DataError, PBIPError, TrainingError
from ..io import atomic_write_json, check_output_dir
from ..method.losses import TERM_NAMES
from ..method.model import PBIP, positive_pairs
from .bank import load_bank
from .build import check_bank, prepare, run_description
from .checkpoint import load_checkpoint, save_checkpoint
from .claims import claim_run, empty_run_folder, refuse_partial_run
from .pseudo import evaluate_pseudo
from .runtime import (autocast, device_for, equal_shard, grad_scaler, init_distributed, lr_lambda, rng_state,
                      seed_everything, set_rng_state)
from .step import loss_and_backward


@dataclass
class Progress:
    """What a resumed run continues from."""

    epoch: int = 0
    step: int = 0
    history: dict[str, list] = field(default_factory=lambda: {"steps": [], "epochs": []})
    best: dict[str, Any] = field(default_factory=lambda: {"miou": -1.0, "epoch": -1})


#: What a stage-1 ``last.pt`` must hold to be resumed from.
STATE_KEYS = ("classnet", "optimizer", "scheduler", "epoch", "step", "history", "best", "rng")


def _resume_state(cfg: Config, out: Path, resume: bool) -> dict[str, Any] | None:
    """The saved ``last.pt`` when resuming (same stage-1 configuration required); without ``resume``, refuse a folder
    that holds a run (finished or partial)."""
    last = out / "last.pt"
    refuse_partial_run(out, resume)
    if resume and last.is_file():
        saved = load_config(out / "config.yaml")
        if saved.stage1_hash() != cfg.stage1_hash():
            raise PBIPError(f"{out}: --resume with a different configuration than the saved config.yaml "
                            f"(saved {saved.stage1_hash()}, now {cfg.stage1_hash()}); use a new --out folder")
        return load_checkpoint(last, "stage-1 checkpoint", keys=STATE_KEYS,
                               hint=f"start over with --overwrite (this deletes the run; {out / 'best.pt'}, the best "
                                    "model so far, goes with it: copy it first if you need it)")
    return None


def preflight(cfg: Config, data_root: str | Path, bank_path: str | Path, out: Path, resume: bool = False,
              overwrite: bool = False) -> None:
    """Everything cheap that can be wrong, checked before a file is written or a step taken: the flags, the output
    folder, the dataset (labels, image modes, every validation mask) and the bank. One-line errors naming the file."""
    if resume and overwrite:
        raise PBIPError("--resume continues a run and --overwrite deletes it: pass one of them")
    if not Path(data_root).is_dir():
        raise DataError(f"{data_root}: dataset folder not found")
    check_output_dir(out)
    val = cfg.train.val_every > 0 and (Path(data_root) / "val").is_dir()
    info = preflight_dataset(data_root, splits=("val",) if val else (), train=True)
    check_bank(load_bank(bank_path), info, bank_path)


def _epoch_loader(ds: TrainDataset, cfg: Config, epoch: int, rank: int, world: int, device: str):
    """This rank's equal-length shard of epoch ``epoch``'s permutation (seeded by ``(train.seed, epoch)``)."""
    ds.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
    perm = equal_shard(torch.randperm(len(ds), generator=gen), rank, world)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, sampler=perm.tolist(),
                                       num_workers=cfg.data.num_workers, pin_memory="cuda" in device)


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


def _train_epoch(model: PBIP, ddp_model: Any, loader: Any, opt: Any, sched: Any, cfg: Config, prog: Progress,
                 epoch: int, device: str, last: Path, show: bool, scaler: Any = None) -> None:
    """One epoch of optimizer steps; loss terms go to ``prog.history`` (checked for NaN before each update).
    ``scaler``: the fp16 gradient scaler (:func:`~pbip_core.engine.runtime.grad_scaler`; None = none)."""
    on_gpu = "cuda" in device
    scaler = scaler or grad_scaler("off", device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not show, unit="batch")
    pending: list[tuple[int, float, torch.Tensor]] = []           # (step, lr, detached loss terms) not yet logged
    for batch in bar:
        x, y = batch["image"], batch["label"].float()
        pairs = positive_pairs(y)                                   # on the CPU labels: no device sync in the step
        if on_gpu:
            pairs = pairs.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        pairs = pairs.to(device, non_blocking=True)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.train.amp, device):
            terms = loss_and_backward(model, x, y, pairs, cfg.loss, cfg.train.encoder_chunk,
                                      ddp_model if ddp_model is not model else None, scale=scaler.scale)
        prog.step += 1
        pending.append((prog.step, sched.get_last_lr()[0], terms.stacked()))
        # CPU: check every step (free). GPU: every log_every steps, so the step has no host-device sync.
        if not on_gpu or len(pending) >= cfg.train.log_every:
            _flush(pending, prog.history, epoch, cfg, last, bar if show else None)
        scaler.step(opt)                                            # = opt.step() unless fp16
        scaler.update()
        sched.step()
    _flush(pending, prog.history, epoch, cfg, last, None)
    bar.close()


def _validate(model: PBIP, cfg: Config, data_root: str | Path, device: str, epoch: int, prog: Progress,
              out: Path, ep: dict[str, Any]) -> None:
    """Validation pseudo-mask scores into the epoch record; the best model so far to ``best.pt``."""
    val = evaluate_pseudo(model.classnet, data_root, "val", cfg, cfg.pseudo.labels, device,
                          max_items=cfg.train.max_val)
    ep.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
    if val["miou"] > prog.best["miou"]:
        prog.best = {"miou": float(val["miou"]), "epoch": epoch + 1, "val": val}
        save_checkpoint({"classnet": model.classnet.state_dict(), "epoch": epoch + 1}, out / "best.pt")


def train(
    cfg: Config,
    data_root: str | Path,
    bank_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train stage 1 and return the run's metrics (also in ``out_dir/metrics.json``).

    First :func:`preflight` (nothing is written when it fails); then ``out_dir`` is claimed for this process
    (:mod:`pbip_core.engine.claims`: a second process refuses, naming this one). A folder that holds a run needs
    ``resume`` (continue from its ``last.pt``) or ``overwrite`` (empty it first). ``stop_after_epoch`` ends the run
    after that many epochs as if interrupted (tests of ``resume``).
    """
    rank, world, device = init_distributed(device_for(cfg, device), cfg.train.dist_timeout_min)
    preflight(cfg, data_root, bank_path, Path(out_dir), resume, overwrite)
    with claim_run(out_dir, "stage-1 run", enabled=rank == 0):
        if overwrite and rank == 0:
            empty_run_folder(Path(out_dir))
        if world > 1:
            dist.barrier()
        return _train(cfg, data_root, bank_path, out_dir, resume, device, progress, stop_after_epoch)


def _train(cfg: Config, data_root: str | Path, bank_path: str | Path, out_dir: str | Path, resume: bool,
           device: str | None, progress: bool, stop_after_epoch: int | None) -> dict[str, Any]:
    """The stage-1 loop of :func:`train`, in a claimed and checked run folder."""
    out = Path(out_dir)
    rank, world, device = init_distributed(device_for(cfg, device), cfg.train.dist_timeout_min)
    if not Path(data_root).is_dir():
        raise DataError(f"{data_root}: dataset folder not found")
    cfg.data.root = str(data_root)
    last = out / "last.pt"
    state = _resume_state(cfg, out, resume)

    seed_everything(cfg.train.seed)
    model, bank, info = prepare(cfg, data_root, bank_path, device)
    run_info = run_description(model, bank, cfg, device, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        atomic_write_json(out / "run_info.json", run_info)
        print(run_info["summary"], flush=True)
    ds = TrainDataset(data_root, image_size=cfg.data.image_size, augment=cfg.data.augment,
                      max_items=cfg.data.max_train, info=info, seed=cfg.train.seed)
    total_steps = math.ceil(len(ds) / (cfg.train.batch_size * world)) * cfg.train.epochs
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.schedule, total_steps, cfg.train.warmup_steps))
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1
                 else model)
    scaler = grad_scaler(cfg.train.amp, device)

    prog = Progress()
    if state is not None:
        model.classnet.load_state_dict(state["classnet"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        prog = Progress(state["epoch"], state["step"], state["history"], state["best"])
        set_rng_state(state["rng"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    for epoch in range(prog.epoch, cfg.train.epochs):
        t0 = time.time()
        ddp_model.train()
        loader = _epoch_loader(ds, cfg, epoch, rank, world, device)
        _train_epoch(model, ddp_model, loader, opt, sched, cfg, prog, epoch, device, last, progress and rank == 0,
                     scaler)
        ep = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 2)}
        if rank == 0 and cfg.train.val_every and (epoch + 1) % cfg.train.val_every == 0 \
                and (Path(data_root) / "val").is_dir():
            _validate(model, cfg, data_root, device, epoch, prog, out, ep)
        prog.history["epochs"].append(ep)
        if rank == 0:
            save_checkpoint({
                "classnet": model.classnet.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": prog.step, "history": prog.history,
                "best": prog.best, "rng": rng_state(), "config_hash": cfg.stage1_hash(), "scaler": scaler.state_dict(),
            }, last)
            atomic_write_json(out / "history.json", prog.history)
        if world > 1:
            dist.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.train.epochs:
            return {"interrupted_after_epoch": epoch + 1}
    if world > 1:                           # recorded: every rank took the same number of steps (equal shards)
        steps: list[Any] = [None] * world
        dist.all_gather_object(steps, prog.step)
        run_info["steps_per_rank"] = steps
    return _finish(model, cfg, prog, out, rank, run_info)


def _finish(model: PBIP, cfg: Config, prog: Progress, out: Path, rank: int,
            run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics.json`` of a finished run (and ``best.pt`` = the last model when nothing was validated)."""
    metrics = {"best_epoch": prog.best["epoch"], "best_val_miou": prog.best["miou"], "val": prog.best.get("val"),
               "epochs": cfg.train.epochs, "steps": prog.step, "config_hash": cfg.stage1_hash(), "method": cfg.method,
               "seconds": sum(e["seconds"] for e in prog.history["epochs"]),
               "run": {k: v for k, v in (run_info or {}).items() if k != "summary"}}
    if rank == 0:
        if prog.best["epoch"] < 0:                   # no validation: the last model is the one to use
            save_checkpoint({"classnet": model.classnet.state_dict(), "epoch": cfg.train.epochs}, out / "best.pt")
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
