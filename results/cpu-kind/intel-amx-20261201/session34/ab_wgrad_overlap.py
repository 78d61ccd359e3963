"""Session 34: the AMX weight-gradient kernel (kernels/conv_wgrad.cpp) laying out the next chunk of
images between the current chunk's tile products (the tiles compute apart from the core's loads
and stores), against laying out each chunk before its products (sessions 26-33; the kernel
built with RESLAB_WGRAD_OVERLAP=0). The same sums in the same order: the same bits.

1. Alone at a CIFAR ResNet's shapes (batch 128, stride 1 and 2): medians of 30 calls in cache
   and of 25 with the operands evicted from L2 (as in a step), both builds alternating.
2. In the default training step (real CIFAR-10 batches through the TensorLoader, as `reslab
   train` runs it), alternating rounds switching which build the step's weight gradients call.

    python benchmarks/ab_wgrad_overlap.py --data ../shared/data [--model resnet56] [--no-step]
"""

from __future__ import annotations

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
from reslab.models import block_op, conv_wgrad
from reslab.models.bn_act import kernel_status

_SHAPES = [(16, 16, 32, 1), (32, 32, 16, 1), (64, 64, 8, 1), (16, 32, 32, 2), (32, 64, 16, 2),
           (16, 16, 24, 1), (32, 32, 12, 1), (64, 64, 6, 1)]  # fmt: skip


def shapes(kernels: dict) -> None:
    print("one weight gradient, batch 128 (ms: in cache / operands evicted from L2):")
    cl = torch.channels_last
    for ci, co, side, stride in _SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, ci, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
        out = side // stride
        dy = torch.randn(128, co, out, out, generator=g).bfloat16().contiguous(memory_format=cl)
        hot: dict[str, float] = {}
        cold: dict[str, float] = {}
        for _ in range(2):
            for name, ext in kernels.items():

                def call(ext=ext, x=x, dy=dy, stride=stride) -> None:
                    ext.conv3x3_wgrad(x, dy, stride, True)

                hot[name] = min(hot.get(name, 1e9), median_seconds(call, reps=30))
                cold[name] = min(cold.get(name, 1e9), cold_seconds(call))
        a, b = "laid out before", "overlapped"
        print(f"  {ci}->{co} on {side}x{side} stride {stride}: {a} {hot[a] * 1e3:.3f} / "
              f"{cold[a] * 1e3:.3f}, {b} {hot[b] * 1e3:.3f} / {cold[b] * 1e3:.3f}: "
              f"x{hot[a] / hot[b]:.3f} / x{cold[a] / cold[b]:.3f}")  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=20)
    p.add_argument("--no-step", action="store_true", help="only the shapes")
    p.add_argument("--skip-shapes", action="store_true", help="only the training step")
    args = p.parse_args()
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}")
    kernels = {"laid out before": kernel_variant("_wgradnooverlap", "RESLAB_WGRAD_OVERLAP=0"),
               "overlapped": ext}  # fmt: skip
    if not args.skip_shapes:
        shapes(kernels)
    if args.no_step:
        return

    def switch(name: str):
        def to() -> None:
            block_op.load_kernel = conv_wgrad.load_kernel = lambda: kernels[name]

        return to

    precision, _, step = cifar_default_step(args.data, args.model)
    originals = block_op.load_kernel, conv_wgrad.load_kernel
    try:
        rates = alternating_rounds({k: switch(k) for k in kernels}, step, rounds=args.rounds,
                                   steps=args.steps)  # fmt: skip
    finally:
        block_op.load_kernel, conv_wgrad.load_kernel = originals
    print_rounds(args.model, precision, args.rounds, args.steps, rates, "laid out before",
                 "overlapped")  # fmt: skip


if __name__ == "__main__":
    main()
