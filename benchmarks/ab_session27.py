"""Session 27's changes to the AMX weight-gradient kernel, each against the step before it.

  session 26: the kernel without the next image's requests (built with RESLAB_WGRAD_PREFETCH=0),
              its fp32 result converted to bf16 and copied to channels_last after the call.
  +prefetch:  the kernel asks for the next image's x and dy (into L2) while it lays out this
              one's: in a step x was written long before and comes from far away (alone, the
              kernel ran ~1.4x slower with its operands evicted from L2 than in cache).
  +bf16 out:  the kernel writes the bf16 channels_last gradient itself (three ops fewer a conv).
Both builds add the blocks' sums on all threads (session 26 added them on one: the same bits).

Medians of per-round ratios over alternating rounds of the default step (real CIFAR-10 batches
through the TensorLoader, as `reslab train` runs it); the weight gradients alone first (cold
operands: a 48 MB sweep before each call, as a step's are).

    python benchmarks/ab_session27.py --data ../shared/data [--model resnet56] [--rounds 10]
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

from common import (
    ab_arguments,
    alternating_rounds,
    amx_kernel,
    cifar_default_step,
    hardware,
    kernel_variant,
    print_ratios,
)
from reslab.models import bn_act, conv_wgrad
from reslab.models.bn_act import kernel_status


def cold_seconds(f: Callable[[], object], reps: int = 25) -> float:
    """Median seconds of f() right after 48 MB of other tensors were written (L2 evicted)."""
    cl = torch.channels_last
    sweep = [torch.zeros(128, 16, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=cl)
             for _ in range(12)]  # fmt: skip
    times = []
    for _ in range(reps + 3):
        for t in sweep:
            t.add_(1)
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def main() -> None:
    args = ab_arguments().parse_args()
    print(hardware())
    new = amx_kernel()
    print(f"kernel: {kernel_status()}")
    old = kernel_variant("_nowgradprefetch", "RESLAB_WGRAD_PREFETCH=0")
    print("weight gradients alone, operands evicted from L2 before each call:")
    cl = torch.channels_last
    for c, side, stride in ((16, 32, 1), (32, 16, 1), (64, 8, 1), (16, 32, 2), (32, 16, 2)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, c, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
        co = c * stride
        dy = torch.randn(128, co, side // stride, side // stride, generator=g)
        dy = dy.bfloat16().contiguous(memory_format=cl)
        t = {k: cold_seconds(lambda e=e, x=x, dy=dy, s=stride: e.conv3x3_wgrad(x, dy, s))
             for k, e in (("session 26", old), ("+prefetch", new))}  # fmt: skip
        print(f"  128x{c}->{co} on {side}x{side} stride {stride}: "
              + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items())
              + f"; x{t['session 26'] / t['+prefetch']:.2f}")  # fmt: skip

    weight_grad = conv_wgrad.weight_grad

    def fp32_out(x, dy, weight, stride):  # session 26's: convert and copy after the kernel
        if torch.is_grad_enabled():
            return weight_grad(x, dy, weight, stride)
        dw = conv_wgrad.load_kernel().conv3x3_wgrad(x, dy, stride).to(weight.dtype)
        return dw.contiguous(memory_format=cl) if conv_wgrad._cl(weight) else dw

    paths = {"session 26": (old, fp32_out), "+prefetch": (new, fp32_out),
             "+bf16 out": (new, weight_grad)}  # fmt: skip

    def switch(k: str) -> Callable[[], None]:
        def to_k() -> None:
            bn_act._EXT, conv_wgrad.weight_grad = paths[k]

        return to_k

    precision, _, step = cifar_default_step(args.data, args.model)
    try:
        rates = alternating_rounds({k: switch(k) for k in paths}, step, rounds=args.rounds,
                                   steps=args.steps)  # fmt: skip
    finally:
        bn_act._EXT, conv_wgrad.weight_grad = new, weight_grad
    print_ratios(
        args.model,
        precision,
        args.rounds,
        args.steps,
        rates,
        [*itertools.pairwise(paths), ("session 26", "+bf16 out")],
    )


if __name__ == "__main__":
    main()
