"""Stage 2: a DeepLab-v2 segmentation network trained on the stage-1 pseudo masks (sec. 4.1).

The paper trains "an unmodified DeepLab-v2 model [5]" (Chen et al., TPAMI 2017) on the pseudo masks; the network is
:class:`pbip_core.nets.deeplab.DeepLabV2`. Training follows the DeepLab-v2 defaults (the paper gives no stage-2
hyperparameters, so the book uses the ones of the model it names): SGD with momentum 0.9, weight decay 5e-4, base
learning rate 2.5e-4 for the backbone and 10x for the ASPP head, poly schedule ``lr = base * (1 - it / max_it) ** 0.9``.
(The original Caffe code also gives biases 2x the rate and uses batch-norm statistics frozen from ImageNet; we keep
torch defaults for both.)

Loss: pixel-wise cross-entropy on the pseudo masks. **Pixels whose pseudo label is ``background_index`` (white,
non-tissue background) and any label outside ``0..N-1`` are ignored** (``ignore_index``): stage 2 learns the N
tissue classes only, matching the metric convention that background ground truth is never scored.

Inference: logits of the (resized) image are upsampled to the mask's original size; with ``stage2.ms_flip`` the
softmax is averaged over scales (0.75, 1, 1.25) and horizontal flips. The prediction is the argmax over the N tissue
classes.

Outputs of ``pbip stage2 --data D --masks DIR --out RUN2``: ``RUN2/config.yaml``, ``last.pt`` (every epoch, with
optimiser/scheduler/RNG state), ``history.json``, ``metrics.json`` = ``{"val": {...}, "test": {...}}`` and
``pred_test/*.png`` (P-mode, dataset palette, the masks' file names).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config
from ..data import PseudoMaskDataset, SegDataset, list_pairs, list_train, load_info, subset_indices
from ..data.check import preflight_dataset
from ..data.folder import prediction_name
from ..errors import DataError, PBIPError, TrainingError
from ..io import MASK_MODES, atomic_write_json, check_output_dir, image_header, save_png
from ..nets.deeplab import ASPP_RATES, DeepLabV2
from .checkpoint import load_checkpoint, save_checkpoint
from .claims import claim_run, empty_run_folder, refuse_partial_run
from .metrics import SegMetrics
from .runtime import (amp_dtype_name, autocast, device_for, grad_scaler, init_distributed, lr_lambda, rng_state,
                      seed_everything, set_rng_state)

IGNORE_INDEX = 255                                # pseudo-mask pixels that carry no tissue label
MS_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25)  # multi-scale inference


# ---------------------------------------------------------------------------------------------------- loss
def ignore_background(target: torch.Tensor, n_classes: int, background_index: int) -> torch.Tensor:
    """(B, H, W) int pseudo labels -> same with background / out-of-range labels set to :data:`IGNORE_INDEX`."""
    target = target.long()
    bad = (target == background_index) | (target < 0) | (target >= n_classes)
    return target.masked_fill(bad, IGNORE_INDEX)


def stage2_loss(logits: torch.Tensor, target: torch.Tensor, background_index: int) -> torch.Tensor:
    """Cross-entropy over tissue pixels; logits (B, N, H, W), target (B, H, W) class indices.

    Pixels labelled ``background_index`` (or outside 0..N-1) are ignored. If every pixel of the batch is
    ignored the loss is 0 (not NaN), so an all-background batch does not stop training.
    """
    t = ignore_background(target, logits.shape[1], background_index)
    if not bool((t != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_probs(model: nn.Module, image: torch.Tensor, out_size: tuple[int, int], ms_flip: bool = False,
                  scales: Sequence[float] = MS_SCALES) -> torch.Tensor:
    """image (B, 3, h, w) in [0, 1] -> softmax (B, N, H, W) at ``out_size``, optionally averaged over
    ``scales`` x {identity, horizontal flip}."""
    scales = tuple(scales) if ms_flip else (1.0,)
    total = None
    n = 0
    for s in scales:
        x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        for flip in ((False, True) if ms_flip else (False,)):
            xi = x.flip(-1) if flip else x
            logits = model(xi)
            if flip:
                logits = logits.flip(-1)
            p = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)
            total = p if total is None else total + p
            n += 1
    return total / n


def evaluate_split(model: nn.Module, data_root: str | Path, split: str, cfg: Config, device: torch.device | str,
                   pred_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every image of ``split`` (argmax over N classes at the mask's size) and score it.

    Writes P-mode PNGs ``<mask stem>.png`` into ``pred_dir`` when given. Returns the metrics dict of
    :class:`pbip_core.engine.metrics.SegMetrics` (fractions in [0, 1]).
    """
    info = load_info(data_root)
    pairs = list_pairs(data_root, split)
    ds = SegDataset(data_root, split, image_size=cfg.stage2.image_size)
    metrics = SegMetrics(info.n_classes, info.background_index, list(info.classes))
    model.eval()
    for i in tqdm(range(len(ds)), desc=f"stage2 {split}", leave=False, disable=len(ds) < 20):
        item = ds[i]
        gt = item["mask"].numpy()
        probs = predict_probs(model, item["image"][None].to(device), tuple(gt.shape[-2:]), cfg.stage2.ms_flip)
        pred = probs[0].argmax(0).cpu().numpy().astype(np.uint8)
        metrics.update(pred, gt)
        if pred_dir is not None:
            save_png(pred, Path(pred_dir) / prediction_name(pairs[i][1]), palette=info.palette_list())
    return metrics.compute()


