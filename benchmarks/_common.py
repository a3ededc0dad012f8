"""Small helpers shared by the benchmarks: machine matmul rate, load, memory, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so wall-clock times cover the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_gflops(n: int = 2048, reps: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul rate in GFLOP/s: the median of ``reps`` (n x n) @ (n x n) products (2 n^3 FLOP each)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    c = a @ b                                       # warm-up (threads, kernels)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        c = a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    del c
    return 2 * n ** 3 / statistics.median(times) / 1e9


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other processes on a shared machine slow every figure down)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 2 ** 10


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed calls: ``wall`` clock and this process's ``cpu``
    time (user + system, all threads). With one thread on a shared machine, cpu time is the work done by this process
    whatever the other processes take; wall time also counts the waits for a core."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def machine_info(device: str) -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write (via pbip_core.io when importable)."""
    try:
        from pbip_core.io import atomic_write_json

        atomic_write_json(path, obj)
    except ImportError:                             # pragma: no cover - the benchmarks live in the repository
        Path(path).write_text(json.dumps(obj, indent=2))
