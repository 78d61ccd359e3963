"""Session 29: the AMX convolution kernel (kernels/conv_fwd.cpp) for the blocks' stride-1 3x3
convolutions' outputs and input gradients, against oneDNN's.

  oneDNN:    torch's convolution and convolution_backward (the input gradient), as before.
  kernel:    conv3x3_forward(x, w) and conv3x3_forward(dy, w, transposed=True).
  no overlap (shapes only): the kernel built with RESLAB_FWD_OVERLAP=0, copying each image
             into its buffer before its tile products instead of during the previous image's.

The shapes of a CIFAR ResNet's three stages at batch 128, alone, in cache and with the operands
evicted from L2 first (as in a step); then medians of per-round ratios over alternating rounds
of the default training step (real CIFAR-10 batches through the TensorLoader, as `reslab train`
runs it), switching `conv_wgrad.FORWARD_KERNEL`.

    python benchmarks/ab_conv_fwd.py --data ../shared/data [--model resnet56] [--rounds 10]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ab_session27 import cold_seconds
from common import (
    ab_arguments,
    alternating_rounds,
    amx_kernel,
    cifar_default_step,
    hardware,
    kernel_variant,
    median_seconds,
    print_rounds,
)
from reslab.models import conv_wgrad
from reslab.models.bn_act import kernel_status

_ARGS = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
_BACK = torch.ops.aten.convolution_backward


def shapes(ext, seq) -> None:
    cl = torch.channels_last
    print("one call, batch 128 (ms: in cache / operands evicted from L2; TFLOP/s in cache):")
    for c, side in ((16, 32), (32, 16), (64, 8)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, c, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
        w = torch.randn(c, c, 3, 3, generator=g).bfloat16().contiguous(memory_format=cl)
        flop = 2 * 128 * side * side * c * c * 9
        calls: dict[str, Callable[[], object]] = {
            "oneDNN fwd": lambda x=x, w=w: torch.ops.aten.convolution(x, w, None, *_ARGS),
            "kernel fwd": lambda x=x, w=w: ext.conv3x3_forward(x, w),
            "no overlap fwd": lambda x=x, w=w: seq.conv3x3_forward(x, w),
            "oneDNN dgrad": lambda x=x, w=w: _BACK(x, x, w, None, *_ARGS, [True, False, False]),
            "kernel dgrad": lambda x=x, w=w: ext.conv3x3_forward(x, w, transposed=True),
        }
        hot = {k: median_seconds(f, reps=30) for k, f in calls.items()}
        cold = {k: cold_seconds(f) for k, f in calls.items()}
        print(f"  {c}->{c} channels on {side}x{side}:")
        for k in calls:
            print(f"    {k:>15}: {hot[k] * 1e3:.3f} / {cold[k] * 1e3:.3f} ms, "
                  f"{flop / hot[k] / 1e12:.2f} TFLOP/s")  # fmt: skip
        for op in ("fwd", "dgrad"):
            a, b = f"oneDNN {op}", f"kernel {op}"
            print(f"    kernel / oneDNN {op}: x{hot[a] / hot[b]:.2f} in cache, "
                  f"x{cold[a] / cold[b]:.2f} evicted")  # fmt: skip


def main() -> None:
    args = ab_arguments().parse_args()
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}")
    seq = kernel_variant("_fwdnooverlap", "RESLAB_FWD_OVERLAP=0")
    shapes(ext, seq)

    def switch(on: bool) -> Callable[[], None]:
        def to() -> None:
            conv_wgrad.FORWARD_KERNEL = on

        return to

    precision, _, step = cifar_default_step(args.data, args.model)
    try:
        rates = alternating_rounds({"oneDNN": switch(False), "kernel": switch(True)}, step,
                                   rounds=args.rounds, steps=args.steps)  # fmt: skip
    finally:
        conv_wgrad.FORWARD_KERNEL = True
    print_rounds(args.model, precision, args.rounds, args.steps, rates, "oneDNN", "kernel")


if __name__ == "__main__":
    main()