# ---------------------------------------------------------------------------------------------------- training
def announce_backbone(cfg: Config) -> str:
    """The loud one-paragraph statement of which stage-2 backbone is used."""
    s2 = cfg.stage2
    init = "ImageNet-PRETRAINED" if s2.pretrained else "RANDOM INITIALISATION (not pretrained)"
    paper = "" if (s2.backbone == "resnet101" and s2.pretrained) else \
        " -- the paper uses an ImageNet ResNet-101; numbers are not comparable to its Table 1"
    return (f"=== stage 2: DeepLab-v2 (ASPP rates {'/'.join(map(str, ASPP_RATES))}, summed) on backbone "
            f"{s2.backbone.upper()} with {init}{paper} ===")


def _loader(ds: PseudoMaskDataset, cfg: Config, epoch: int, sampler: Any) -> torch.utils.data.DataLoader:
    """Epoch ``epoch``'s batches: DDP's sampler, or a shuffle seeded by ``(stage2.seed, epoch)`` (same order on resume)."""
    s2 = cfg.stage2
    ds.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(ds, batch_size=s2.batch_size, sampler=sampler,
                                           num_workers=cfg.data.num_workers)
    g = torch.Generator().manual_seed(s2.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=s2.batch_size, shuffle=True, generator=g,
                                       num_workers=cfg.data.num_workers)


def _train_epoch(net: nn.Module, loader: Any, optimizer: Any, scheduler: Any, epoch: int, cfg: Config,
                 background_index: int, device: Any, masks_dir: Path, last: Path, show: bool,
                 scaler: Any = None) -> list[float]:
    """One epoch of SGD steps on the pseudo masks (under ``train.amp``'s autocast; ``scaler``: fp16's gradient
    scaler); returns the per-step losses."""
    scaler = scaler or grad_scaler("off", str(device))
    net.train()
    losses = []
    bar = tqdm(loader, desc=f"stage2 epoch {epoch + 1}/{cfg.stage2.epochs}", leave=False, disable=not show)
    for step, batch in enumerate(bar):
        x, y = batch["image"].to(device), batch["mask"].to(device)
        with autocast(cfg.train.amp, str(device)):
            logits = net(x)
        loss = stage2_loss(logits.float(), y, background_index)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"stage 2: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; try a lower learning "
                f"rate (now --set stage2.lr={cfg.stage2.lr}), check the pseudo masks in {masks_dir}, or resume from "
                f"{last} with --resume"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)                            # = optimizer.step() unless fp16
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")


def preflight(cfg: Config, data_root: str | Path, masks_dir: str | Path, out_dir: Path, resume: bool = False,
              overwrite: bool = False) -> None:
    """The cheap checks before anything is written: the flags, the output folder, the dataset (labels, image modes,
    every val/test mask, which are scored only after training) and a pseudo mask of the image's size for every
    training image (from the files' headers)."""
    if resume and overwrite:
        raise PBIPError("--resume continues a run and --overwrite deletes it: pass one of them")
    check_output_dir(out_dir)
    preflight_dataset(data_root, splits=("val", "test"), train=True)
    masks = Path(masks_dir)
    if not masks.is_dir():
        raise DataError(f"{masks}: pseudo-mask folder not found (write it with `pbip pseudo --split train`)")
    items = [p for p, _ in list_train(data_root)]
    for i in subset_indices(len(items), cfg.data.max_train):
        img, mask = items[i], masks / items[i].name
        if not mask.is_file():
            continue                              # PseudoMaskDataset reports every missing mask at once
        _, img_hw = image_header(img)
        mode, mask_hw = image_header(mask)
        if mode not in MASK_MODES:
            raise DataError(f"{mask}: pseudo mask must be a P or L mode PNG of class indices, found mode {mode}")
        if mask_hw != img_hw:
            raise DataError(f"{mask}: pseudo mask is {mask_hw[1]}x{mask_hw[0]} but training image {img} is "
                            f"{img_hw[1]}x{img_hw[0]}")


