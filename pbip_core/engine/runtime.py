"""What both training stages share: seeding and RNG state, the device, torchrun/DDP set-up and equal shards,
mixed precision, the LR schedule."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..config import DEVICE_CHOICES, DEVICE_PATTERN
from ..errors import PBIPError

SCHEDULES = ("constant", "linear", "poly")


# ---------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a resumed run needs to continue bit-identically."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- devices and processes
def resolve_device(device: str | None) -> str:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``. An explicit device must be one of
    ``cpu | cuda | cuda:N | mps`` and available here; otherwise a one-line PBIPError."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_PATTERN.fullmatch(device):
        raise PBIPError(f"device {device!r}: not one of {DEVICE_CHOICES}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PBIPError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise PBIPError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PBIPError("device 'mps' requested but Apple MPS is not available (use --device cpu or auto)")
    return device


def device_for(cfg: Any, device: str | None = None) -> str:
    """The device a computation of ``cfg`` runs on: ``device`` (or ``train.device``) resolved by
    :func:`resolve_device`. The paper profile refuses a CPU unless ``train.allow_cpu`` is true: its runs take
    GPU-days, and a missing CUDA would otherwise silently make them CPU runs."""
    dev = resolve_device(device or cfg.train.device)
    if cfg.profile == "paper" and dev == "cpu" and not cfg.train.allow_cpu:
        why = "CUDA is not available here" if not torch.cuda.is_available() else "device cpu was asked for"
        raise PBIPError(f"profile paper: {why}; the paper's runs are meant for a GPU. Run on a GPU, or pass "
                        "--set train.allow_cpu=true to run the paper profile on the CPU anyway (tests, tiny data)")
    return dev


def init_distributed(device: str, timeout_minutes: float = 60.0) -> tuple[int, int, str]:
    """Under torchrun (``WORLD_SIZE > 1``): join the process group (nccl on GPU, gloo on CPU, with a timeout) and pin
    this rank's GPU. Returns ``(rank, world size, device)``; ``(0, 1, device)`` in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if not dist.is_initialized():
        return 0, 1, device
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return rank, world, device


def equal_shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's sample ``order`` (M,), the same length on every rank: the order is padded by
    repeating its start to a multiple of ``world`` (as ``DistributedSampler(drop_last=False)`` does), then dealt out
    round-robin. Equal lengths give every rank the same number of batches, so no rank waits for a collective the
    others never call. ``world == 1`` returns ``order`` unchanged."""
    if world <= 1:
        return order
    pad = (-len(order)) % world
    if pad:
        order = torch.cat([order, order.repeat(pad // max(1, len(order)) + 1)[:pad]])
    return order[rank::world]


# ---------------------------------------------------------------------- mixed precision
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device: str) -> Any:
    """The autocast region of ``train.amp`` (``bf16`` | ``fp16`` | ``off``) on ``device``'s type."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise PBIPError(f"train.amp={amp!r}: choose bf16, fp16 or off")
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def grad_scaler(amp: str, device: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for ``fp16`` only (bf16 has fp32's range; off needs none). Disabled, its
    ``scale(loss)`` is the loss, ``step(opt)`` is ``opt.step()`` and ``update()`` does nothing."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def amp_dtype_name(amp: str) -> str:
    """What a run computes in, for logs: ``float32`` or ``bfloat16 autocast (float32 weights)``."""
    return "float32" if amp == "off" else f"{str(AMP_DTYPES[amp]).removeprefix('torch.')} autocast (float32 weights)"


# ---------------------------------------------------------------------- learning rate
def lr_lambda(schedule: str, total_steps: int, warmup: int = 0, power: float = 0.9) -> Callable[[int], float]:
    """LambdaLR factor: optional linear warm-up, then ``constant``, ``linear`` decay to 0, or ``poly``
    ``(1 - step / total) ** power`` (DeepLab-v2's schedule)."""
    if schedule not in SCHEDULES:
        raise PBIPError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, step / max(1, total_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "poly":
            return max(0.0, 1.0 - frac) ** power
        return 1.0
    return f
