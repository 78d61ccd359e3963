"""Shared helpers for the benchmarks: hardware description and the machine's measured peak."""

from __future__ import annotations

import os
import time

import torch


def hardware() -> str:
    from reslab.engine.trainer import run_info

    i = run_info()
    gpu = f", GPU {i['gpu']}" if "gpu" in i else ""
    return (
        f"CPU {i['cpu']} ({i['cpu_count']} cores, torch threads {i['threads']}){gpu}; "
        f"torch {i['torch']}, torchvision {i.get('torchvision', '?')}, python {i['python']}"
    )


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def matmul_peak(
    dtype: torch.dtype, *, n: int = 2048, seconds: float = 2.0, device: torch.device | None = None
) -> float:
    """Measured FLOP/s of a large square matmul in `dtype` on `device` (default the CPU): the
    machine's practical peak for that dtype, as the benchmarks' denominator."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if device.type == "cuda" else 1):  # keep the GPU's queue full
            a @ b
            reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)
