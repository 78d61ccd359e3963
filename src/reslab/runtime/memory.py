"""glibc's malloc set for tensors: large activations reused from the heap, not the kernel.

A forward pass allocates and frees activation maps of megabytes on every call. glibc serves a
block over its mmap threshold (128 KiB at the start, raised only as such blocks are freed) with a
fresh mmap and gives freed memory at the heap's top back to the kernel beyond its trim threshold,
so each call page-faults its activations in again. Measured (session 41, 2 Intel Xeon cores with
AMX, benchmarks/ab_malloc.py, each case in a fresh process, results/benchmarks/ab_malloc_*.txt):
InferenceModel in bf16, ResNet-20 at 64 / 256 images x1.44 / x1.59, ResNet-50 at 8 / 32 224px
images x1.22 / x1.50 (peak RSS +0-20%), `reslab predict` of 96 JPEGs with ResNet-50 x1.30. So
InferenceModel (and through it `reslab predict`) and `reslab eval` set them, and so does training
on the CPU (session 43, benchmarks/ab_malloc_train.py): glibc's own threshold rises to 32 MiB at
most, under a 224px step's larger activations (the stem's output at 32 images: 51 MB in bf16),
so a ResNet-18 / ResNet-50 step at 32 images ran x1.12 / x1.19 faster with them set, ResNet-18
at 128 x1.28 (peak RSS +5-27%), an image-folder run x1.04-1.08; CIFAR runs, whose activations
stay under glibc's threshold, x0.99 (session 41: within the machine's drift, +-3%).

Only the thresholds change (what the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
environment variables set); nothing where the user set those (or GLIBC_TUNABLES' malloc
entries), with RESLAB_MALLOC=0, or off glibc.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap (ResNet-50 maps at 32 images)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it is given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")  # fmt: skip
_done: bool | None = None


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for tensor workloads, once per process; whether they
    are set. InferenceModel and `reslab eval` call it; harmless to call again."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _apply() -> bool:
    if os.environ.get("RESLAB_MALLOC", "1") == "0":
        return False
    if any(k in os.environ for k in _USER_SETTINGS):
        return False  # the user's own choice stands
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:  # (platform.libc_ver() would scan the interpreter's binary)
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a platform that names it
        libc = ""
    if not libc.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: setting either turns glibc's own adjustment off, and the trim
    # threshold alone would leave every block over 128 KiB to mmap (measured 2x slower).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]
