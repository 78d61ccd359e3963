"""Session 36's changes to the blocks' convolution kernels, each against the build before it:

  session 35: kernels/conv_fwd.cpp packing the weights for the tiles a value at a time on all
              threads (RESLAB_FWD_PACK_VECTOR=0) and writing a 16-channel output a position at
              a time (RESLAB_FWD_PAIRS=0); kernels/conv_wgrad.cpp transposing the output
              gradient with four rounds of vpermt2w (RESLAB_WGRAD_UNPACK=0) and making stride
              1's two odd pair copies of x in two passes (RESLAB_WGRAD_TWIN=0);
  +pack:      the weights packed on the calling thread, one gather or interleave per tile row
              (the threads had written single values into the same cache lines);
  +pairs:     a 16-channel output written two positions (64 bytes) at a time;
  +unpack:    the output gradient transposed by lane loads and three rounds of unpacks;
  +twin:      both odd pair copies written from one pass (they differ only at row starts).
All five compute the same bits. First each kernel alone: a convolution on a batch of 2 (8x8,
where packing the weights is most of it) and at batch 128 on each CIFAR stage's shape, and the
weight gradient at batch 128; then
medians of per-round ratios over alternating rounds of the default training step (real
CIFAR-10 batches through the TensorLoader, as `reslab train` runs it), switching the kernels
the block ops call.

    python benchmarks/ab_session36.py --data ../shared/data [--model resnet56] [--skip-alone]
"""

from __future__ import annotations

import itertools

import torch

from common import (
    ab_arguments,
    amx_kernel,
    cifar_default_step,
    hardware,
    kernel_rounds,
    kernel_variant,
    median_seconds,
    print_ratios,
)
from reslab.models.bn_act import kernel_status

BUILDS = {
    "session 35": (
        "RESLAB_FWD_PACK_VECTOR=0",
        "RESLAB_FWD_PAIRS=0",
        "RESLAB_WGRAD_UNPACK=0",
        "RESLAB_WGRAD_TWIN=0",
    ),
    "+pack": ("RESLAB_FWD_PAIRS=0", "RESLAB_WGRAD_UNPACK=0", "RESLAB_WGRAD_TWIN=0"),
    "+pairs": ("RESLAB_WGRAD_UNPACK=0", "RESLAB_WGRAD_TWIN=0"),
    "+unpack": ("RESLAB_WGRAD_TWIN=0",),
    "+twin": (),
}


def alone(kernels: dict) -> None:
    """ms (us for the batch of 2) of one call, best of 3 medians, forward and input gradient."""
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    for n, side, unit, scale in ((2, 8, "us", 1e6), (128, None, "ms", 1e3)):
        print(f"one convolution, batch {n} ({unit}: forward / input gradient):")
        for c, s in ((16, 32), (32, 16), (64, 8)):
            x = (
                torch.randn(n, c, side or s, side or s, generator=g)
                .bfloat16()
                .contiguous(memory_format=cl)
            )
            w = (
                torch.randn(c, c, 3, 3, generator=g)
                .mul(0.1)
                .bfloat16()
                .contiguous(memory_format=cl)
            )
            best: dict[str, list[float]] = {}
            for _ in range(3):
                for name, ext in kernels.items():
                    t = [median_seconds(lambda ext=ext, tr=tr, x=x, w=w: ext.conv3x3_forward(x, w, tr),
                                        reps=200 if n == 2 else 30) for tr in (False, True)]  # fmt: skip
                    best[name] = [min(a, b) for a, b in zip(best.get(name, t), t)]
            print(f"  {c} channels on {side or s}x{side or s}: " + ", ".join(
                f"{k} {v[0] * scale:.3f} / {v[1] * scale:.3f}" for k, v in best.items()))  # fmt: skip
    print("weight gradient, batch 128 (ms):")
    for c, s, stride in ((16, 32, 1), (32, 16, 1), (64, 8, 1), (16, 32, 2), (32, 16, 2)):
        x = torch.randn(128, c, s, s, generator=g).bfloat16().contiguous(memory_format=cl)
        dy = torch.randn(128, c * stride, s // stride, s // stride, generator=g).bfloat16()
        dy = dy.contiguous(memory_format=cl)
        times: dict[str, float] = {}
        for _ in range(3):
            for name, ext in kernels.items():
                t = median_seconds(
                    lambda ext=ext, x=x, dy=dy, st=stride: ext.conv3x3_wgrad(x, dy, st, True)
                )
                times[name] = min(times.get(name, t), t)
        print(f"  {c} -> {c * stride} channels on {s}x{s}, stride {stride}: "
              + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in times.items()))  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=20)
    p.add_argument("--skip-alone", action="store_true", help="only the training step")
    args = p.parse_args()
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}")
    kernels = {k: (kernel_variant("_s36" + str(i), *d) if d else ext)
               for i, (k, d) in enumerate(BUILDS.items())}  # fmt: skip
    if not args.skip_alone:
        alone(kernels)

    precision, _, step = cifar_default_step(args.data, args.model)
    rates = kernel_rounds(kernels, step, rounds=args.rounds, steps=args.steps)
    print_ratios(
        args.model,
        precision,
        args.rounds,
        args.steps,
        rates,
        [*itertools.pairwise(BUILDS), ("session 35", "+twin")],
    )


if __name__ == "__main__":
    main()
