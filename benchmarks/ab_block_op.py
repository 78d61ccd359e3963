"""Session 30: a BasicBlock of stride 1 and equal widths as one autograd op (models/block_op.py,
kernels/block.cpp) against the same block's per-op path with the same kernels (the fork, two
AMX convolutions and two fused BN+ReLU ops as five Python autograd Functions, the weights' casts).
Both compute the same bits; the op takes the per-block Python out of the step.

First one block's forward + backward on a small batch (the per-block cost that does not grow
with the batch), then medians of per-round ratios over alternating rounds of the default
training step (real CIFAR-10 batches through the TensorLoader, as `reslab train` runs it),
switching `block_op.ENABLED` (`--transitions`, session 35: `block_op.TRANSITIONS`, the stride-2
blocks with option A's shortcut or none as one op too).

    python benchmarks/ab_block_op.py --data ../shared/data [--model resnet56] [--size 24]
        [--transitions]
"""

from __future__ import annotations

import torch

from common import (
    ab_arguments,
    alternating_rounds,
    amx_kernel,
    cifar_default_step,
    hardware,
    median_seconds,
    print_rounds,
)
from reslab.models import block_op, create_model
from reslab.models.bn_act import kernel_status
from reslab.models.cpu_paths import use_cpu_training_paths


def one_block(transition: bool = False) -> None:
    """A ResNet-56 first-stage block (16 channels) on 32 images of 8x8, or with `transition` its
    layer2[0] (16 -> 32 channels, stride 2, option A) on 32 images of 16x16: ms per forward +
    backward."""
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10).to(memory_format=torch.channels_last)
    block = model.layer2[0] if transition else model.layer1[1]
    use_cpu_training_paths(block, precision="bf16")
    side = 16 if transition else 8
    x = torch.randn(32, 16, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    flag = "TRANSITIONS" if transition else "ENABLED"

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            out = block(x)
        out.backward(torch.ones_like(out))

    what = "layer2[0] (16 -> 32 channels, stride 2), 32 images of 16x16" if transition else (
        "one block (16 channels, 32 images of 8x8)")  # fmt: skip
    print(f"{what}, forward + backward, median of 200:")
    times = {}
    for on in (False, True, False, True):
        setattr(block_op, flag, on)
        times.setdefault(on, []).append(median_seconds(step, reps=200, warmup=20))
    setattr(block_op, flag, True)
    per_op, op = min(times[False]), min(times[True])
    print(f"  per op {per_op * 1e3:.3f} ms, one op {op * 1e3:.3f} ms: "
          f"{(per_op - op) * 1e3:.3f} ms less a block")  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=10)
    p.add_argument("--size", type=int, default=32, help="image side (24: progressive resizing)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip-block", action="store_true", help="only the training step")
    p.add_argument("--transitions", action="store_true",
                   help="switch only the stride-2 blocks (session 35): per op vs one op")  # fmt: skip
    args = p.parse_args()
    print(hardware())
    amx_kernel()
    print(f"kernel: {kernel_status()}")
    if not args.skip_block:
        one_block(args.transitions)

    flag = "TRANSITIONS" if args.transitions else "ENABLED"

    def switch(on: bool):
        def to() -> None:
            setattr(block_op, flag, on)

        return to

    precision, _, step = cifar_default_step(args.data, args.model, batch=args.batch,
                                            size=args.size)  # fmt: skip
    try:
        rates = alternating_rounds({"per op": switch(False), "one op": switch(True)}, step,
                                   rounds=args.rounds, steps=args.steps, batch=args.batch)  # fmt: skip
    finally:
        block_op.ENABLED = block_op.TRANSITIONS = True
    print(f"\nimages {args.size}x{args.size}")
    print_rounds(args.model, precision, args.rounds, args.steps, rates, "per op", "one op",
                 batch=args.batch)  # fmt: skip


if __name__ == "__main__":
    main()