def train_stage2(cfg: Config, data_root: str | Path, masks_dir: str | Path, out_dir: str | Path,
                 resume: bool = False, device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train DeepLab-v2 on the pseudo masks in ``masks_dir`` and evaluate on val and test.

    Returns ``{"val": metrics, "test": metrics, "history": [...], "out_dir": str}``; writes the files listed in
    the module docstring. Under ``torchrun`` (``WORLD_SIZE > 1``) training uses DistributedDataParallel (gloo on
    CPU, nccl on GPU) and only rank 0 writes and evaluates. First :func:`preflight` (nothing is written when it
    fails); then ``out_dir`` is claimed for this process (a second one refuses); a folder that holds a run needs
    ``resume`` or ``overwrite`` (empty it first).
    """
    rank, world, device = init_distributed(device_for(cfg, device), cfg.train.dist_timeout_min)
    preflight(cfg, data_root, masks_dir, Path(out_dir), resume, overwrite)
    with claim_run(out_dir, "stage-2 run", enabled=rank == 0):
        if overwrite and rank == 0:
            empty_run_folder(Path(out_dir))
        if world > 1:
            dist.barrier()
        return _train_stage2(cfg, data_root, masks_dir, out_dir, resume, device)


def _train_stage2(cfg: Config, data_root: str | Path, masks_dir: str | Path, out_dir: str | Path,
                  resume: bool, device: str | None) -> dict[str, Any]:
    """The stage-2 loop of :func:`train_stage2`, in a claimed and checked run folder."""
    out_dir = Path(out_dir)
    rank, world, device = init_distributed(device_for(cfg, device), cfg.train.dist_timeout_min)
    is_main = rank == 0
    s2 = cfg.stage2
    info = load_info(data_root)
    last = out_dir / "last.pt"
    refuse_partial_run(out_dir, resume)
    ckpt = (load_checkpoint(last, "stage-2 checkpoint", keys=CHECKPOINT_KEYS,
                            hint="start over with --overwrite (this deletes the run)")
            if resume and last.is_file() else None)
    seed_everything(s2.seed)

    train_ds = PseudoMaskDataset(data_root, masks_dir, image_size=s2.image_size, augment=cfg.data.augment,
                                 seed=s2.seed, max_items=cfg.data.max_train)
    if is_main:
        print(announce_backbone(cfg), flush=True)
        print(f"stage 2: {len(train_ds)} training images with pseudo masks from {masks_dir}; "
              f"background_index={info.background_index} is ignored in the loss; device={device} ({world} "
              f"process{'es' if world > 1 else ''}), {amp_dtype_name(cfg.train.amp)}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")

    model = DeepLabV2(info.n_classes, s2.backbone, pretrained=s2.pretrained, output_stride=s2.output_stride).to(device)
    source = getattr(model.backbone, "pretrained_source", "unknown")
    run_info = {"device": str(device), "world_size": world, "dtype": amp_dtype_name(cfg.train.amp),
                "amp": cfg.train.amp, "weights": {"backbone": f"{s2.backbone}: {source}"},
                "random_weights": [] if s2.pretrained else ["backbone"]}
    if is_main:
        print(f"stage 2: backbone weights: {source}", flush=True)
    optimizer = torch.optim.SGD(model.param_groups(s2.lr, s2.weight_decay), lr=s2.lr, momentum=s2.momentum)
    sampler = (torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                               seed=s2.seed, drop_last=False) if world > 1 else None)
    steps_per_epoch = math.ceil((len(sampler) if sampler is not None else len(train_ds)) / s2.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("poly", steps_per_epoch * s2.epochs,
                                                                       power=s2.power))
    scaler = grad_scaler(cfg.train.amp, device)

    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        if is_main:
            print(f"stage 2: resuming from {last} after epoch {start_epoch}/{s2.epochs}", flush=True)
    elif resume and is_main:
        print(f"stage 2: --resume given but {last} does not exist; starting from scratch", flush=True)

    net: nn.Module = model
    if world > 1:
        dev = torch.device(device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    for epoch in range(start_epoch, s2.epochs):
        t0 = time.time()
        losses = _train_epoch(net, _loader(train_ds, cfg, epoch, sampler), optimizer, scheduler, epoch, cfg,
                              info.background_index, device, Path(masks_dir), last, is_main, scaler)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
        if is_main:
            print(f"stage 2: epoch {epoch + 1}/{s2.epochs} loss {history[-1]['loss']:.4f}", flush=True)
            save_checkpoint({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history,
                             "scaler": scaler.state_dict(),
                             "config": cfg.flat(), "backbone": s2.backbone, "pretrained": s2.pretrained}, last)
            atomic_write_json(out_dir / "history.json", history)

    result: dict[str, Any] = {"history": history, "out_dir": str(out_dir), "run": run_info}
    if is_main:
        res_val = evaluate_split(model, data_root, "val", cfg, device)
        res_test = evaluate_split(model, data_root, "test", cfg, device, pred_dir=out_dir / "pred_test")
        atomic_write_json(out_dir / "metrics.json", {"val": res_val, "test": res_test, "run": run_info})
        result.update(val=res_val, test=res_test)
    if world > 1:
        dist.barrier()
    return result
