"""The one precision policy of training, evaluation and inference. `auto`: bf16 autocast where
the device has native bf16, fp16 on a GPU without it (training adds a GradScaler), else fp32.
A precision is checked once per run (resolve_precision / check_precision)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


PRECISIONS = ("fp32", "bf16", "fp16")  # what autocast() takes; "auto" resolves to one of them


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {('auto', *PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return check_precision(spec)
    if device.type == "cuda" and not cuda_bf16_native(device):
        return "fp16"  # trained with a GradScaler (engine/trainer.py)
    return "bf16" if bf16_is_fast(device) else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 (weights and BN statistics stay fp32); nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def tune_cuda(device: torch.device) -> None:
    """cuDNN autotuning for a CUDA training run: every step has the same shapes, so timing the
    candidate kernels once per shape pays for itself within the first steps. Left off where
    deterministic algorithms were asked for (torch.use_deterministic_algorithms): autotuning
    may pick other kernels in another run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matrix products in true fp32 inside the block. On Ampere and later
    GPUs cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) unless told otherwise."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = old
