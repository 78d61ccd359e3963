"""reslab.runtime.memory: glibc's thresholds set so that activations come from the heap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A child process: tune (or not), hold a 64 MiB tensor, free it; print where glibc put it
# (mallinfo2: hblkhd = bytes in mmapped blocks, arena = the heap) and the heap after the free.
CHILD = r"""
import ctypes, sys, torch
from reslab.runtime.memory import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = tune_malloc()
t = torch.ones(64 << 20, dtype=torch.uint8)
held = libc.mallinfo2()
del t
freed = libc.mallinfo2()
print(int(tuned), held.hblkhd >> 20, held.arena >> 20, freed.arena >> 20)
"""


def _child(**env: str) -> list[int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RESLAB_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**base, **env}, text=True,
                         capture_output=True, check=True).stdout  # fmt: skip
    return [int(v) for v in out.split()]


@pytest.mark.skipif(
    not (hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")),
    reason="glibc only",
)
def test_large_tensors_come_from_the_heap_and_stay_there_once_freed() -> None:
    """Untuned, glibc maps a 64 MiB tensor afresh (page faults on every call that makes one)
    and unmaps it when freed; tuned, the heap serves it and keeps it for the next call."""
    tuned, mapped, _, _ = _child(RESLAB_MALLOC="0")
    assert tuned == 0 and mapped >= 64
    tuned, mapped, heap_held, heap_freed = _child()
    assert tuned == 1 and mapped < 64 <= heap_held and heap_freed >= 64
    # The user's own settings stand.
    assert _child(MALLOC_TRIM_THRESHOLD_="1000000")[0] == 0
    assert _child(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] == 0
