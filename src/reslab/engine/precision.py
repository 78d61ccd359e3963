"""Choosing and applying the numeric precision of the forward pass."""

from __future__ import annotations

import contextlib

import torch


def cuda_bf16_native(device: torch.device | None = None) -> bool:
    """bf16 in the GPU's own arithmetic (compute capability 8.0+). torch's plain
    is_bf16_supported() also says yes where bf16 is only emulated through fp32 (slower than fp32
    itself), so the emulated case is excluded where the installed torch can tell them apart."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no such argument and reports native only
            return torch.cuda.is_bf16_supported()


def bf16_is_fast(device: torch.device) -> bool:
    """Native bf16 math: CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX, where oneDNN
    runs bf16 convolutions faster than fp32 (measured: benchmarks/bench_train.py)."""
    if device.type == "cuda":
        return cuda_bf16_native(device)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        if spec not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {spec!r}")
        return spec
    if device.type == "cuda" and not cuda_bf16_native(device):
        return "fp16"  # trained with a GradScaler (engine/trainer.py)
    return "bf16" if bf16_is_fast(device) else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 (weights and BN statistics stay fp32); nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
