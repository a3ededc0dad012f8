"""What both training stages share: seeding and RNG state, the device, torchrun/DDP set-up, the LR schedule."""

from __future__ import annotations

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


def init_distributed(device: str, timeout_minutes: float = 180.0) -> tuple[int, int, str]:
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
