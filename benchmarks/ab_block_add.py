"""Session 34: an identity block's input gradient with the shortcut's term added as conv1's input
gradient is written (kernels/conv_fwd.cpp's `add`), against a pass of its own after it (the
extension's add, as sessions 30-33 ran it). Same bits (tests/models/test_block_op.py); one pass
over x-sized memory (two reads, one write) less a block. `--change`:

  add:  both steps below against sessions 30-33's block op;
  mask: only the second step: the shortcut's term (dout where bn2's ReLU passed it) read from
        dout and the ReLU's bit mask as the sum is written, instead of stored by bn2's backward
        and read back (one x-sized write less).

One block op's forward + backward at each CIFAR stage's shape (batch 128), then medians of
per-round ratios over alternating rounds of the default training step (real CIFAR-10 batches
through the TensorLoader, as `reslab train` runs it), switching the kernels the block op calls
between this build and one built without the change.

    python benchmarks/ab_block_add.py --data ../shared/data [--change mask] [--model resnet56]
"""

from __future__ import annotations

import torch

from common import (
    ab_arguments,
    amx_kernel,
    cifar_default_step,
    hardware,
    kernel_rounds,
    kernel_variant,
    median_seconds,
    print_rounds,
)
from reslab.models.bn_act import kernel_status

# --change -> the defines of the build without it
_CHANGES = {
    "add": ("RESLAB_BLOCK_FUSED_ADD=0", "RESLAB_BLOCK_MASKED_ADD=0"),
    "mask": ("RESLAB_BLOCK_MASKED_ADD=0",),
}


def _block_call(ext, c: int, side: int):
    """One residual block op's forward + backward on random data: a function of no arguments."""
    cl = torch.channels_last
    g = torch.Generator().manual_seed(c)
    x = torch.randn(128, c, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
    x.requires_grad_()
    dy = torch.randn(128, c, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
    w1, w2 = (torch.randn(c, c, 3, 3, generator=g).mul(0.1).requires_grad_() for _ in "12")
    g1, b1, g2, b2 = (torch.ones(c, requires_grad=True) for _ in range(4))
    rm, rv, nb = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)

    def run() -> None:
        out = ext.basic_block_train(x, w1, g1, b1, rm, rv, nb, 0.1, 1e-5,
                                    w2, g2, b2, rm, rv, nb, 0.1, 1e-5, True)  # fmt: skip
        torch.autograd.grad(out, [x, w1, w2], dy)

    return run


def one_block(kernels: dict) -> None:
    """ms per forward + backward of one residual block op, batch 128, per stage's shape."""
    print("one block op (batch 128), forward + backward, best of 3 medians of 20:")
    for c, side in ((16, 32), (32, 16), (64, 8)):
        calls = {name: _block_call(ext, c, side) for name, ext in kernels.items()}
        times: dict[str, float] = {}
        for _ in range(3):
            for name, run in calls.items():
                t = median_seconds(run, reps=20)
                times[name] = min(times.get(name, t), t)
        a, b = times["before"], times["after"]
        print(f"  {c} channels on {side}x{side}: before {a * 1e3:.3f} ms, after "
              f"{b * 1e3:.3f} ms: x{a / b:.3f}")  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=10)
    p.add_argument("--size", type=int, default=32, help="image side (24: progressive resizing)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip-block", action="store_true", help="only the training step")
    p.add_argument("--change", choices=sorted(_CHANGES), default="add")
    args = p.parse_args()
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}")
    print(f"change: {args.change}")
    before = kernel_variant("_s34" + args.change, *_CHANGES[args.change])
    kernels = {"before": before, "after": ext}
    if not args.skip_block:
        one_block(kernels)

    precision, _, step = cifar_default_step(args.data, args.model, batch=args.batch,
                                            size=args.size)  # fmt: skip
    rates = kernel_rounds(kernels, step, rounds=args.rounds, steps=args.steps, batch=args.batch)
    print(f"\nimages {args.size}x{args.size}")
    print_rounds(args.model, precision, args.rounds, args.steps, rates, "before", "after",
                 batch=args.batch)  # fmt: skip


if __name__ == "__main__":
    main()
